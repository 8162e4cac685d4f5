"""Early stopping (execution: {scheduler: asha}): ASHA within a cell and seed, a stop that keeps
the trial's rows, status `stopped` through the store, the CLI, resume and the analysis."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler
from test_e2e_sweep import TINY, write_grid

from sweeper.asha import PerCellAsha
from sweeper.spec import Asha, SpecError, expand, parse_spec
from sweeper.store import Store
from sweeper.train import run_trial

ASHA = {
    **TINY,
    "train": {"steps": 40, "log_every": 4, "eval_every": 4, "eval_batches": 1},
    "grid": {
        "width": [32],
        "batch_size": [4],
        "seed": [0],
        # the good lr first: it sets the rung's bar, which the tiny lr then fails
        "optimizer": {"adamw": {"lr": [2**-6, 2**-20]}},
    },
    "execution": {"max_concurrent": 1, "retries": 0, "scheduler": "asha"},
}


def test_a_trial_asked_to_stop_keeps_its_rows(tmp_path):
    spec = expand(parse_spec({**ASHA, "results": str(tmp_path)}), "fp")[0]
    spec = spec.model_copy(update={"data_fingerprint": ""})
    rows = []
    result = run_trial(spec, sink=rows.append, should_stop=lambda: rows[-1]["step"] >= 12)
    assert result.status == "stopped" and result.summary["error"].endswith("step 12")
    assert [r["step"] for r in result.steps] == [0, 4, 8, 12]
    assert result.summary["steps_done"] == 12 and result.summary["final_val_loss"] is None
    assert result.summary["best_val_loss"] is not None
    store = Store(tmp_path, "tiny")
    store.request_stop(spec.trial_id)
    assert store.stop_requested(spec.trial_id)
    store.write_trial(spec, result)
    assert spec.trial_id in store.finished_ids()  # not run again
    assert not store.stop_requested(spec.trial_id)  # the request is consumed


def test_the_last_row_and_a_divergence_row_are_never_followed_by_a_stop(tmp_path):
    # A stop decided on one row is read after the next: were that row the last, or the one
    # where the loss blew up, the trial would be stored stopped instead of completed/diverged.
    spec = expand(parse_spec({**ASHA, "results": str(tmp_path)}), "fp")[0]
    spec = spec.model_copy(update={"data_fingerprint": ""})
    for lr, ends in ((2.0**-6, "completed"), (2.0**6, "diverged")):
        rows, asked_after = [], []

        def ask(rows=rows, asked_after=asked_after):
            asked_after.append(rows[-1]["step"])
            return False

        result = run_trial(spec.model_copy(update={"lr": lr}), sink=rows.append, should_stop=ask)
        assert result.status == ends
        assert rows[-1]["step"] not in asked_after
        assert asked_after == [r["step"] for r in rows[1:-1]]


def test_stale_stop_requests_are_dropped_when_a_run_starts(tmp_path):
    store = Store(tmp_path, "tiny")
    store.request_stop("0123456789abcdef")
    store.prepare()
    assert not store.stop_requested("0123456789abcdef")


def test_asha_compares_trials_only_within_their_cell_and_seed(tmp_path):
    config = {**ASHA, "grid": {**ASHA["grid"], "width": [32, 64]}, "results": str(tmp_path)}
    specs = {(t.width, t.lr): t for t in expand(parse_spec(config), "fp")}
    good, bad = 2.0**-6, 2.0**-20
    trial = {  # Tune's trials, as the scheduler sees them
        key: SimpleNamespace(
            trial_id=f"tune-{n}",
            config={"spec": spec.model_dump_json(), "store_trial_id": spec.trial_id},
        )
        for n, (key, spec) in enumerate(specs.items())
    }
    store = Store(tmp_path, "tiny")
    sched = PerCellAsha(Asha(grace=0.25, reduction_factor=2), store)
    for t in trial.values():
        sched.on_trial_add(None, t)
    # width 32's good lr sets its cell's bar at the first rung (10 steps); width 64's bad lr,
    # far worse, is alone in its cell
    decision = sched.on_trial_result(None, trial[32, good], {"step": 12, "val_loss": 2.0})
    assert decision == TrialScheduler.CONTINUE
    sched.on_trial_result(None, trial[64, bad], {"step": 12, "val_loss": 9.0})
    assert not store.stop_requested(specs[64, bad].trial_id)
    # width 32's bad lr is worse than its good one at the same rung: asked to stop, yet Tune
    # is told to continue (the trial ends itself, its rows stored)
    decision = sched.on_trial_result(None, trial[32, bad], {"step": 12, "val_loss": 3.0})
    assert decision == TrialScheduler.CONTINUE
    assert store.stop_requested(specs[32, bad].trial_id)
    # rows without an evaluation, and a trial's final report, are not judged
    sched.on_trial_result(None, trial[64, good], {"step": 12, "val_loss": math.nan})
    final = {"step": 40, "val_loss": 99.0, "status": "completed"}
    sched.on_trial_result(None, trial[64, good], final)
    assert not store.stop_requested(specs[64, good].trial_id)


@pytest.mark.parametrize(
    "execution",
    [
        {"asha": {"grace": 0.5}},  # settings without the scheduler
        {"scheduler": "asha", "asha": {"grace": 0}},
        {"scheduler": "asha", "asha": {"grace": 1}},  # never a stop
        {"scheduler": "asha", "asha": {"reduction_factor": 1}},
        {"scheduler": "hyperband"},
    ],
)
def test_bad_scheduler_settings_are_refused(execution):
    with pytest.raises(SpecError):
        parse_spec({**ASHA, "execution": execution})


def test_asha_that_could_stop_no_trial_is_refused(tmp_path, sweep_cli):
    late = {**ASHA, "train": {**ASHA["train"], "eval_every": 100}}  # only the final evaluation
    out = sweep_cli("run", str(write_grid(tmp_path, late)))
    assert out.returncode == 2 and "could stop no trial" in out.stderr, out.stderr
    assert not (tmp_path / "results").exists()


def test_asha_is_refused_by_the_local_executor_before_anything_is_written(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, ASHA)
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 2 and "scheduler asha" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.ray
def test_asha_stops_a_poor_lr_which_is_stored_and_not_run_again(tmp_path, sweep_cli, ray_address):
    grid = write_grid(tmp_path, ASHA)
    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    assert "stopped" in out.stdout
    root = tmp_path / "results" / "tiny"
    trials = pd.read_parquet(root / "trials").set_index("lr")
    assert trials.loc[2**-6, "status"] == "completed"
    assert trials.loc[2**-20, "status"] == "stopped"
    stopped = trials.loc[2**-20]
    steps = pd.read_parquet(root / "steps")
    rows = steps[steps["trial_id"] == stopped["trial_id"]]
    assert 10 <= rows["step"].max() < 40  # stopped after the first rung, its rows kept
    assert stopped["steps_done"] == rows["step"].max()
    assert not list((root / ".incoming").glob("stop-*"))

    status = sweep_cli("status", str(root))
    assert "1 completed, 0 diverged, 1 stopped, 0 failed" in status.stdout, status.stdout
    again = sweep_cli("run", str(grid), "--address", ray_address)
    assert again.returncode == 0 and "2 already stored, 0 to run" in again.stdout
    report = sweep_cli("analyze", str(root))
    assert report.returncode == 0, report.stderr
    assert "1 stopped" in report.stdout
