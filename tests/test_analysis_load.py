"""Reading a store: folder detection, figure of merit, statuses, orphan rows, several sweeps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import AnalysisError, load_results
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store
from sweeper.store import STEPS_SCHEMA

SMALL = SyntheticConfig(
    name="small",
    optimizers={"scion": PlantedOptimizer(0.0, -7.0)},
    widths=(64, 128),
    seeds=(0, 1),
    log2_lr=(-10.0, -4.0, 1.0),
    steps=40,
    log_every=10,
    eval_every=20,
    diverge_octaves=2.0,
    failed_every=5,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    write_synthetic_store(root, SMALL)
    return root


def test_sweep_folder_and_results_root_are_both_accepted(root):
    one = load_results(root / "small")
    both = load_results(root)
    assert one.sweeps == ["small"] and both.sweeps == ["small"]
    assert len(one.trials) == len(both.trials) == 2 * 2 * 7


def test_statuses_and_figure_of_merit(root):
    res = load_results(root / "small")
    counts = res.status_counts()
    assert counts["failed"] > 0 and counts["diverged"] > 0
    assert counts["total"] == counts["completed"] + counts["diverged"] + counts["failed"]
    failed = res.trials[res.trials["status"] == "failed"]
    assert not failed["usable"].any()  # counted, never fitted
    diverged = res.trials[res.trials["diverged"]]
    assert diverged["usable"].all() and diverged["loss"].isna().all()
    completed = res.trials[res.trials["status"] == "completed"]
    np.testing.assert_allclose(completed["loss"], completed["final_val_loss"])
    assert set(res.varying) == {"width"}  # lr and seed are not config; labels stay short
    assert res.trials["label"].str.startswith("scion width=").all()


@pytest.mark.parametrize("metric", ["smoothed_train", "last_frac"])
def test_train_loss_metrics(root, metric):
    res = load_results(root / "small", metric)
    completed = res.trials[res.trials["status"] == "completed"]
    assert np.isfinite(completed["loss"]).all()
    # both sit within a few hundredths of the final validation loss on synthetic data
    assert np.abs(completed["loss"] - completed["final_val_loss"]).max() < 0.1
    assert res.trials.loc[res.trials["diverged"], "loss"].isna().all()


def test_steps_rows_of_unknown_trials_are_ignored(tmp_path):
    path = write_synthetic_store(tmp_path, dataclasses.replace(SMALL, failed_every=0))
    orphan = pa.Table.from_pylist(
        [{"trial_id": "not-a-trial", "step": 1, "tokens": 64, "train_loss": 1.0}], STEPS_SCHEMA
    )
    pq.write_table(orphan, path / "steps" / "not-a-trial.parquet")
    res = load_results(path)
    assert res.steps["tix"].isin(res.trials["tix"]).all()
    assert len(res.steps) == sum(
        len(range(10, 41, 10)) if not d else 2 for d in res.trials["diverged"]
    )


def test_a_trial_stored_in_two_sweeps_counts_once(tmp_path):
    cfg = dataclasses.replace(SMALL, failed_every=0, widths=(64,))
    write_synthetic_store(tmp_path, cfg)
    write_synthetic_store(tmp_path, dataclasses.replace(cfg, name="again"))
    res = load_results(tmp_path)
    assert res.sweeps == ["again", "small"]
    assert len(res.trials) == 14 and res.trials["trial_id"].is_unique
    assert any("more than one sweep" in n for n in res.notes)


def test_user_errors(tmp_path):
    with pytest.raises(AnalysisError, match="no such folder"):
        load_results(tmp_path / "missing")
    with pytest.raises(AnalysisError, match="no trials stored"):
        load_results(tmp_path)
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    with pytest.raises(AnalysisError, match="no trials stored"):
        load_results(tmp_path / "empty")
    with pytest.raises(AnalysisError, match="unknown metric 'best'"):
        load_results(tmp_path / "empty", metric="best")
    assert issubclass(AnalysisError, ValueError)
