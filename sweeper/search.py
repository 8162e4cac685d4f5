"""Adaptive search: each cell's lrs chosen by a planner instead of the whole grid.

A planner beside `plan()`: it turns what the store holds into the next lrs to try, one round at
a time, and the orchestrator runs each round like a small grid. The store stays the one record:
every round the plan is rebuilt from the stored trials, so a search interrupted at any moment
resumes where the store stands and never trains a stored trial again. (A study kept in its own
database could disagree with the store after a kill, a trial told but never stored or stored
but never told; rebuilding also leaves no SQLite file for two writers to lock.)

A cell is everything but lr and seed. Its lrs lie on a 1/16-octave lattice (a point proposed
twice is the same trial), and each runs at every seed of the grid. Two planners:

- `OptunaSearch`: one Optuna study per cell over log2 lr between the lowest and highest lr the
  grid gives the cell, starting from a few points spread evenly over it. The study sees the
  mean over seeds of the final validation loss, a diverged seed counting as its initial loss
  (a run that blew up did no better than not training), one that ASHA stopped as its best
  validation loss before the stop.
- `TransferSearch`: the telescoping search of a transfer study. The cells of a line (equal but
  for the transfer axis, width say) are searched in order of it: the smallest over its whole
  grid range, each larger one near the lr* the smaller ones predict. Where a cell's optimum
  lies, and how sure, is read from the analysis' own fit (`analysis.find_optima`), so the
  search stops where the report's interval is as narrow as asked.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

from sweeper.spec import SweepSpec, TrialSpec
from sweeper.store import Store

LATTICE = 16  # points per octave


class SearchError(ValueError):
    """A search that cannot start as configured; the message says what to change."""


def cell_key(trial: TrialSpec) -> str:
    """Everything that defines a trial's cell: all but lr and seed (and where it runs)."""
    fields = trial.model_dump(mode="json", exclude={"lr", "seed", "sweep", "device"})
    return json.dumps(fields, sort_keys=True)


def _on_lattice(log2_lr: float) -> float:
    return round(log2_lr * LATTICE) / LATTICE


@dataclass
class _Cell:
    template: TrialSpec  # any trial of the cell: the others differ in lr and seed only
    seeds: list[int]
    grid: list[float]  # the grid's own lrs (log2, on the lattice, ascending)
    # A lattice point's lr where it is not 2^point: a grid lr between two lattice points (3e-3,
    # say) runs as given, and a trial stored at one is found again under its own id.
    exact: dict[float, float] = field(default_factory=dict)
    # log2 lr -> seed -> the seed's value (None: the trial failed)
    stored: dict[float, dict[int, float | None]] = field(default_factory=dict)

    @property
    def lo(self) -> float:
        """The cell's lr range in log2, on the lattice: its lowest grid lr..."""
        return self.grid[0]

    @property
    def hi(self) -> float:
        """...and its highest."""
        return self.grid[-1]

    def trial(self, log2_lr: float, seed: int) -> TrialSpec:
        lr = self.exact.get(log2_lr, 2.0**log2_lr)
        return self.template.model_copy(update={"lr": lr, "seed": seed})

    def complete(self, log2_lr: float) -> bool:
        return len(self.stored.get(log2_lr, {})) == len(self.seeds)

    def pending(self) -> list[float]:
        """Points some of whose seeds are not stored: a round cut short."""
        return [x for x in self.stored if not self.complete(x)]

    def value(self, log2_lr: float) -> float | None:
        """The study's objective at a point: the mean over its seeds that did not fail."""
        values = [v for v in self.stored.get(log2_lr, {}).values() if v is not None]
        return sum(values) / len(values) if values else None


