"""The grid file's schema and its expansion into trials."""

from __future__ import annotations

import copy
import math
import time
import tracemalloc

import pytest

from sweeper.spec import (
    MAX_GRID_BYTES,
    MAX_LISTED_ERRORS,
    MAX_SEED,
    MAX_TRIALS,
    MAX_VALUES,
    SpecError,
    TrialSpec,
    check_trial_count,
    expand,
    load_spec,
    parse_spec,
    trial_count,
)

BASE = {
    "name": "t",
    "train": {"steps": 10},
    "grid": {"width": [32, 64], "optimizer": {"adamw": {"lr": {"log2": [-10, -6, 1]}}}},
}


def with_(**changes):
    spec = copy.deepcopy(BASE)  # never BASE's own nested dicts
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


# --------------------------------------------------------------------------- bad input (issue 12)


def refused(changes: dict, *expected: str) -> str:
    """parse_spec(with_(**changes)) raises one SpecError holding every expected phrase."""
    with pytest.raises(SpecError) as err:
        parse_spec(with_(**changes), "grid.yaml")
    message = str(err.value)
    for phrase in expected:
        assert phrase in message, message
    return message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"grid__optimizer": {"adamw": {"lr": []}}}, "grid.optimizer.adamw.lr"),
        ({"grid__optimizer": {"adamw": {"lr": 1e-3, "lr_input": []}}}, "adamw.lr_input"),
        ({"grid__optimizer": {"adamw": {"lr": 1e-3, "lr_hidden": []}}}, "adamw.lr_hidden"),
        ({"grid__optimizer": {"adamw": {"lr": 1e-3, "lr_output": []}}}, "adamw.lr_output"),
        ({"grid__optimizer": {"adamw": {"lr": 1e-3, "lr_vector": []}}}, "adamw.lr_vector"),
        ({"grid__optimizer": {"scion": {"lr": 1e-3, "momentum": []}}}, "setting 'momentum'"),
        ({"grid__width": []}, "grid.width"),
        ({"grid__batch_size": []}, "grid.batch_size"),
        ({"grid__seed": []}, "grid.seed"),
        ({"grid__optimizer": {}}, "grid.optimizer"),
        ({"model": {"depth": []}}, "model.depth"),
        ({"train": {"steps": []}}, "train.steps"),
        ({"train": {"tokens": []}}, "train.tokens"),
    ],
)
def test_an_empty_axis_is_refused(changes, field):
    # `lr: []` was an IndexError traceback; an empty axis would be a grid of no trials.
    message = refused(changes, field)
    assert "empty" in message or "at least 1" in message


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("grid__optimizer__adamw__lr", "grid.optimizer.adamw.lr"),
        ("grid__optimizer__adamw__lr_output", "grid.optimizer.adamw.lr_output"),
        ("grid__optimizer__adamw__eps", "setting 'eps' must be a finite number"),
        ("train__warmup", "train.warmup"),
        ("train__grad_clip", "train.grad_clip"),
        ("resources__cpu", "resources.cpu"),
        ("resources__gpu", "resources.gpu"),
        ("data__val_fraction", "data.val_fraction"),
    ],
)
def test_non_finite_floats_are_refused_everywhere(path, field, bad):
    changes = {path: bad}
    if path.startswith("grid__optimizer__adamw__") and not path.endswith("__lr"):
        changes["grid__optimizer__adamw__lr"] = 1e-3
    if path.startswith("data"):
        changes["data__corpus"] = "stdlib"
    refused(changes, field)


def test_non_finite_values_in_lists_and_log2_ranges_are_refused():
    refused({"grid__optimizer": {"adamw": {"lr": [1e-3, math.inf]}}}, "adamw.lr.1")
    refused({"grid__optimizer": {"adamw": {"lr": {"log2": [-10, math.inf, 1]}}}}, "adamw.lr")
    refused({"grid__optimizer": {"adamw": {"lr": {"log2": [-10, -5, math.nan]}}}}, "adamw.lr")


