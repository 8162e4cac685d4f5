"""Adaptive search (search: {method: optuna}): rounds planned from the store, never a stored
trial again, the budget kept, and resume after a kill."""

from __future__ import annotations

import math
import signal

import pytest
from test_e2e_sweep import TINY, signal_once_stored, write_grid

from sweeper.search import LATTICE, OptunaSearch
from sweeper.spec import expand, parse_spec
from sweeper.store import Store, TrialResult

SEARCH = {
    **TINY,
    "train": {**TINY["train"], "steps": 12, "log_every": 4, "eval_every": 6},
    "grid": {
        "width": [32, 64],
        "batch_size": [4],
        "seed": [0, 1],
        "optimizer": {"adamw": {"lr": {"log2": [-12, -2, 1]}}},
    },
    "search": {"method": "optuna", "trials_per_cell": 5, "batch": 2},
}
BUDGET = 2 * 2 * 5  # cells x seeds x trials_per_cell


def planned(tmp_path):
    spec = parse_spec({**SEARCH, "results": str(tmp_path)})
    store = Store(tmp_path, spec.name)
    return OptunaSearch(spec, expand(spec, "fp"), store), store


def store_round(store, trials, loss=lambda x: (x + 6) ** 2 / 10 + 2.0):
    """Store planted results: a bowl in log2 lr with its bottom at 2^-6."""
    for t in trials:
        x = math.log2(t.lr)
        store.write_trial(
            t, TrialResult("completed", {"final_val_loss": loss(x), "initial_loss": 5.5})
        )


def test_rounds_follow_the_store_and_keep_the_budget(tmp_path):
    search, store = planned(tmp_path)
    first = search.propose()
    # the design first: the two ends of each cell's range, each at both seeds
    assert sorted({round(math.log2(t.lr), 6) for t in first}) == [-12.0, -2.0]
    assert len(first) == 2 * 2 * 2
    seen = set()
    rounds = 0
    while trials := search.propose():
        ids = {t.trial_id for t in trials}
        assert not ids & seen, "a stored trial was proposed again"
        assert not ids & store.finished_ids()
        seen |= ids
        store_round(store, trials)
        rounds += 1
        assert rounds < 20
    assert len(store.trial_ids()) == BUDGET
    for cell in search.cells.values():
        points = sorted(cell.stored)
        assert len(points) == 5 and all(p * LATTICE == int(p * LATTICE) for p in points)
        assert all(-12 <= p <= -2 for p in points)


def test_a_round_cut_short_is_finished_before_new_points(tmp_path):
    search, store = planned(tmp_path)
    first = search.propose()
    store_round(store, [t for t in first if t.seed == 0])  # the kill came mid-round
    again = search.propose()
    assert {t.trial_id for t in again} == {t.trial_id for t in first if t.seed == 1}


def test_failed_trials_count_as_done_and_are_retried_once_per_run(tmp_path):
    search, store = planned(tmp_path)
    first = search.propose()
    for t in first:
        store.write_trial(t, TrialResult("failed", {"error": "boom"}))
    retry = search.propose(retry_failed=True)
    assert {t.trial_id for t in first} <= {t.trial_id for t in retry}
    later = search.propose()
    assert not {t.trial_id for t in first} & {t.trial_id for t in later}


def test_search_runs_then_reruns_nothing(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, SEARCH)
    dry = sweep_cli("run", str(grid), "--dry-run")
    assert dry.returncode == 0 and f"at most {BUDGET} trials" in dry.stdout, dry.stderr
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0, out.stderr
    assert "done: " in out.stdout
    store = Store(tmp_path / "results", "tiny")
    assert len(store.trial_ids()) == BUDGET
    again = sweep_cli("run", str(grid), "--executor", "local")
    assert again.returncode == 0 and f"{BUDGET} already stored, 0 to run" in again.stdout
    assert len(store.trial_ids()) == BUDGET
    report = sweep_cli("analyze", str(tmp_path / "results" / "tiny"))
    assert report.returncode == 0 and "adamw width=32" in report.stdout


def test_a_search_needs_a_range_of_lrs_in_each_cell(tmp_path, sweep_cli):
    one = {**SEARCH, "grid": {**SEARCH["grid"], "optimizer": {"adamw": {"lr": 0.01}}}}
    grid = write_grid(tmp_path, one)
    out = sweep_cli("run", str(grid), "--dry-run")
    assert out.returncode == 2 and "has one lr (0.01)" in out.stderr, out.stderr
    assert not (tmp_path / "results").exists()


# Trials long enough, one at a time, for a signal to land mid-search.
SLOW = {
    **SEARCH,
    "train": {**SEARCH["train"], "steps": 60},
    "execution": {"max_concurrent": 1, "retries": 0},
}


@pytest.mark.ray
def test_ctrl_c_stops_a_search_on_ray(tmp_path, sweep_cli, ray_address):
    grid = write_grid(tmp_path, SLOW)
    trials_dir = tmp_path / "results" / "tiny" / "trials"
    # one interrupt, early: the search must end there, not plan its next round
    assert signal_once_stored(grid, ray_address, trials_dir, 2, signal.SIGINT) == 130
    assert len(list(trials_dir.glob("*.parquet"))) < BUDGET


@pytest.mark.ray
def test_a_killed_search_resumes_without_repeating_a_stored_trial(tmp_path, sweep_cli, ray_address):
    grid = write_grid(tmp_path, SLOW)
    trials_dir = tmp_path / "results" / "tiny" / "trials"
    signal_once_stored(grid, ray_address, trials_dir, 10, signal.SIGKILL)
    kept = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("*.parquet")}
    assert 10 <= len(kept) < BUDGET, "the kill should land mid-search"

    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    after = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("*.parquet")}
    assert len(after) == BUDGET
    assert all(after[name] == mtime for name, mtime in kept.items()), "a stored trial ran again"