class Search:
    """What the planners share: the cells of the grid, what the store holds of them, and the
    trials of the next round."""

    def __init__(self, spec: SweepSpec, grid_trials: list[TrialSpec], store: Store):
        self.settings = spec.search
        self.store = store
        self.n_stored = 0  # trials of the search's cells in the store, as last read
        groups: dict[str, list[TrialSpec]] = defaultdict(list)
        for t in grid_trials:
            groups[cell_key(t)].append(t)
        self.cells = {}
        for key, members in groups.items():
            exact = {_on_lattice(math.log2(t.lr)): t.lr for t in members}
            if len(exact) < 2:
                t = members[0]
                raise SearchError(
                    f"search.method {spec.search.method} searches a range of lrs, but the "
                    f"{t.optimizer} cell at width {t.width} has one lr ({t.lr:g}): give its "
                    "lowest and highest, e.g. lr: {log2: [-12, -3, 1]}"
                )
            self.cells[key] = _Cell(
                template=members[0],
                seeds=sorted({t.seed for t in members}),
                grid=sorted(exact),
                exact=exact,
            )

    @property
    def max_trials(self) -> int:
        """The most trials the search's cells will hold: trials_per_cell lrs each, or the lrs
        the store already holds there (an earlier grid run's, say) where more."""
        n = self.settings.trials_per_cell
        return sum(len(c.seeds) * max(n, len(c.stored)) for c in self.cells.values())

    def _read_store(self) -> set[str]:
        """Fill each cell's stored points; returns the ids of failed trials."""
        tbl = self.store.read(
            "trials",
            ["trial_id", "status", "final_val_loss", "best_val_loss", "initial_loss", "spec"],
        )
        for cell in self.cells.values():
            cell.stored = {}
        failed = set()
        self.n_stored = 0
        columns = tbl.to_pydict().values()
        for tid, status, final, best, initial, spec_json in zip(*columns, strict=True):
            trial = TrialSpec.model_validate_json(spec_json)
            cell = self.cells.get(cell_key(trial))
            if cell is None or trial.seed not in cell.seeds:
                continue
            if status == "failed":
                failed.add(tid)
                value = None
            elif status == "stopped":  # by ASHA: its best so far, worse than it would reach
                value = best if best is not None else initial
            else:
                value = final if status == "completed" and final is not None else initial
            point = _on_lattice(math.log2(trial.lr))
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
        for cell, points in self._next_points():
            out += [
                cell.trial(x, s)
                for x in points
                for s in cell.seeds
                if s not in cell.stored.get(x, {})
            ]
        if retry_failed:
            for cell in self.cells.values():
                out += [
                    t
                    for x, seeds in cell.stored.items()
                    for s in seeds
                    if (t := cell.trial(x, s)).trial_id in failed
                ]
        return out

    def _next_points(self) -> list[tuple[_Cell, list[float]]]:
        """Per cell, the lrs of the next round (a round cut short is finished first)."""
        raise NotImplementedError