@pytest.mark.parametrize(
    ("lr", "expected"),
    [
        # was a dry-run traceback, and a real run trained lr = 2.0**-2000 = 0.0 "completed"
        ({"log2": [-2000, -1999, 1]}, "reaches 2^-2000"),
        ({"log2": [1100, 1101, 1]}, "reaches 2^1101"),  # was an OverflowError
        ({"log2": [-41, -30, 1]}, "reaches 2^-41"),
        ({"log2": [-10, 21, 1]}, "reaches 2^21"),
        (1e-300, "lr 1e-300 is outside 2^-40 .. 2^20"),
        ([1e-3, 2e6], "lr 2e+06 is outside 2^-40 .. 2^20"),
        (0, "lr must be positive, got 0"),
        (-1e-3, "lr must be positive"),
    ],
)
def test_learning_rates_are_refused_outside_their_range(lr, expected):
    refused({"grid__optimizer": {"adamw": {"lr": lr}}}, "grid.optimizer.adamw.lr", expected)


@pytest.mark.parametrize("value", [2.0**-21, 2.0**21, 1e-12, 0.0])
def test_lr_multipliers_are_refused_outside_their_range(value):
    refused(
        {"grid__optimizer": {"uscion": {"lr": 0.01, "lr_output": [1.0, value]}}},
        "grid.optimizer.uscion.lr_output.1",
        "lr multiplier",
    )


def test_the_ends_of_the_ranges_are_allowed():
    spec = parse_spec(
        with_(
            grid__optimizer={
                "adamw": {"lr": [2.0**-40, 2.0**20], "lr_output": [2.0**-20, 2.0**20]},
                # 0 + 200 * 0.1 overshoots 20 by a rounding error: still inside
                "scion": {"lr": {"log2": [0, 20, 0.1]}},
                "muon": {"lr": {"log2": [-40, 20, 0.06]}},
            }
        )
    )
    lrs = sorted({t.lr for t in expand(spec, "fp")})
    assert lrs[0] == 2.0**-40 and math.isclose(lrs[-1], 2.0**20)


@pytest.mark.parametrize("seed", [2**65, 2**32, -1])
def test_seeds_are_refused_outside_0_to_2_to_the_32(seed):
    # 2**65 was a traceback at the store (an int64 column) after orphan files were written
    refused({"grid__seed": [0, seed]}, "grid.seed.1", "4294967295" if seed > 0 else "0")


def test_the_largest_seed_is_allowed():
    assert {t.seed for t in expand(parse_spec(with_(grid__seed=[0, MAX_SEED])), "fp")} == {
        0,
        MAX_SEED,
    }


@pytest.mark.parametrize(
    ("model", "widths", "expected"),
    [
        # was: every trial stored failed by the rotary embedding, exit 1
        ({"head_dim": 15}, [32, 64], "model.head_dim 15 must be even"),
        # was: silently a 16-wide attention in a 24-wide model
        ({"head_dim": 16}, [16, 24, 32, 40], "grid.width 24, 40 is not a multiple of 16"),
        ({"head_dim": 64}, [33, 64], "grid.width 33 is below model.head_dim 64"),
    ],
)
def test_gpt_head_dim_must_fit_every_width(model, widths, expected):
    refused({"model": model, "grid__width": widths}, expected)


def test_the_mlp_ignores_head_dim():
    spec = parse_spec(with_(model={"kind": "mlp", "head_dim": 15}, grid__width=[24, 33]))
    assert {t.width for t in expand(spec, "fp")} == {24, 33}


