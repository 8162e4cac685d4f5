"""The grid file's schema and its expansion into trials."""

from __future__ import annotations

import math

import pytest

from sweeper.spec import SpecError, expand, load_spec, parse_spec

BASE = {
    "name": "t",
    "train": {"steps": 10},
    "grid": {"width": [32, 64], "optimizer": {"adamw": {"lr": {"log2": [-10, -6, 1]}}}},
}


def with_(**changes):
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def test_log2_range_includes_both_ends():
    trials = expand(parse_spec(BASE), "fp")
    lrs = sorted({t.lr for t in trials})
    assert [math.log2(x) for x in lrs] == [-10, -9, -8, -7, -6]
    assert len(trials) == 2 * 5


def test_every_list_is_an_axis():
    spec = parse_spec(
        with_(
            model={"depth": [2, 4]},
            train={"tokens": [4096, 8192]},
            grid={
                "width": [32],
                "batch_size": [4, 8],
                "seed": [0, 1],
                "optimizer": {
                    "scion": {"lr": [0.1, 0.2], "momentum": [0.1, 1.0], "lr_output": [1, 0.5]},
                    "muon": {"lr": 0.02, "adam_lr": 0.001},
                },
            },
        )
    )
    trials = expand(spec, "fp")
    # depth 2 x tokens 2 x batch 2 x seed 2 x (scion: lr 2 x momentum 2 x lr_output 2 + muon 1)
    assert len(trials) == 2 * 2 * 2 * 2 * (8 + 1)
    assert len({t.trial_id for t in trials}) == len(trials)
    one = next(t for t in trials if t.batch_size == 8 and t.optimizer == "scion")
    assert one.steps == 4096 // (8 * 128) or one.steps == 8192 // (8 * 128)
    assert {t.hparams["momentum"] for t in trials if t.optimizer == "scion"} == {0.1, 1.0}
    assert {t.lr_output for t in trials if t.optimizer == "scion"} == {1.0, 0.5}


def test_trial_id_is_stable_and_ignores_the_sweep_name():
    a = expand(parse_spec(BASE), "fp")
    b = expand(parse_spec(with_(name="other")), "fp")
    assert [t.trial_id for t in a] == [t.trial_id for t in b]
    # known value: changing it silently would re-run every stored sweep
    assert a[0].trial_id == "309305c36f5be5b9"
    c = expand(parse_spec(BASE), "other-data")
    assert not {t.trial_id for t in a} & {t.trial_id for t in c}


def test_adding_a_width_keeps_old_ids():
    old = {t.trial_id for t in expand(parse_spec(BASE), "fp")}
    new = {t.trial_id for t in expand(parse_spec(with_(grid__width=[32, 64, 128])), "fp")}
    assert old < new and len(new - old) == 5


def test_attn_scale_auto_follows_the_optimizer():
    spec = parse_spec(with_(grid__optimizer={"adamw": {"lr": 1e-3}, "adamw-mup": {"lr": 1e-3}}))
    scale = {t.optimizer: t.attn_scale for t in expand(spec, "fp")}
    assert scale == {"adamw": "sqrt", "adamw-mup": "mup"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"grid__optimizer": {"sgd": {"lr": 1}}}, "grid.optimizer: unknown optimizer 'sgd'"),
        ({"grid__width": [0]}, "grid.width.0"),
        ({"train": {}}, "give exactly one of train.steps and train.tokens"),
        ({"train": {"steps": 5, "tokens": 5}}, "give exactly one of train.steps"),
        ({"resources": {"gpu": 0.3}}, "must divide 1 exactly"),
        ({"grid__optimizer": {"adamw": {"lr": {"log2": [0, -4, 1]}}}}, "lo <= hi"),
        ({"model": {"kind": "rnn"}}, "model.kind"),
        ({"data": {"corpus": "stdlib", "text": "x.txt"}}, "exactly one data source"),
        ({"widths": [1]}, "widths: unknown field"),
        ({"name": "a b"}, "name: String should match pattern"),
        ({"grid__optimizer": {"adamw": {"lr": -1}}}, "grid.optimizer.adamw.lr"),
        ({"grid__optimizer": {"adamw": {"lr": 1, "betas": {"a": 1}}}}, "setting 'betas'"),
    ],
)
def test_schema_errors_name_the_field(changes, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(with_(**changes), "grid.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("grid.yaml: invalid grid file")


def test_load_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="no such grid file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="a YAML mapping"):
        load_spec(scalar)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(unsafe)


def test_relative_paths_are_made_absolute_and_ids_follow_the_data_not_its_path(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "name: t\nresults: out\ndata: {text: corpus.txt}\ntrain: {steps: 1}\n"
        "grid: {width: [32], optimizer: {adamw: {lr: 0.001}}}\n"
    )
    spec = load_spec(grid)
    assert spec.results == str(tmp_path / "out")
    assert spec.data.text == str(tmp_path / "corpus.txt")
    moved = spec.model_copy(update={"data": spec.data.model_copy(update={"text": "/x/c.txt"})})
    assert expand(spec, "fp")[0].trial_id == expand(moved, "fp")[0].trial_id
    assert expand(spec, "fp")[0].trial_id != expand(spec, "other")[0].trial_id


def test_micro_batch_sets_gradient_accumulation_and_must_divide_the_batch():
    spec = parse_spec(with_(train={"steps": 10, "micro_batch": 4}, grid__batch_size=[4, 8, 16]))
    assert {t.batch_size: t.grad_accum for t in expand(spec, "fp")} == {4: 1, 8: 2, 16: 4}
    plain = {t.trial_id for t in expand(parse_spec(with_(grid__batch_size=[4])), "fp")}
    assert plain == {t.trial_id for t in expand(spec, "fp") if t.batch_size == 4}
    with pytest.raises(SpecError, match="micro_batch 3 must divide every batch size; 8"):
        parse_spec(with_(train={"steps": 10, "micro_batch": 3}, grid__batch_size=[8]))
