"""Learning-rate bundles (execution.bundle): the trials of one cell train as one model with
members, and each member is the trial it stands for: same rows within float tolerance, same
trial id, same store."""

from __future__ import annotations

import math

import pytest
from test_e2e_sweep import TINY, write_grid

from sweeper.data import fingerprint
from sweeper.orchestrate import bundles, execute_bundle, plan, run_local
from sweeper.progress import SweepProgress
from sweeper.spec import SpecError, TrialSpec, expand, parse_spec
from sweeper.store import Store
from sweeper.train import (
    DIVERGENCE_FACTOR,
    member_bytes,
    members_that_fit,
    run_bundle,
    run_trial,
)

# Per family: two lrs that train, and one that diverges after the warm-up (5 of 20 steps).
LRS = {
    "adamw": (1e-3, 4e-3, 8.0),
    "adamw-mup": (1e-3, 4e-3, 8.0),
    "adamw-rescaled": (1e-2, 0.1, 300.0),
    "muon": (1e-2, 4e-2, None),  # Muon moves hidden matrices only: no lr of it blows up soon
    "scion": (1e-2, 5e-2, None),  # constrained: every lr keeps the weights on their ball
    "uscion": (5e-3, 2e-2, 20.0),
    "moga-row": (3e-3, 1e-2, 20.0),
    "moga-col": (3e-3, 1e-2, 20.0),
}
KEYS = ("train_loss", "val_loss", "out_rms_to_inf", "hidden_rms_to_rms", "in_l1_to_rms")


def grid(optimizer: str, lrs: list[float], model: str = "gpt", **train) -> dict:
    return {
        "name": "b",
        "model": {"kind": model, "depth": 2, "seq_len": 32, "head_dim": 16},
        "train": {
            "steps": 20,
            "log_every": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "coord_check": 2,
            "warmup": 0.25,
            **train,
        },  # fmt: skip
        "grid": {
            "width": [32],
            "batch_size": [8],
            "seed": [0, 1],
            "optimizer": {optimizer: {"lr": lrs}},
        },  # fmt: skip
    }


def trials_of(config: dict) -> list[TrialSpec]:
    spec = parse_spec(config)
    return expand(spec, fingerprint(spec.data))


def assert_same_trial(single, member) -> None:
    """A member's rows are its trial's, to float tolerance, and it ends as its trial does, at
    the same step. Rows whose loss has blown up (above the divergence limit, which the warm-up
    lets a diverging trial pass for a few steps) are compared by their steps only: a blow-up
    amplifies float rounding as it amplifies anything."""
    assert member.status == single.status, (single.summary["error"], member.summary["error"])
    assert member.summary["steps_done"] == single.summary["steps_done"]
    assert len(member.steps) == len(single.steps)
    limit = DIVERGENCE_FACTOR * max(single.steps[0]["train_loss"], math.log(256))
    rows = [
        (a, b)
        for a, b in zip(single.steps, member.steps, strict=True)
        if a["train_loss"] is not None and a["train_loss"] <= limit
    ]
    assert len(rows) >= (1 if single.status == "diverged" else 4)
    for a, b in rows:
        assert a["step"] == b["step"]
        for key in KEYS:
            if a[key] is None:
                assert b[key] is None, key
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"])
    sane = 0 if single.status == "diverged" else single.summary["steps_done"]
    assert [c["mean_abs"] for c in member.coord if c["step"] <= sane] == pytest.approx(
        [c["mean_abs"] for c in single.coord if c["step"] <= sane], rel=1e-4
    )


@pytest.mark.parametrize("optimizer", list(LRS))
def test_each_member_trains_as_its_own_trial_would(optimizer):
    lrs = [lr for lr in LRS[optimizer] if lr is not None]
    trials = trials_of(grid(optimizer, lrs))  # every lr at seeds 0 and 1
    # the two seeds' members interleaved, so that a member's batches are not its neighbour's
    trials = sorted(trials, key=lambda t: (t.lr, t.seed))
    bundled = run_bundle(trials)
    for t, member in zip(trials, bundled, strict=True):
        assert_same_trial(run_trial(t), member)
    if LRS[optimizer][2] is not None:  # the diverging lr left mid-way, the others went on
        statuses = {(t.lr, t.seed): r.status for t, r in zip(trials, bundled, strict=True)}
        assert statuses[(lrs[-1], 0)] == statuses[(lrs[-1], 1)] == "diverged"
        assert {s for (lr, _), s in statuses.items() if lr != lrs[-1]} == {"completed"}
        left = [r.summary["steps_done"] for r in bundled if r.status == "diverged"]
        assert all(5 < s < 20 for s in left), left


def test_mlp_members_with_clipping_and_accumulation_train_as_their_trials():
    trials = trials_of(grid("adamw", [1e-3, 8.0], "mlp", grad_clip=0.5, micro_batch=4))
    for t, member in zip(trials, run_bundle(trials), strict=True):
        assert_same_trial(run_trial(t), member)