def test_accepted_head_dims_give_attention_as_wide_as_the_model():
    from sweeper.models import GPT

    widths = [8, 16, 32, 48, 96]
    spec = parse_spec(with_(model={"head_dim": 16}, grid__width=widths))
    for w in {t.width for t in expand(spec, "fp")}:
        gpt = GPT(vocab_size=16, width=w, depth=1, seq_len=4, head_dim=16)
        assert gpt.blocks[0].attn.c_q.out_features == w


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"grid__width": [32, 65_537]}, "grid.width.1"),
        ({"grid__batch_size": [2**20 + 1]}, "grid.batch_size.0"),
        ({"model": {"depth": [2, 1025]}}, "model.depth.1"),
        ({"model": {"seq_len": 2**20 + 1}}, "model.seq_len"),
        ({"model": {"head_dim": 2**17}}, "model.head_dim"),
        ({"model": {"mlp_context": 5000}}, "model.mlp_context"),
        ({"train": {"steps": 10**9 + 1}}, "train.steps.0"),
        ({"train": {"tokens": [10**15 + 1]}}, "train.tokens.0"),
        ({"train": {"steps": 10, "micro_batch": 2**20 + 1}}, "train.micro_batch"),
        ({"train": {"steps": 10, "log_every": 2**63}}, "train.log_every"),
        ({"train": {"steps": 10, "eval_batches": 10**5}}, "train.eval_batches"),
        ({"train": {"steps": 10, "coord_check": 10**10}}, "train.coord_check"),
        ({"data": {"corpus": "stdlib", "vocab_size": 2**21}}, "data.vocab_size"),
        ({"resources": {"cpu": 10**6}}, "resources.cpu"),
        ({"resources": {"gpu": 4096}}, "resources.gpu"),
        ({"execution": {"retries": 10**6}}, "execution.retries"),
        ({"execution": {"max_concurrent": 10**9}}, "execution.max_concurrent"),
        ({"grid__optimizer": {"muon": {"lr": 0.02, "ns_steps": 2**64}}}, "'ns_steps'"),
        (
            {"train": {"steps": 10**9}, "grid__batch_size": [2**20], "model": {"seq_len": 2**20}},
            "tokens in one trial, over the limit of 1e+15",
        ),
    ],
)
def test_integers_have_sane_upper_bounds(changes, field):
    refused(changes, field)


def test_many_errors_are_capped():
    bad = [0] * 50_000
    message = refused({"grid__width": bad}, "grid.width.0", "... and 49,990 more errors")
    assert len(message.splitlines()) == 1 + MAX_LISTED_ERRORS + 1
    # More values than any usable grid holds: one line, before validation looks at them.
    message = refused({"grid__width": [0] * 100_000}, f"more than {MAX_VALUES:,} values")
    assert len(message.splitlines()) == 1


