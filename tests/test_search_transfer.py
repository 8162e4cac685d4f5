"""Transfer search (search: {method: transfer}): the smallest width scanned at one seed, each
wider one around the predicted lr*, the fit's window around each best lr with every seed near it
and fewer further out, following the optimum and adding seeds until the interval is narrow
enough; all on the grid's own lrs. Planted curves give the known answer."""

from __future__ import annotations

import math
import random

import pytest
from test_e2e_sweep import TINY, write_grid

from analysis import find_optima, load_results
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
DENSE = 19 * 3 * 3  # the half-octave grid: every lr, width and seed


def planted(slope: float, cliff: float = 3.0, noise: float = 0.004):
    """A bowl in log2 lr with its bottom at 2^-6 at width 32, moving `slope` octaves per
    doubling of width; diverged beyond `cliff` octaves above the bottom; seed noise."""

    def optimum(width: int) -> float:
        return -6 + slope * math.log2(width / 32)

    def loss(trial) -> float:
        x, opt = math.log2(trial.lr), optimum(trial.width)
        if x > opt + cliff:
            return math.nan
        rng = random.Random(f"{trial.seed} {x:.4f} {trial.width}")
        return 2 + 0.05 * (x - opt) ** 2 + 0.01 * trial.seed + noise * rng.gauss(0, 1)

    return optimum, loss


def store_trials(store: Store, trials, loss) -> None:
    for t in trials:
        value = loss(t)
        status = "diverged" if math.isnan(value) else "completed"
        store.write_trial(t, TrialResult(status, {"final_val_loss": value, "initial_loss": 5.5}))


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
        store_trials(store, trials, loss)
        assert len(rounds) < 40
    return search, store, rounds


def cell_of(search: TransferSearch, width: int):
    (cell,) = [c for c in search.cells.values() if c.template.width == width]
    return cell, search.optima[id(cell)]


def seeds_at(cell) -> dict[float, int]:
    return {x: len(seeds) for x, seeds in sorted(cell.stored.items())}


def test_the_smallest_width_is_scanned_over_its_range_at_one_seed(tmp_path):
    _, loss = planted(slope=-1)
    search, _, rounds = search_until_done(tmp_path, loss)
    first = {(t.width, math.log2(t.lr), t.seed) for t in rounds[0]}
    assert first == {(32, float(x), 0) for x in (-12, -10, -8, -6, -4)}  # -3: a step short


def test_around_the_best_lr_every_seed_near_it_and_fewer_further_out(tmp_path):
    # Width 64 with no drift: its first window is centred on width 32's optimum, -6.
    optimum, loss = planted(slope=0, noise=0.0)
    search, _, _ = search_until_done(tmp_path, loss, {**TRANSFER, "search": {
        "method": "transfer", "trials_per_cell": 10, "target_ci": 8}})  # fmt: skip
    cell, row = cell_of(search, 64)
    assert seeds_at(cell) == {-8: 1, -7: 2, -6.5: 3, -6: 3, -5.5: 3, -5: 2, -4: 1}
    assert row["status"] == "ok" and abs(row["log2_lr_star"] + 6) < 0.1


@pytest.mark.parametrize("slope", [-1.0, 0.0, 1.5])
def test_it_follows_the_optimum_across_width_with_fewer_trials(tmp_path, slope):
    optimum, loss = planted(slope)
    search, store, _ = search_until_done(tmp_path, loss)
    for width in WIDTHS:
        cell, row = cell_of(search, width)
        assert row["status"] == "ok"
        assert abs(row["log2_lr_star"] - optimum(width)) < 0.25
        assert row["ci_lo"] <= optimum(width) <= row["ci_hi"]
        assert cell.n_trials <= 10 * 3
    assert len(store.trial_ids()) < DENSE / 2


def test_a_window_off_the_optimum_follows_it_beyond_its_edge(tmp_path):
    # Width 64's optimum is two octaves below width 32's: the first window, centred on width
    # 32's lr*, has its best lr on its low edge; the window moves down, past it.
    optimum, loss = planted(slope=-2)
    search, _, rounds = search_until_done(tmp_path, loss)
    at_64 = [sorted({math.log2(t.lr) for t in r}) for r in rounds if r[0].width == 64]
    assert min(at_64[0]) == -8 and max(at_64[0]) == -4  # two octaves either side of -6
    assert min(at_64[1]) < -8  # then further down than the first window went
    cell, row = cell_of(search, 64)
    assert min(cell.stored) <= optimum(64) - 2 and row["status"] == "ok"
    assert abs(row["log2_lr_star"] - optimum(64)) < 0.25


def test_the_window_follows_an_optimum_out_of_the_grid_range_on_its_step(tmp_path):
    # Width 128's optimum, 2^-12.5, is below the grid's lowest lr (2^-12).
    optimum, loss = planted(slope=-3.25)
    search, _, _ = search_until_done(tmp_path, loss)
    cell, row = cell_of(search, 128)
    below = [x for x in cell.stored if x < -12]
    assert below and all(x * 2 == int(x * 2) for x in below)  # the grid's half-octave step
    assert row["status"] == "ok" and abs(row["log2_lr_star"] - optimum(128)) < 0.25


