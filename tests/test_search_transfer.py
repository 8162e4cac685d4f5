"""Transfer search (search: {method: transfer}): the smallest width over its range, each wider
one around the predicted lr*, widening on an edge or against divergence, refining until the
interval is narrow enough; planted curves give the known answer."""

from __future__ import annotations

import math
import random

import pytest
from test_e2e_sweep import TINY, write_grid

from sweeper.orchestrate import SweepError, plan
from sweeper.search import TransferSearch
from sweeper.spec import SpecError, expand, parse_spec
from sweeper.store import Store, TrialResult

WIDTHS = [32, 64, 128]
TRANSFER = {
    **TINY,
    "grid": {
        "width": WIDTHS,
        "batch_size": [4],
        "seed": [0, 1, 2],
        "optimizer": {"adamw": {"lr": {"log2": [-12, -3, 0.5]}}},
    },
    "search": {"method": "transfer", "trials_per_cell": 10, "target_ci": 0.25},
}


def planted(slope: float, cliff: float = 3.0):
    """A bowl in log2 lr with its bottom at 2^-6 at width 32, moving `slope` octaves per
    doubling of width; diverged beyond `cliff` octaves above the bottom; seed noise."""

    def optimum(width: int) -> float:
        return -6 + slope * math.log2(width / 32)

    def loss(trial) -> float:
        x, opt = math.log2(trial.lr), optimum(trial.width)
        if x > opt + cliff:
            return math.nan
        rng = random.Random(f"{trial.seed} {x:.4f} {trial.width}")
        return 2 + 0.05 * (x - opt) ** 2 + 0.01 * trial.seed + 0.004 * rng.gauss(0, 1)

    return optimum, loss


def search_until_done(tmp_path, loss, config=TRANSFER):
    spec = parse_spec({**config, "results": str(tmp_path)})
    store = Store(tmp_path, spec.name)
    search = TransferSearch(spec, expand(spec, "fp"), store)
    seen: set[str] = set()
    rounds = []
    while trials := search.propose():
        ids = {t.trial_id for t in trials}
        assert not ids & seen, "a stored trial was proposed again"
        seen |= ids
        rounds.append(trials)
        for t in trials:
            value = loss(t)
            status = "diverged" if math.isnan(value) else "completed"
            store.write_trial(
                t, TrialResult(status, {"final_val_loss": value, "initial_loss": 5.5})
            )
        assert len(rounds) < 40
    return search, store, rounds


def cell_of(search: TransferSearch, width: int):
    (cell,) = [c for c in search.cells.values() if c.template.width == width]
    return cell, search.optima[id(cell)]


def test_the_smallest_width_is_searched_over_its_range_an_octave_apart(tmp_path):
    _, loss = planted(slope=-1)
    search, _, rounds = search_until_done(tmp_path, loss)
    first = {(t.width, math.log2(t.lr)) for t in rounds[0]}
    assert first == {(32, float(x)) for x in range(-12, -2)}
    assert len(rounds[0]) == 10 * 3  # every lr at every seed


@pytest.mark.parametrize("slope", [-1.0, 0.0, 1.5])
def test_it_follows_the_optimum_across_width_with_fewer_trials(tmp_path, slope):
    optimum, loss = planted(slope)
    search, store, _ = search_until_done(tmp_path, loss)
    for width in WIDTHS:
        cell, row = cell_of(search, width)
        assert row["status"] == "ok"
        assert abs(row["log2_lr_star"] - optimum(width)) < 0.25
        assert row["ci_lo"] <= optimum(width) <= row["ci_hi"]
        assert len(cell.stored) <= 10
    dense = 19 * 3 * 3  # the half-octave grid, every width, every seed
    assert len(store.trial_ids()) < dense / 2


def test_a_window_on_an_edge_widens_until_the_optimum_is_inside(tmp_path):
    # Width 64's optimum is two octaves below width 32's: the first window (-7, -6, -5),
    # centred on width 32's lr*, has it beyond its low edge.
    optimum, loss = planted(slope=-2)
    search, _, rounds = search_until_done(tmp_path, loss)
    at_64 = [sorted({math.log2(t.lr) for t in r}) for r in rounds if r[0].width == 64]
    low, centre, high = at_64[0]
    assert abs(centre + 6) < 0.1 and (low, high) == (centre - 1, centre + 1)
    assert at_64[1] == [low - 1]  # beyond the low edge, one step further
    cell, row = cell_of(search, 64)
    assert min(cell.stored) < optimum(64) < max(cell.stored)
    assert row["status"] == "ok" and abs(row["log2_lr_star"] - optimum(64)) < 0.25


def test_an_optimum_against_divergence_is_closed_in_on(tmp_path):
    # Diverged half an octave above the bottom: the design's best lr sits next to the cliff,
    # and the search splits the gap to it.
    _, loss = planted(slope=0, cliff=0.5)
    roomy = {**TRANSFER, "search": {**TRANSFER["search"], "trials_per_cell": 14}}
    search, _, rounds = search_until_done(tmp_path, loss, roomy)
    at_32 = [sorted({math.log2(t.lr) for t in r}) for r in rounds if r[0].width == 32]
    assert at_32[1] == [-5.5]  # halfway from the best lr to the first diverged one
    cell, row = cell_of(search, 32)
    assert row["status"] == "ok" and abs(row["log2_lr_star"] + 6) < 0.25


