"""Adaptive search: each cell's lrs chosen by a planner instead of the whole grid.

A planner beside `plan()`: it turns what the store holds into the next trials to run, one round
at a time, and the orchestrator runs each round like a small grid. The store stays the one
record: every round the plan is rebuilt from the stored trials, so a search interrupted at any
moment resumes where the store stands and never trains a stored trial again. (A study kept in
its own database could disagree with the store after a kill, a trial told but never stored or
stored but never told; rebuilding also leaves no SQLite file for two writers to lock.)

The candidates are the grid's own lrs. The grid file says which lrs a cell may take and, by its
step, how finely its optimum can be located; a search runs the part of that grid that decides
the optimum. A trial a search runs is the grid's trial, with the grid's id, so a search and the
grid it stands in for share their trials, and where a search ran the points the analysis' fit
of the whole grid would use, its answer is the grid's. (A cell is everything but lr and seed.)

- `OptunaSearch`: one Optuna study per cell over the cell's grid lrs, starting from a few spread
  evenly over them, `batch` lrs a round (with bundles, at least a bundle's worth). Each lr runs
  at every seed; the study sees the mean over seeds of the final validation loss, a diverged
  seed counting as its initial loss (a run that blew up did no better than not training), one
  that ASHA stopped as its best validation loss before the stop.
- `TransferSearch`: the telescoping search of a transfer study. The cells of a line (equal but
  for the transfer axis, width say) are searched in order of it: the smallest scanned over its
  whole grid range, each larger one around the lr* the smaller ones predict. Around a cell's
  best lr it runs the points the analysis' fit uses (`analysis.location`'s window), with the
  seeds where they tell the most; where the optimum lies, and how sure, is read from the
  analysis' own fit (`analysis.find_optima`), so the search stops where the report's interval
  is as narrow as asked.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

from sweeper.spec import SweepSpec, TrialSpec
from sweeper.store import Store

# A point's key: log2 lr rounded to 1/16 octave, so that a point reached twice (a grid lr, a step
# beyond the grid's end) is one key.
LATTICE = 16
LOWEST, HIGHEST = -40.0, 20.0  # the lrs a grid accepts, log2


class SearchError(ValueError):
    """A search that cannot start as configured; the message says what to change."""


def _key(log2_lr: float) -> float:
    return round(log2_lr * LATTICE) / LATTICE


@dataclass
class _Cell:
    template: TrialSpec  # any trial of the cell: the others differ in lr and seed only
    seeds: list[int]
    grid: list[float]  # the grid's own lrs (log2 keys, ascending, at least two)
    # A point's lr where it is not 2^point: a grid lr between two keys (3e-3, say) runs as
    # given, and a trial stored at one is found again under its own id.
    exact: dict[float, float] = field(default_factory=dict)
    # log2 lr -> seed -> the seed's value (None: the trial failed)
    stored: dict[float, dict[int, float | None]] = field(default_factory=dict)
    diverged: set[float] = field(default_factory=set)  # points where a seed diverged

    @property
    def n_trials(self) -> int:
        return sum(len(seeds) for seeds in self.stored.values())

    def trial(self, log2_lr: float, seed: int) -> TrialSpec:
        lr = self.exact.get(log2_lr, 2.0**log2_lr)
        return self.template.model_copy(update={"lr": lr, "seed": seed})

    def missing(self, log2_lr: float, n_seeds: int) -> list[int]:
        """The seeds to add at a point so that it holds `n_seeds` (the grid's first ones)."""
        have = self.stored.get(log2_lr, {})
        free = [s for s in self.seeds if s not in have]
        return free[: max(0, min(n_seeds, len(self.seeds)) - len(have))]

    def candidates(self, lo: float, hi: float) -> list[float]:
        """The points in [lo, hi]: the grid's lrs, and beyond its ends the grid's end steps
        continued (a window that follows an optimum out of the range keeps the grid's step)."""
        eps = 1e-9
        lo, hi = max(lo, LOWEST), min(hi, HIGHEST)
        points = {x for x in self.grid if lo - eps <= x <= hi + eps}
        for end, step in ((self.grid[0], self.grid[0] - self.grid[1]),
                          (self.grid[-1], self.grid[-1] - self.grid[-2])):  # fmt: skip
            near, far = sorted(((lo - end) / step, (hi - end) / step))  # steps from the end
            for k in range(max(1, math.ceil(near - eps)), math.floor(far + eps) + 1):
                points.add(_key(end + k * step))
        return sorted(points)

    def value(self, log2_lr: float) -> float | None:
        """The study's objective at a point: the mean over its seeds that did not fail."""
        values = [v for v in self.stored.get(log2_lr, {}).values() if v is not None]
        return sum(values) / len(values) if values else None


Wanted = dict[float, int]  # point -> how many seeds it should hold


class Search:
    """What the planners share: the cells of the grid, what the store holds of them, and the
    trials of the next round."""

    def __init__(self, spec: SweepSpec, grid_trials: list[TrialSpec], store: Store):
        self.settings = spec.search
        self.bundle = spec.bundle_size
        self.store = store
        self.n_stored = 0  # trials of the search's cells in the store, as last read
        groups: dict[str, list[TrialSpec]] = defaultdict(list)
        for t in grid_trials:
            groups[t.cell].append(t)
        self.cells = {}
        for key, members in groups.items():
            exact = {_key(math.log2(t.lr)): t.lr for t in members}
            if len(exact) < 2:
                t = members[0]
                raise SearchError(
                    f"search.method {spec.search.method} searches a range of lrs, but the "
                    f"{t.optimizer} cell at width {t.width} has one lr ({t.lr:g}): give its "
                    "lowest and highest, e.g. lr: {log2: [-12, -3, 0.5]}"
                )
            self.cells[key] = _Cell(
                template=members[0],
                seeds=sorted({t.seed for t in members}),
                grid=sorted(exact),
                exact=exact,
            )

    def budget(self, cell: _Cell) -> int:
        """The most trials a cell may hold: trials_per_cell lrs' worth at every seed."""
        return self.settings.trials_per_cell * len(cell.seeds)

    @property
    def max_trials(self) -> int:
        """The most trials the search's cells will hold: their budgets, or what the store
        already holds there (an earlier grid run's, say) where more."""
        return sum(max(self.budget(c), c.n_trials) for c in self.cells.values())

    def _read_store(self) -> set[str]:
        """Fill each cell's stored points; returns the ids of failed trials."""
        tbl = self.store.read(
            "trials",
            ["trial_id", "status", "final_val_loss", "best_val_loss", "initial_loss", "spec"],
        )
        for cell in self.cells.values():
            cell.stored, cell.diverged = {}, set()
        failed = set()
        self.n_stored = 0
        columns = tbl.to_pydict().values()
        for tid, status, final, best, initial, spec_json in zip(*columns, strict=True):
            trial = TrialSpec.model_validate_json(spec_json)
            cell = self.cells.get(trial.cell)
            if cell is None or trial.seed not in cell.seeds:
                continue
            point = _key(math.log2(trial.lr))
            if status == "failed":
                failed.add(tid)
                value = None
            elif status == "stopped":  # by ASHA: its best so far, worse than it would reach
                value = best if best is not None else initial
            else:
                value = final if status == "completed" and final is not None else initial
            if status == "diverged":
                cell.diverged.add(point)
            cell.exact.setdefault(point, trial.lr)
            cell.stored.setdefault(point, {})[trial.seed] = value
            self.n_stored += 1
        return failed

    def propose(self, retry_failed: bool = False) -> list[TrialSpec]:
        """The trials of the next round: empty when the search is done.

        A failed trial counts as done within a run (so a broken setting cannot loop forever);
        with retry_failed (a run's first round) it is proposed again, as a grid run retries it.
        """
        failed = self._read_store()
        out: list[TrialSpec] = []
        for cell, wanted in self._next_points():
            room = self.budget(cell) - cell.n_trials
            trials = [cell.trial(x, s) for x, n in wanted.items() for s in cell.missing(x, n)]
            out += trials[: max(room, 0)]
        if retry_failed:
            for cell in self.cells.values():
                out += [
                    t
                    for x, seeds in cell.stored.items()
                    for s in seeds
                    if (t := cell.trial(x, s)).trial_id in failed
                ]
        return out

    def _next_points(self) -> list[tuple[_Cell, Wanted]]:
        """Per cell, the points of the next round and the seeds each should hold, in order of
        priority (a budget cuts the list short)."""
        raise NotImplementedError

    def shortfall(self) -> str:
        """What a finished search did not reach, in words ("" when nothing)."""
        return ""


class OptunaSearch(Search):
    """An Optuna study per cell, `trials_per_cell` of its grid lrs, each at every seed."""

    def _next_points(self) -> list[tuple[_Cell, Wanted]]:
        every = {id(c): len(c.seeds) for c in self.cells.values()}
        return [
            (cell, dict.fromkeys(self._next_in(cell), every[id(cell)]))
            for cell in self.cells.values()
        ]

    def _next_in(self, cell: _Cell) -> list[float]:
        if pending := [x for x in cell.stored if cell.missing(x, len(cell.seeds))]:
            return pending  # a round cut short is finished first
        n = self.settings.trials_per_cell
        # With bundles, a round proposes at least a bundle's worth of lrs: they train as one.
        batch = max(self.settings.batch, self.bundle // len(cell.seeds))
        want = min(batch, n - len(cell.stored))
        points = [x for x in self._design(cell) if x not in cell.stored][: max(want, 0)]
        if len(points) < want:
            points += self._ask(cell, want - len(points), taken=set(points))
        return points

    def _design(self, cell: _Cell) -> list[float]:
        """The first points: evenly over the grid's lrs, ends first, then the middle, then the
        quarters; about half the budget (3 to 5 points), the rest left to the sampler."""
        last = len(cell.grid) - 1
        k = min(5, max(3, math.ceil(self.settings.trials_per_cell / 2)), last + 1)
        even = [cell.grid[round(last * j / (k - 1))] for j in range(k)]
        order = [0, k - 1, (k - 1) // 2, *range(1, k - 1)]
        return list(dict.fromkeys(even[j] for j in order))

    def _ask(self, cell: _Cell, n: int, taken: set[float]) -> list[float]:
        import optuna
        from optuna.distributions import IntDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # The grid's lrs by their index: the sampler's notion of near is the grid's.
        space = {"lr_index": IntDistribution(0, len(cell.grid) - 1)}
        index = {x: i for i, x in enumerate(cell.grid)}
        study = optuna.create_study(direction="minimize", sampler=self._sampler(len(cell.stored)))
        for x in cell.stored:
            if x in index and (value := cell.value(x)) is not None and math.isfinite(value):
                study.add_trial(
                    create_trial(params={"lr_index": index[x]}, distributions=space, value=value)
                )
        points: list[float] = []
        for _ in range(50 * n):
            trial = study.ask(space)
            x = cell.grid[trial.params["lr_index"]]
            if x in cell.stored or x in taken or x in points:
                # Known already: tell the sampler what it is, so that it moves on.
                value = cell.value(x)
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
                continue
            points.append(x)
            if len(points) == n:
                break
        return points

    def _sampler(self, n_stored: int):  # noqa: ANN202
        import optuna

        # Seeded by how far the search is, so a resumed search proposes what it would have.
        seed = 1000 + n_stored
        if self.settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # The design above replaces TPE's default 10 random points, most of a cell's budget.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, constant_liar=True)


# Transfer search, in octaves of lr. The smallest cell's scan: its grid lrs about SCAN_STEP apart,
# at one seed. Around a cell's best lr, the points the analysis' fit takes (FIT_WINDOW either
# side): near the best lr, where the curve is flat and the seeds' noise decides which lr is
# best, every grid lr with every seed; further out, where the curve rises by much more than that
# noise and one seed tells where it rises, fewer seeds and, beyond `dense`, a point every
# RING_STEP. TIERS gives per level the distances (every, most, dense) within which a point holds
# every seed, every seed but one, and within which every grid lr is taken (the best lr's
# nearest neighbours always hold every seed). A cell whose interval is wider than target_ci goes
# up a level; the last is the whole window at every seed, the grid's own fit.
SCAN_STEP = 2.0
FIT_WINDOW = 2.0  # analysis.location.WINDOW_OCTAVES, which the sweeper does not import
RING_STEP = 1.0
TIERS = ((0.5, 1.0, 1.0), (1.0, 2.0, 2.0), (2.0, 2.0, 2.0))


class TransferSearch(Search):
    """Telescoping search along one axis (width, say), line by line.

    A line is the cells that differ only in the axis; its cells are searched smallest first,
    one at a time, each until the fit's window around its best lr holds the seeds its level
    asks for and the interval is within +-target_ci (or the window is whole, or the cell's
    budget spent). The lines run side by side.
    """

    def __init__(self, spec: SweepSpec, grid_trials: list[TrialSpec], store: Store):
        super().__init__(spec, grid_trials, store)
        axis = self.settings.axis
        # What moves with the axis is not what tells lines apart: a batch size sets the steps
        # (with train.tokens) and the passes per step (with train.micro_batch).
        follows = {"batch_size": {"steps", "grad_accum"}}.get(axis, set())
        lines: dict[str, list[_Cell]] = defaultdict(list)
        for cell in self.cells.values():
            rest = cell.template.model_dump(
                mode="json", exclude={"lr", "seed", "sweep", "device", axis, *follows}
            )
            lines[json.dumps(rest, sort_keys=True)].append(cell)
        self.lines = [
            sorted(cells, key=lambda c: getattr(c.template, axis)) for cells in lines.values()
        ]
        for line in self.lines:
            cell = line[0]
            scan = self._scan(cell)
            window = self._tiers(cell, cell.grid[len(cell.grid) // 2], 0)
            need = sum({**scan, **window}.values())
            if need > self.budget(cell):
                n = len(cell.seeds)
                raise SearchError(
                    f"search.trials_per_cell {self.settings.trials_per_cell} gives a cell "
                    f"{self.budget(cell)} trials ({n} seed{'s' * (n != 1)} each), fewer than "
                    f"the {need} that the smallest {axis}'s scan of 2^{cell.grid[0]:g}..2^"
                    f"{cell.grid[-1]:g} and the fit's window around its best lr take: raise it "
                    f"to {math.ceil(need / n)}, or narrow the range"
                )
        self.optima: dict[int, dict] = {}  # id(cell) -> the analysis' row for it, as last read

    @property
    def expected_trials(self) -> int:
        """The trials the search takes when every wider cell's optimum is where the smaller
        ones predict and no cell goes up a level: each line's scan, and a window per cell."""
        total = 0
        for line in self.lines:
            for k, cell in enumerate(line):
                wanted = self._tiers(cell, cell.grid[len(cell.grid) // 2], 0)
                if k == 0:  # the window takes the scan's points in it to its seeds
                    wanted = {**self._scan(cell), **wanted}
                total += sum(wanted.values())
        return total

    def _scan(self, cell: _Cell) -> Wanted:
        """The smallest cell's first points, at one seed: its lowest grid lr, each next one
        about SCAN_STEP further, and its highest unless the last is within half a step of it
        (the window around the best lr moves up to it, should the curve still fall there)."""
        points = [cell.grid[0]]
        for x in cell.grid[1:]:
            if x - points[-1] >= SCAN_STEP - 1e-9:
                points.append(x)
        if cell.grid[-1] - points[-1] > SCAN_STEP / 2 + 1e-9:
            points.append(cell.grid[-1])
        return dict.fromkeys(points, 1)

    def _tiers(self, cell: _Cell, best: float, level: int) -> Wanted:
        """The fit's window around `best` and the seeds each of its points should hold, nearest
        first. A side ends before its first diverged point (further out diverges too)."""
        n = len(cell.seeds)
        every, most, dense = TIERS[level]
        eps = 1e-9
        # (best may be off the candidates: a point stored by a grid of another step)
        window = sorted({*cell.candidates(best - FIT_WINDOW, best + FIT_WINDOW), best})
        i = window.index(best)
        wanted = {best: n}
        for side in (window[i + 1 :], window[:i][::-1]):
            last = best
            for j, x in enumerate(side):
                if x in cell.diverged:  # known already: no seed adds to a diverged point
                    break
                d = abs(x - best)
                if j == 0 or d <= dense + eps or abs(x - last) >= RING_STEP - eps:
                    wanted[x] = n if j == 0 or d <= every + eps else n - 1 if d <= most + eps else 1
                    last = x
        return dict(sorted(wanted.items(), key=lambda kv: (abs(kv[0] - best), kv[0])))

    def _next_points(self) -> list[tuple[_Cell, Wanted]]:
        if any(cell.stored for cell in self.cells.values()):
            self._read_optima()
        out = []
        for line in self.lines:
            for k, cell in enumerate(line):
                if wanted := self._next_in(line, k):
                    out.append((cell, wanted))
                    break
        return out

    def _next_in(self, line: list[_Cell], k: int) -> Wanted:
        """The cell's next points; empty when it is settled."""
        cell = line[k]
        if self.budget(cell) <= cell.n_trials:
            return {}
        # The cell's first points, all of them before any other: a run stopped in the middle of
        # them resumes with the rest (recomputed: the smaller cells they follow are settled).
        first = self._scan(cell) if k == 0 else self._first_window(line[:k], cell)
        held = {(x, s) for x, seeds in cell.stored.items() for s in seeds}
        firsts = {(x, s) for x, n in first.items() for s in cell.seeds[:n]}
        if held < firsts:
            return first
        row = self.optima.get(id(cell))
        if row is None or row["status"] == "no_data":  # nothing usable: every trial failed
            return {}
        if row["status"] == "all_diverged":  # look below, as far again as what was tried
            xs = sorted(cell.stored)
            step = max(SCAN_STEP, xs[-1] - xs[0])
            below = cell.candidates(xs[0] - step - FIT_WINDOW, xs[0] - step)
            return {below[-1]: 1} if below else {}
        best = _key(row["argmin_log2_lr"])
        for level in range(len(TIERS)):
            wanted = self._tiers(cell, best, level)
            if any(cell.missing(x, n) for x, n in wanted.items()):
                return wanted
            # The window holds what this level asks; the next only for an interval too wide.
            if row["status"] != "ok" or row["noise"] == "none":
                return {}
            if row["half_width"] <= self.settings.target_ci:
                return {}
        return {}

    def shortfall(self) -> str:
        """The cells without an interval within +-target_ci (as last read), and how many of
        them stopped at their budget rather than at the grid's resolution."""
        target = self.settings.target_ci
        wide = [
            c
            for c in self.cells.values()
            if not ((row := self.optima.get(id(c))) and row["half_width"] <= target)
        ]
        if not wide:
            return ""
        spent = sum(c.n_trials >= self.budget(c) for c in wide)
        return (
            f"{len(wide)} of {len(self.cells)} cells have no interval within +-{target:g} "
            f"octave ({spent} stopped at trials_per_cell; the report says why for each)"
        )

    def _first_window(self, smaller: list[_Cell], cell: _Cell) -> Wanted:
        """The fit's window (level 0) around the lr* the smaller cells predict for `cell`: the
        line through their optima (log2 lr* vs log2 of the axis) at this cell, or the one
        optimum itself (no drift assumed until two cells measure it); the nearest smaller
        cell's best lr where none has an interior optimum; a scan where none has a best lr."""
        axis = self.settings.axis
        known = [
            (math.log2(getattr(c.template, axis)), row["log2_lr_star"])
            for c in smaller
            if (row := self.optima.get(id(c))) and row["status"] == "ok"
        ]
        if len(known) >= 2:
            a = [u for u, _ in known]
            b = [v for _, v in known]
            ma, mb = sum(a) / len(a), sum(b) / len(b)
            sxx = sum((u - ma) ** 2 for u in a)
            slope = sum((u - ma) * (v - mb) for u, v in known) / sxx if sxx else 0.0
            centre = mb + slope * (math.log2(getattr(cell.template, axis)) - ma)
        elif known:
            centre = known[0][1]
        else:
            rows = [r for c in smaller if (r := self.optima.get(id(c)))]
            best = [r["argmin_log2_lr"] for r in rows if math.isfinite(r["argmin_log2_lr"])]
            if not best:  # nothing learnt from the smaller cells: scan this one afresh
                return self._scan(cell)
            centre = best[-1]
        # The candidate nearest the prediction.
        near = cell.candidates(centre - FIT_WINDOW, centre + FIT_WINDOW)
        if not near:
            return self._scan(cell)
        return self._tiers(cell, min(near, key=lambda x: (abs(x - centre), x)), 0)

    def _read_optima(self) -> None:
        """Each cell's optimum as the analysis fits it from the store, as the report would."""
        from analysis import find_optima, load_results

        results = load_results(self.store.location)
        optima = find_optima(results)
        analysis_cell = dict(zip(results.trials["trial_id"], results.trials["cell"], strict=True))
        rows = {int(r["cell"]): r for r in optima.table.to_dict("records")}
        self.optima = {}
        for cell in self.cells.values():
            ids = (cell.trial(x, s).trial_id for x, seeds in cell.stored.items() for s in seeds)
            found = next((analysis_cell[t] for t in ids if t in analysis_cell), None)
            if found is None or int(found) not in rows:
                continue
            row = rows[int(found)]
            row["half_width"] = (row["ci_hi"] - row["ci_lo"]) / 2
            self.optima[id(cell)] = row


def make_search(spec: SweepSpec, grid_trials: list[TrialSpec], store: Store) -> Search | None:
    """The planner of `spec.search.method`; None for the plain grid. Raises SearchError."""
    planners = {"optuna": OptunaSearch, "transfer": TransferSearch}
    planner = planners.get(spec.search.method)
    return planner(spec, grid_trials, store) if planner else None