def test_nothing_runs_at_or_beyond_an_lr_once_it_diverged(tmp_path):
    # Diverged from 1 octave above the bottom: each window's high side ends before the first
    # lr known to diverge, which gets no more seeds.
    _, loss = planted(slope=0, cliff=0.75)
    search, _, rounds = search_until_done(tmp_path, loss)
    diverged: dict[int, float] = {}  # width -> lowest lr seen diverging so far
    for trials in rounds:
        for t in trials:
            if t.width in diverged:
                assert math.log2(t.lr) < diverged[t.width]
        for t in trials:
            if math.isnan(loss(t)):
                diverged[t.width] = min(diverged.get(t.width, 99), math.log2(t.lr))
    for width in WIDTHS:
        _, row = cell_of(search, width)
        assert row["status"] == "ok" and abs(row["log2_lr_star"] + 6) < 0.25


def test_with_a_narrow_target_the_window_becomes_the_grids_own_fit(tmp_path):
    # Every seed at every grid lr the fit uses: the search's lr*s are the dense grid's.
    narrow = {
        **TRANSFER,
        "search": {"method": "transfer", "trials_per_cell": 14, "target_ci": 0.01},
    }
    _, loss = planted(slope=-1, noise=0.02)
    search, store, _ = search_until_done(tmp_path / "search", loss, narrow)
    spec = parse_spec({**TRANSFER, "results": str(tmp_path / "dense")})
    dense = Store(tmp_path / "dense", spec.name)
    store_trials(dense, expand(spec, "fp"), loss)
    searched = find_optima(load_results(store.location)).table.set_index("width")
    full = find_optima(load_results(dense.location)).table.set_index("width")
    assert (searched.log2_lr_star == full.log2_lr_star).all()
    for width in WIDTHS:
        cell, row = cell_of(search, width)
        window = [x for x in cell.stored if abs(x - row["argmin_log2_lr"]) <= 2]
        assert len(window) == 9 and all(len(cell.stored[x]) == 3 for x in window)
    assert len(store.trial_ids()) < DENSE


def test_a_cell_stops_at_its_budget_when_the_interval_stays_wide(tmp_path):
    noisy = {**TRANSFER, "search": {**TRANSFER["search"], "target_ci": 0.01}}
    _, loss = planted(slope=0, noise=0.05)
    search, store, _ = search_until_done(tmp_path, loss, noisy)
    assert all(c.n_trials <= 10 * 3 for c in search.cells.values())
    assert len(store.trial_ids()) <= 3 * 10 * 3
    spent = sum(c.n_trials == 10 * 3 for c in search.cells.values())
    assert spent and search.shortfall() == (
        f"3 of 3 cells have no interval within +-0.01 octave ({spent} stopped at "
        "trials_per_cell; the report says why for each)"
    )


def test_a_budget_below_the_scan_and_one_window_is_refused(tmp_path):
    small = {
        **TRANSFER,
        "results": str(tmp_path),
        "search": {"method": "transfer", "trials_per_cell": 4},
    }
    with pytest.raises(SweepError, match=r"trials_per_cell 4 gives a cell 12 trials .* raise it"):
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
    assert "of the grid's 76" in dry.stdout
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0, out.stderr
    store = Store(tmp_path / "results", "tiny")
    n = len(store.trial_ids())
    assert 6 + 2 * 3 <= n <= 48
    assert f"{n}/{n}" in out.stdout and "/48" not in out.stdout  # the bar ends full
    again = sweep_cli("run", str(grid), "--executor", "local")
    assert again.returncode == 0 and f"{n} already stored, 0 to run" in again.stdout
    assert len(store.trial_ids()) == n
    status = sweep_cli("status", str(grid))
    assert status.returncode == 0 and f"{n} stored" in status.stdout
    assert "search: done" in status.stdout


def test_grid_lrs_off_the_lattice_are_run_as_given_and_found_again(tmp_path):
    # 3e-4, 1e-3, ...: between lattice points, about 1.7 octaves apart
    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    config = {
        **TRANSFER,
        "grid": {**TRANSFER["grid"], "optimizer": {"adamw": {"lr": lrs}}},
        "search": {"method": "transfer", "trials_per_cell": 8},
    }
    _, loss = planted(slope=-1)
    search, store, rounds = search_until_done(tmp_path, loss, config)
    scan = sorted({t.lr for t in rounds[0]})
    assert scan[0] == lrs[0] and scan[-1] == lrs[-1] and set(scan) <= set(lrs)
    cell, row = cell_of(search, 32)
    assert row["status"] == "ok"
    assert {cell.exact[x] for x in cell.stored} <= set(lrs)  # width 32 stays on the grid
    assert len(store.trial_ids()) == sum(c.n_trials for c in search.cells.values())


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
    done = [t for t in first if math.log2(t.lr) <= -9]  # the kill came after two lrs
    store_trials(store, done, loss)
    again = search.propose()
    assert {t.trial_id for t in again} == {t.trial_id for t in first} - {t.trial_id for t in done}


def test_the_expected_count_is_the_scan_and_a_window_per_cell(tmp_path):
    relaxed = {**TRANSFER, "search": {**TRANSFER["search"], "target_ci": 8}}
    spec = parse_spec({**relaxed, "results": str(tmp_path)})
    search = TransferSearch(spec, expand(spec, "fp"), Store(tmp_path, spec.name))
    # A window: 3 seeds at the best lr and 1/2 octave either side, 2 at 1 octave, 1 at 2 (15).
    # Counted at the grid's middle, 2^-7.5, the scan adds the 4 of its 5 lrs outside it.
    assert search.expected_trials == 3 * 15 + 4
    # With no drift and no noise the wider windows sit where predicted: width 32's holds 3 of
    # the scan's lrs (-8, -6, -4 around -6), the others none.
    _, loss = planted(slope=0, noise=0.0)
    search, store, _ = search_until_done(tmp_path, loss, relaxed)
    assert [cell_of(search, w)[0].n_trials for w in WIDTHS] == [15 + 2, 15, 15]