def test_it_stops_at_its_budget_when_the_interval_stays_wide(tmp_path):
    noisy = {**TRANSFER, "search": {**TRANSFER["search"], "target_ci": 0.01}}
    _, loss = planted(slope=0)
    search, store, _ = search_until_done(tmp_path, loss, noisy)
    assert all(len(c.stored) <= 10 for c in search.cells.values())
    assert len(store.trial_ids()) <= 3 * 10 * 3


def test_a_budget_below_the_first_design_is_refused(tmp_path):
    small = {
        **TRANSFER,
        "results": str(tmp_path),
        "search": {"method": "transfer", "trials_per_cell": 5},
    }
    with pytest.raises(SweepError, match="trials_per_cell 5 is fewer than the 10 lrs"):
        plan(parse_spec(small), allow_missing_data=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "search",
    [
        {"method": "transfer", "sampler": "tpe"},
        {"method": "optuna", "target_ci": 0.1},
        {"trials_per_cell": 5},
        {"method": "transfer", "target_ci": 0},
        {"method": "transfer", "axis": "lr"},
    ],
)
def test_settings_of_another_method_are_refused(search):
    with pytest.raises(SpecError):
        parse_spec({**TRANSFER, "search": search})


def test_a_transfer_search_runs_then_reruns_nothing(tmp_path, sweep_cli):
    tiny = {
        **TINY,
        "train": {**TINY["train"], "steps": 12, "log_every": 4, "eval_every": 6},
        "grid": {**TRANSFER["grid"], "width": [32, 64], "seed": [0, 1]},
        "search": {"method": "transfer", "trials_per_cell": 12},
    }
    grid = write_grid(tmp_path, tiny)
    dry = sweep_cli("run", str(grid), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "transfer along width" in dry.stdout and "at most 48 trials" in dry.stdout
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0, out.stderr
    store = Store(tmp_path / "results", "tiny")
    n = len(store.trial_ids())
    assert 2 * 10 + 2 * 3 <= n <= 48
    again = sweep_cli("run", str(grid), "--executor", "local")
    assert again.returncode == 0 and f"{n} already stored, 0 to run" in again.stdout
    assert len(store.trial_ids()) == n
    status = sweep_cli("status", str(grid))
    assert status.returncode == 0 and f"{n} stored" in status.stdout
    assert "search: done" in status.stdout


def test_grid_lrs_off_the_lattice_are_run_as_given_and_found_again(tmp_path):
    # 3e-4, 1e-3, ...: between lattice points, and more than an octave apart (the design)
    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    config = {
        **TRANSFER,
        "grid": {**TRANSFER["grid"], "optimizer": {"adamw": {"lr": lrs}}},
        "search": {"method": "transfer", "trials_per_cell": 8},
    }
    _, loss = planted(slope=-1)
    search, store, rounds = search_until_done(tmp_path, loss, config)
    assert sorted({t.lr for t in rounds[0]}) == lrs
    cell, row = cell_of(search, 32)
    assert row["status"] == "ok" and len(cell.stored) <= 8


def test_batch_size_lines_ignore_the_steps_it_sets(tmp_path):
    config = {
        **TRANSFER,
        "train": {**TINY["train"], "tokens": 32 * 32 * 6},
        "grid": {**TRANSFER["grid"], "width": [32], "batch_size": [4, 8]},
        "search": {"method": "transfer", "axis": "batch_size", "trials_per_cell": 10},
    }
    config["train"].pop("steps", None)
    spec = parse_spec({**config, "results": str(tmp_path)})
    search = TransferSearch(spec, expand(spec, "fp"), Store(tmp_path, spec.name))
    assert [[c.template.batch_size for c in line] for line in search.lines] == [[4, 8]]


def test_asha_with_the_transfer_search_is_refused():
    with pytest.raises(SpecError, match="scheduler asha with search.method transfer"):
        parse_spec({**TRANSFER, "execution": {"scheduler": "asha"}})


def test_a_first_round_cut_short_resumes_with_the_rest_of_it(tmp_path):
    spec = parse_spec({**TRANSFER, "results": str(tmp_path)})
    store = Store(tmp_path, spec.name)
    search = TransferSearch(spec, expand(spec, "fp"), store)
    first = search.propose()
    _, loss = planted(slope=-1)
    done = [t for t in first if math.log2(t.lr) <= -9]  # the kill came after three lrs
    for t in done:
        store.write_trial(
            t, TrialResult("completed", {"final_val_loss": loss(t), "initial_loss": 5.5})
        )
    again = search.propose()
    assert {t.trial_id for t in again} == {t.trial_id for t in first} - {t.trial_id for t in done}