def test_a_bundle_refuses_trials_of_two_cells():
    a = trials_of(grid("adamw", [1e-3]))[0]
    with pytest.raises(ValueError, match="differ in lr and seed only"):
        run_bundle([a, a.model_copy(update={"width": 64})])


def test_bundles_hold_one_cell_each_in_even_sizes_seeds_side_by_side():
    config = grid("adamw", [1e-3, 2e-3, 4e-3])
    config["grid"]["width"] = [32, 64]
    config["grid"]["seed"] = [0, 1, 2]
    trials = trials_of(config)  # 9 per width
    groups = bundles(trials, 4)
    assert [len(g) for g in groups] == [3, 3, 3, 3, 3, 3]  # 9 = 3 + 3 + 3, not 4 + 4 + 1
    for g in groups:
        assert len({t.cell for t in g}) == 1
        assert [t.seed for t in g] == sorted(t.seed for t in g)
    assert sorted(t.trial_id for g in groups for t in g) == sorted(t.trial_id for t in trials)
    assert bundles(trials, 1) == [[t] for t in trials]


@pytest.mark.parametrize(
    ("execution", "resources", "size"),
    [
        ({"bundle": 8}, {"gpu": 0.25}, 8),
        ({"bundle": "auto"}, {"gpu": 0.25}, 8),
        ({"bundle": 8}, {}, 1),  # on CPUs: one by one unless asked for anyway
        ({"bundle": "auto"}, {}, 1),
        ({"bundle": 8, "bundle_on_cpu": True}, {}, 8),
        ({"bundle": "auto", "scheduler": "asha"}, {"gpu": 0.25}, 1),
    ],
)
def test_bundles_are_for_gpus_and_never_with_asha(execution, resources, size):
    config = {**grid("adamw", [1e-3]), "execution": execution, "resources": resources}
    assert parse_spec(config).bundle_size == size


def test_asha_with_a_bundle_size_is_refused():
    with pytest.raises(SpecError, match="bundle 8 with scheduler asha"):
        parse_spec({**grid("adamw", [1e-3]), "execution": {"bundle": 8, "scheduler": "asha"}})


def test_members_that_do_not_fit_train_after_the_others(tmp_path, monkeypatch):
    import sweeper.train

    trials = trials_of(grid("uscion", [5e-3, 2e-2, 20.0]))
    one = member_bytes(trials[0])
    # the memory of two members: the six train as three bundles of two
    monkeypatch.setattr(sweeper.train, "device_memory", lambda spec, share: 2 * one + 1)
    assert members_that_fit(trials[0], 6) == 2
    sizes = []
    real = sweeper.train.run_bundle
    monkeypatch.setattr(sweeper.train, "run_bundle", lambda s, r: sizes.append(len(s)) or real(s))
    store = Store(tmp_path, "b")
    stored: dict[str, str] = {}
    results = execute_bundle(trials, store, stored=stored)
    assert sizes == [2, 2, 2]
    assert stored == {t.trial_id: r.status for t, r in zip(trials, results, strict=True)}
    assert store.trial_ids() == {t.trial_id for t in trials}


def test_a_failing_bundle_is_retried_then_its_members_are_stored_failed(tmp_path, monkeypatch):
    from rich.console import Console

    import sweeper.train

    config = {**grid("adamw", [1e-3, 2e-3]), "results": str(tmp_path)}
    config["execution"] = {"bundle": 4, "bundle_on_cpu": True, "retries": 2}
    p = plan(parse_spec(config))
    calls = []

    def broken(specs, reports=None):
        calls.append(len(specs))
        raise RuntimeError("out of memory (planted)")

    monkeypatch.setattr(sweeper.train, "run_bundle", broken)
    with SweepProgress("b", len(p.todo), 0, Console(quiet=True)) as progress:
        run_local(p, progress, p.todo)
    assert calls == [4, 4, 4]  # one bundle of the 4 trials, tried 1 + 2 times
    assert progress.counts["failed"] == 4
    stored = p.store.read("trials", ["trial_id", "status", "error"]).to_pylist()
    assert {r["status"] for r in stored} == {"failed"} and len(stored) == 4
    assert all("out of memory (planted)" in r["error"] for r in stored)


@pytest.mark.e2e
def test_a_bundle_that_raised_counts_its_stored_members_as_stored():
    # On Ray: the bundle raised after one member was stored (it diverged early); the progress
    # counts that member by its stored status and only the others as failed.
    from types import SimpleNamespace

    from rich.console import Console

    members = trials_of(grid("adamw", [1e-3, 2e-3]))
    bundle = SimpleNamespace(name="bundle-0", error_file=None, last_result={})
    with SweepProgress("b", len(members), 0, Console(quiet=True)) as progress:
        callback = progress.tune_callback(
            {"bundle-0": members}, lambda t: t.name, lambda: {members[0].trial_id: "diverged"}
        )
        callback.on_trial_error(0, [], bundle)
    assert progress.counts == {"diverged": 1, "failed": len(members) - 1}


