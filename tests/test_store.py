"""The Parquet store: atomic trials, no duplicates, readable by pandas."""

from __future__ import annotations

import pandas as pd
import pytest

from sweeper.spec import expand, parse_spec
from sweeper.store import STEPS_COLUMNS, TRIALS_COLUMNS, Store, TrialResult

SPEC = parse_spec(
    {
        "name": "s",
        "train": {"steps": 20, "log_every": 10},
        "grid": {"width": [32], "optimizer": {"adamw": {"lr": [0.01, 0.001]}}},
    }
)


def result(status="completed", loss=2.0):
    rows = [{"step": s, "tokens": s * 10, "train_loss": loss + 1 / (1 + s)} for s in (0, 10, 20)]
    return TrialResult(status, {"final_val_loss": loss, "n_params": 123}, rows)


def test_write_and_read_back(tmp_path):
    store = Store(tmp_path, "s")
    a, b = expand(SPEC, "fp")
    store.write_trial(a, result())
    store.write_trial(b, result("diverged"))
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    assert list(trials.columns) == [c for c, _, _ in TRIALS_COLUMNS]
    assert sorted(trials.trial_id) == sorted([a.trial_id, b.trial_id])
    row = trials.set_index("trial_id").loc[a.trial_id]
    assert row.width == 32 and row.lr == a.lr and row.status == "completed"
    assert row.tokens == 20 * SPEC.grid.batch_size[0] * SPEC.model.seq_len
    steps = pd.read_parquet(tmp_path / "s" / "steps")
    assert list(steps.columns) == [c for c, _, _ in STEPS_COLUMNS]
    assert len(steps) == 6
    assert store.finished_ids() == {a.trial_id, b.trial_id}


def test_failed_trials_are_retried_and_replaced_not_duplicated(tmp_path):
    store = Store(tmp_path, "s")
    a, _ = expand(SPEC, "fp")
    store.write_trial(a, TrialResult("failed", {"error": "boom"}))
    assert store.finished_ids() == set() and store.trial_ids() == {a.trial_id}
    store.write_trial(a, result())
    trials = store.read("trials").to_pandas()
    assert len(trials) == 1 and trials.status[0] == "completed"
    assert len(store.read("steps")) == 3


def test_prepare_drops_what_a_crash_left_half_written(tmp_path):
    store = Store(tmp_path, "s")
    a, b = expand(SPEC, "fp")
    store.write_trial(a, result())
    # a crash between the steps file and the trials file of b, and a torn temporary file
    store.write_trial(b, result())
    (tmp_path / "s" / "trials" / f"{b.trial_id}.parquet").unlink()
    (tmp_path / "s" / "steps" / f".tmp-{'f' * 32}.parquet").write_bytes(b"PAR1 torn")
    assert len(pd.read_parquet(tmp_path / "s" / "steps")) == 6  # readers skip the dot-file
    store.prepare("name: s\n")
    assert sorted(p.name for p in (tmp_path / "s" / "steps").iterdir()) == [f"{a.trial_id}.parquet"]
    assert (tmp_path / "s" / "grid.yaml").read_text() == "name: s\n"
    assert store.finished_ids() == {a.trial_id}


def test_empty_store_reads_as_empty_tables(tmp_path):
    store = Store(tmp_path, "nothing")
    assert store.finished_ids() == set()
    assert store.read("steps").num_rows == 0


def test_unknown_summary_field_is_refused(tmp_path):
    a, _ = expand(SPEC, "fp")
    with pytest.raises(ValueError, match="does not know"):
        Store(tmp_path, "s").write_trial(a, TrialResult("completed", {"loss": 1.0}))
    assert not (tmp_path / "s" / "trials").exists() or not any(
        (tmp_path / "s" / "trials").iterdir()
    )