def fast_and_small(call, seconds=1.0, peak_mb=20.0):
    """call() raises SpecError within `seconds`, allocating at most `peak_mb` on the way."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SpecError) as err:
            call()
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert elapsed < seconds and peak < peak_mb, (elapsed, peak)
    return str(err.value)


def test_a_grid_over_the_trial_cap_is_refused_fast_before_expansion():
    # 10 million trials: the dry run grew to 13 GB before the cap
    big = with_(grid__seed=list(range(1000)), grid__width=[32] * 10)
    big["grid"]["optimizer"] = {"adamw": {"lr": {"log2": [-20, 0, 0.02]}}}
    message = fast_and_small(lambda: parse_spec(big, "grid.yaml"))
    assert "10,010,000 trials, over the limit of 100,000" in message
    assert "width 10 x" in message and "seed 1000" in message and "adamw 1,001" in message
    assert "Split it into several grid files" in message


def test_expand_refuses_an_over_cap_grid_however_the_spec_was_made():
    spec = parse_spec(BASE)
    grid = spec.grid.model_copy(update={"seed": list(range(10**6))})  # no validation
    huge = spec.model_copy(update={"grid": grid})
    message = fast_and_small(lambda: expand(huge, "fp"))
    assert "10,000,000 trials" in message
    with pytest.raises(SpecError):
        check_trial_count(huge)


def test_trial_count_is_the_expansion_size():
    spec = parse_spec(
        with_(
            model={"depth": [2, 4]},
            train={"steps": [5, 10]},
            grid__seed=[0, 1, 2],
            grid__optimizer={
                "scion": {"lr": [0.1, 0.2], "momentum": [0.1, 0.5, 1.0]},
                "adamw": {"lr": {"log2": [-10, -8, 1]}, "lr_output": [1, 0.5]},
            },
        )
    )
    assert trial_count(spec) == len(expand(spec, "fp")) == 2 * 2 * 2 * 3 * (6 + 6)
    at_cap = with_(grid__width=[32], grid__seed=list(range(MAX_TRIALS // 5)))
    assert trial_count(parse_spec(at_cap)) == MAX_TRIALS  # the cap itself is allowed


def test_a_grid_file_over_the_size_cap_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:  # 50 MB, sparse: no disk is used
        f.truncate(50 * 2**20)
    message = fast_and_small(lambda: load_spec(big), peak_mb=1)
    assert f"at most {MAX_GRID_BYTES:,} bytes" in message


def test_a_long_list_just_under_the_size_cap_is_refused_fast(tmp_path):
    head = "name: t\ntrain: {steps: 1}\ngrid:\n  width: [32, 64, 128, 256]\n"
    body = "  optimizer: {adamw: {lr: [" + ",".join(["1"] * (MAX_GRID_BYTES // 2 - 100)) + "]}}\n"
    path = tmp_path / "long.yaml"
    path.write_text(head + body)
    assert MAX_GRID_BYTES - 1000 < path.stat().st_size <= MAX_GRID_BYTES
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="over the limit of 100,000"):
        load_spec(path)
    assert time.perf_counter() - t0 < 1.0


def test_alias_bombs_are_refused_fast(tmp_path):
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text(
        "name: t\ntrain: {steps: 1}\n" + "\n".join(levels) + "\n"
        "grid: {width: [32], optimizer: {scion: {lr: 0.1, momentum: *a9}}}\n"
    )
    message = fast_and_small(lambda: load_spec(path), peak_mb=50)
    assert f"more than {MAX_VALUES:,} values (a YAML alias counts at each use)" in message


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    # YAML keeps the last of two equal keys: a grid would silently lose its first block
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: t\n"
        "train: {steps: 1}\n"
        "grid:\n"
        "  width: [32]\n"
        "  optimizer:\n"
        "    adamw: {lr: 0.1}\n"
        "    scion: {lr: 0.1}\n"
        "    adamw: {lr: 0.01}\n"
    )
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == (
        f"{path}: line 8: key 'adamw' is given twice (first on line 6); YAML would keep only "
        "the last, so remove one"
    )
    path.write_text("name: t\ntrain: {steps: 1, steps: 2}\ngrid: {width: [32]}\n")
    with pytest.raises(SpecError, match="line 2: key 'steps' is given twice"):
        load_spec(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: t\n"
        "train: {steps: 1}\n"
        "common: &common {lr: 0.1, momentum: 0.5}\n"
        "grid:\n"
        "  width: [32]\n"
        "  optimizer:\n"
        "    scion: {<<: *common, lr: 0.2}\n"
    )
    with pytest.raises(SpecError, match="common: unknown field"):  # parsed, then validated
        load_spec(path)
    path.write_text(path.read_text().replace("common: &common", "name: &common"))
    with pytest.raises(SpecError, match="line 3: key 'name' is given twice"):
        load_spec(path)


def test_deep_nesting_is_refused_without_a_traceback(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_trial_ids_are_cached_and_a_copy_gets_its_own():
    trial = expand(parse_spec(BASE), "fp")[0]
    assert trial.trial_id == "309305c36f5be5b9"
    assert trial.trial_id is trial.trial_id  # hashed once
    other = trial.model_copy(update={"seed": 7})
    fresh = TrialSpec.model_validate(other.model_dump())
    assert other.trial_id == fresh.trial_id != trial.trial_id
    assert trial.model_copy(update={"device": "cpu"}).trial_id == trial.trial_id