def test_a_bundled_store_and_an_unbundled_one_are_interchangeable(tmp_path, sweep_cli):
    import pandas as pd

    config = {
        **TINY,
        "train": {**TINY["train"], "steps": 8, "log_every": 4, "eval_every": 4},
        "grid": {
            **TINY["grid"],
            "width": [32],
            "seed": [0, 1],
            "optimizer": {"adamw": {"lr": [1e-3, 4e-3, 8.0]}},
        },  # fmt: skip
    }
    runs = {}
    for bundle in (1, 4):
        (tmp_path / f"b{bundle}").mkdir()
        execution = {"bundle": 4, "bundle_on_cpu": True} if bundle == 4 else {}
        path = write_grid(tmp_path / f"b{bundle}", {**config, "execution": execution})
        out = sweep_cli("run", str(path), "--executor", "local")
        assert out.returncode == 0, out.stderr
        assert "done: 4 completed, 2 diverged" in out.stdout  # members counted one by one
        runs[bundle] = pd.read_parquet(tmp_path / f"b{bundle}" / "results" / "tiny" / "trials")
    plain, bundled = (runs[b].set_index("trial_id").sort_index() for b in (1, 4))
    assert list(plain.index) == list(bundled.index) and list(plain.columns) == list(bundled.columns)
    assert (plain.status == bundled.status).all()
    done = plain.status == "completed"
    assert bundled.final_val_loss[done].to_numpy() == pytest.approx(
        plain.final_val_loss[done].to_numpy(), rel=1e-4
    )
    # A bundled sweep resumes unbundled and the other way round: the ids are the trials'.
    lrs = [1e-3, 4e-3, 8.0, 2e-3]
    wider = {**config, "grid": {**config["grid"], "optimizer": {"adamw": {"lr": lrs}}}}
    for bundle, other in ((4, 1), (1, 4)):
        execution = {"bundle": 4, "bundle_on_cpu": True} if other == 4 else {}
        path = write_grid(tmp_path / f"b{bundle}", {**wider, "execution": execution})
        out = sweep_cli("run", str(path), "--executor", "local")
        assert out.returncode == 0 and "6 already stored, 2 to run" in out.stdout, out.stdout


def test_a_diverged_member_leaves_the_model_and_the_rest_train_on(monkeypatch):
    import sweeper.train

    trials = trials_of(grid("adamw", [1e-3, 8.0]))
    sizes = []
    real = sweeper.train._Trainer.drop_ended

    def watched(self):  # noqa: ANN001, ANN202
        real(self)
        sizes.append(self.model.members)

    monkeypatch.setattr(sweeper.train._Trainer, "drop_ended", watched)
    results = run_bundle(trials)
    statuses = {(t.lr, r.status) for t, r in zip(trials, results, strict=True)}
    assert statuses == {(1e-3, "completed"), (8.0, "diverged")}
    assert sizes[0] == 4 and sizes[-1] == 2  # the two diverged members were taken out
    assert all(
        math.isfinite(r.summary["final_val_loss"]) for r in results if r.status == "completed"
    )


@pytest.mark.e2e
@pytest.mark.ray
def test_bundles_on_ray_count_members_and_report_each_to_trackers(tmp_path, sweep_cli):
    from tensorboardX.proto import event_pb2
    from test_trackers import _tfrecords

    config = {
        **TINY,
        "grid": {
            **TINY["grid"],
            "width": [32],
            "seed": [0, 1],
            "optimizer": {"adamw": {"lr": [1e-3, 4e-3, 8.0]}},
        },  # fmt: skip
        "execution": {"bundle": 4, "bundle_on_cpu": True, "retries": 0},
    }
    path = write_grid(tmp_path, config)
    dry = sweep_cli("run", str(path), "--dry-run")
    assert "6 to run, in bundles of up to 4" in dry.stdout
    out = sweep_cli("run", str(path), "--num-cpus", "2", "--tracker", "tensorboard")
    assert out.returncode == 0, out.stderr
    assert "done: 4 completed, 2 diverged" in out.stdout
    assert out.stdout.count("completed adamw") == 4 and out.stdout.count("diverged adamw") == 2
    runs = sorted((tmp_path / "results" / "tiny" / "tune" / "tiny").glob("*/events.out.*"))
    assert len(runs) == 2  # the cell's 6 trials as two bundles of 3
    tags = set()
    for run in runs:
        for record in _tfrecords(run.read_bytes()):
            tags |= {v.tag for v in event_pb2.Event.FromString(record).summary.value}
    for lr in ("-9.96578", "-7.96578", "3"):
        for seed in (0, 1):
            assert any(f"log2lr{lr}-s{seed}/train_loss" in tag for tag in tags), (lr, seed)