class OptunaSearch(Search):
    """An Optuna study per cell, `trials_per_cell` lrs within the cell's grid range."""

    def _next_points(self) -> list[tuple[_Cell, list[float]]]:
        return [(cell, self._next_in(cell)) for cell in self.cells.values()]

    def _next_in(self, cell: _Cell) -> list[float]:
        if pending := cell.pending():
            return pending
        n = self.settings.trials_per_cell
        want = min(self.settings.batch, n - len(cell.stored))
        points = [x for x in self._design(cell) if x not in cell.stored][: max(want, 0)]
        if len(points) < want:
            points += self._ask(cell, want - len(points), taken=set(points))
        return points

    def _design(self, cell: _Cell) -> list[float]:
        """The first points: evenly over the range, ends first, then the middle, then the
        quarters; about half the budget (3 to 5 points), the rest left to the sampler."""
        k = min(5, max(3, math.ceil(self.settings.trials_per_cell / 2)))
        even = [_on_lattice(cell.lo + (cell.hi - cell.lo) * j / (k - 1)) for j in range(k)]
        order = [0, k - 1, (k - 1) // 2, *range(1, k - 1)]
        return list(dict.fromkeys(even[j] for j in order))

    def _ask(self, cell: _Cell, n: int, taken: set[float]) -> list[float]:
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = {"log2_lr": FloatDistribution(cell.lo, cell.hi, step=1 / LATTICE)}
        study = optuna.create_study(direction="minimize", sampler=self._sampler(len(cell.stored)))
        for x in cell.stored:
            if (value := cell.value(x)) is not None and math.isfinite(value):
                study.add_trial(
                    create_trial(params={"log2_lr": x}, distributions=space, value=value)
                )
        points: list[float] = []
        for _ in range(50 * n):
            trial = study.ask(space)
            x = _on_lattice(trial.params["log2_lr"])
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


# Transfer search. Steps in octaves: the first cell's design, the spacing of a larger cell's
# first three lrs (around a prediction from one smaller cell, then from two or more), and the
# finest gap refinement splits (a lattice of 1/16 octave, halved twice more would be noise).
DESIGN_STEP = 1.0
WINDOW_STEP = {1: 1.0, 2: 0.5}
FINEST_GAP = 0.125


class TransferSearch(Search):
    """Telescoping search along one axis (width, say), line by line.

    A line is the cells that differ only in the axis; its cells are searched smallest first,
    one at a time, each until it is settled: its optimum interior with an interval within
    +-target_ci, or against divergence with no gap left to split, or `trials_per_cell` lrs
    spent. The lines run side by side.
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
        first = [line[0] for line in self.lines]
        for cell in first:
            design = self._design(cell)
            if len(design) > self.settings.trials_per_cell:
                raise SearchError(
                    f"search.trials_per_cell {self.settings.trials_per_cell} is fewer than the "
                    f"{len(design)} lrs that cover the smallest {axis}'s range "
                    f"2^{cell.lo:g}..2^{cell.hi:g} an octave apart: raise it, or narrow the range"
                )
        self.optima: dict[int, dict] = {}  # id(cell) -> the analysis' row for it, as last read

    def _design(self, cell: _Cell) -> list[float]:
        """The smallest cell's first lrs: its grid range an octave apart (the grid's own lrs
        where they are further apart), at least three."""
        grid = cell.grid
        if len(grid) >= 3 and all(b - a >= DESIGN_STEP for a, b in itertools.pairwise(grid)):
            return grid
        if cell.hi - cell.lo < 2 * DESIGN_STEP:
            mid = _on_lattice((cell.lo + cell.hi) / 2)
            return [mid - DESIGN_STEP, mid, mid + DESIGN_STEP]
        n = math.floor((cell.hi - cell.lo) / DESIGN_STEP + 1e-9)
        points = [cell.lo + k * DESIGN_STEP for k in range(n + 1)]
        return points if points[-1] == cell.hi else [*points, cell.hi]

    def _next_points(self) -> list[tuple[_Cell, list[float]]]:
        if any(cell.stored for cell in self.cells.values()):
            self._read_optima()
        out = []
        for line in self.lines:
            for k, cell in enumerate(line):
                if pending := cell.pending():
                    out.append((cell, pending))
                    break
                points = self._next_in(line, k)
                if points:
                    out.append((cell, points))
                    break
        return out

    def _next_in(self, line: list[_Cell], k: int) -> list[float]:
        """The cell's next lrs; empty when it is settled."""
        cell = line[k]
        # The cell's first lrs, all of them before any other: a run stopped in the middle of
        # them resumes with the rest (recomputed: the smaller cells they follow are settled).
        first = self._design(cell) if k == 0 else self._window(line[:k], cell)
        first = first[: self.settings.trials_per_cell]
        if set(cell.stored) <= set(first) and (rest := self._free(first, cell)):
            return rest
        room = self.settings.trials_per_cell - len(cell.stored)
        row = self.optima.get(id(cell))
        if room <= 0 or row is None:  # spent, or nothing usable (every trial failed)
            return []
        xs = sorted(cell.stored)
        status = row["status"]
        if status == "all_diverged":
            return self._free([xs[0] - max(DESIGN_STEP, xs[-1] - xs[0])], cell)
        lower = xs[0] - max(xs[1] - xs[0] if len(xs) > 1 else 0, WINDOW_STEP[2])
        higher = xs[-1] + max(xs[-1] - xs[-2] if len(xs) > 1 else 0, WINDOW_STEP[2])
        if status == "too_few_lrs":  # trials failed where the window was: widen both ways
            return self._free([lower, higher], cell)[:room]
        if status == "edge":
            return self._free([higher if row["edge_side"] == "high" else lower], cell)
        # The lrs the fit saw (diverged ones included), and its best, on the lattice.
        curve = row["curve"]
        best = _on_lattice(row["argmin_log2_lr"])
        i = curve.index(best)
        if status == "divergence_bounded":  # the optimum lies between the best lr and the cliff
            return self._split([(best, curve[i + 1])], cell)[:1]
        if status != "ok":  # no_data: every stored trial failed
            return []
        if row["noise"] == "none" or row["half_width"] <= self.settings.target_ci:
            return []
        # One lr a round: halfway from the best lr towards the fitted optimum's side, where it
        # narrows the interval most (the other side once that gap is as fine as it gets).
        left, right = (curve[i - 1], best), (best, curve[i + 1])
        sides = [left, right] if row["log2_lr_star"] < best else [right, left]
        return self._split_first(sides, cell)

    def _split_first(self, gaps: list[tuple[float, float]], cell: _Cell) -> list[float]:
        """The midpoint of the first gap wider than the finest gap."""
        for gap in gaps:
            if points := self._split([gap], cell):
                return points
        return []

    def _split(self, gaps: list[tuple[float, float]], cell: _Cell) -> list[float]:
        """The midpoints of the gaps wider than the finest gap, widest first."""
        wide = sorted((g for g in gaps if g[1] - g[0] > FINEST_GAP), key=lambda g: g[0] - g[1])
        return self._free([_on_lattice((a + b) / 2) for a, b in wide], cell)

    @staticmethod
    def _free(points: list[float], cell: _Cell) -> list[float]:
        """Points not stored yet, within the lrs a grid accepts (2^-40..2^20)."""
        return [x for x in points if x not in cell.stored and -40 <= x <= 20]

    def _window(self, smaller: list[_Cell], cell: _Cell) -> list[float]:
        """Three lrs around the lr* the smaller cells predict for `cell`: the line through
        their optima (log2 lr* vs log2 of the axis) at this cell, or the one optimum itself (no
        drift assumed until two cells measure it); the nearest smaller cell's best lr where
        none has an interior optimum."""
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
            step = WINDOW_STEP[2]
        elif known:
            centre, step = known[0][1], WINDOW_STEP[1]
        else:
            rows = [r for c in smaller if (r := self.optima.get(id(c)))]
            best = [r["argmin_log2_lr"] for r in rows if math.isfinite(r["argmin_log2_lr"])]
            if not best:  # nothing learnt from the smaller cells: search this one afresh
                return self._design(cell)
            centre, step = best[-1], WINDOW_STEP[1]
        centre = _on_lattice(min(max(centre, -40 + step), 20 - step))
        return [centre - step, centre, centre + step]

    def _read_optima(self) -> None:
        """Each cell's optimum as the analysis fits it from the store, as the report would."""
        from analysis import find_optima, load_results

        results = load_results(self.store.location)
        optima = find_optima(results)
        analysis_cell = dict(zip(results.trials["trial_id"], results.trials["cell"], strict=True))
        rows = {int(r["cell"]): r for r in optima.table.to_dict("records")}
        self.optima = {}
        for cell in self.cells.values():
            ids = (cell.trial(x, s).trial_id for x in cell.stored for s in cell.seeds)
            found = next((analysis_cell[t] for t in ids if t in analysis_cell), None)
            if found is None or int(found) not in rows:
                continue
            row = rows[int(found)]
            row["curve"] = sorted({_on_lattice(x) for x in optima.curve(int(found))["log2_lr"]})
            row["half_width"] = (row["ci_hi"] - row["ci_lo"]) / 2
            self.optima[id(cell)] = row


def make_search(spec: SweepSpec, grid_trials: list[TrialSpec], store: Store) -> Search | None:
    """The planner of `spec.search.method`; None for the plain grid. Raises SearchError."""
    planners = {"optuna": OptunaSearch, "transfer": TransferSearch}
    planner = planners.get(spec.search.method)
    return planner(spec, grid_trials, store) if planner else None
