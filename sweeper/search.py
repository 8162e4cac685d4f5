"""Adaptive search: each cell's lrs chosen by an Optuna study instead of the whole grid.

A planner beside `plan()`: it turns what the store holds into the next lrs to try, one round at
a time, and the orchestrator runs each round like a small grid. The store stays the one record:
every round the studies are rebuilt from the stored trials, so a search interrupted at any
moment resumes where the store stands and never trains a stored trial again. (A study kept in
its own database could disagree with the store after a kill, a trial told but never stored or
stored but never told; rebuilding also leaves no SQLite file for two writers to lock.)

A cell is everything but lr and seed. Its study searches log2 lr between the lowest and highest
lr the grid gives the cell, on a 1/16-octave lattice (a point proposed twice is the same trial),
starting from a few points spread evenly over it. Each proposed lr runs at every seed of the
grid; the study sees the mean over seeds of the final validation loss, a diverged seed counting
as its initial loss (a run that blew up did no better than not training).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

from sweeper.spec import SweepSpec, TrialSpec
from sweeper.store import Store

LATTICE = 16  # points per octave


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
    lo: float  # log2 lr range, on the lattice
    hi: float
    # log2 lr -> seed -> the seed's value (None: the trial failed)
    stored: dict[float, dict[int, float | None]] = field(default_factory=dict)

    def trial(self, log2_lr: float, seed: int) -> TrialSpec:
        return self.template.model_copy(update={"lr": 2.0**log2_lr, "seed": seed})

    def complete(self, log2_lr: float) -> bool:
        return len(self.stored.get(log2_lr, {})) == len(self.seeds)

    def value(self, log2_lr: float) -> float | None:
        """The study's objective at a point: the mean over its seeds that did not fail."""
        values = [v for v in self.stored.get(log2_lr, {}).values() if v is not None]
        return sum(values) / len(values) if values else None


class OptunaSearch:
    """The next round of trials of every cell, from the trials the store holds."""

    def __init__(self, spec: SweepSpec, grid_trials: list[TrialSpec], store: Store):
        self.settings = spec.search
        self.store = store
        self.n_stored = 0  # trials of the search's cells in the store, as last read
        groups: dict[str, list[TrialSpec]] = defaultdict(list)
        for t in grid_trials:
            groups[cell_key(t)].append(t)
        self.cells = {}
        for key, members in groups.items():
            log2s = [math.log2(t.lr) for t in members]
            self.cells[key] = _Cell(
                template=members[0],
                seeds=sorted({t.seed for t in members}),
                lo=_on_lattice(min(log2s)),
                hi=_on_lattice(max(log2s)),
            )

    @property
    def max_trials(self) -> int:
        return sum(len(c.seeds) for c in self.cells.values()) * self.settings.trials_per_cell

    def _read_store(self) -> set[str]:
        """Fill each cell's stored points; returns the ids of failed trials."""
        tbl = self.store.read(
            "trials", ["trial_id", "status", "final_val_loss", "initial_loss", "spec"]
        )
        for cell in self.cells.values():
            cell.stored = {}
        failed = set()
        self.n_stored = 0
        for tid, status, final, initial, spec_json in zip(*tbl.to_pydict().values(), strict=True):
            trial = TrialSpec.model_validate_json(spec_json)
            cell = self.cells.get(cell_key(trial))
            if cell is None or trial.seed not in cell.seeds:
                continue
            if status == "failed":
                failed.add(tid)
                value = None
            else:
                value = final if status == "completed" and final is not None else initial
            point = _on_lattice(math.log2(trial.lr))
            cell.stored.setdefault(point, {})[trial.seed] = value
            self.n_stored += 1
        return failed

    def propose(self, retry_failed: bool = False) -> list[TrialSpec]:
        """The trials of the next round: empty when every cell has its trials_per_cell lrs.

        A failed trial counts as done within a run (so a broken setting cannot loop forever);
        with retry_failed (a run's first round) it is proposed again, as a grid run retries it.
        """
        failed = self._read_store()
        out: list[TrialSpec] = []
        for cell in self.cells.values():
            for log2_lr in self._next_points(cell):
                out += [
                    cell.trial(log2_lr, s)
                    for s in cell.seeds
                    if s not in cell.stored.get(log2_lr, {})
                ]
            if retry_failed:
                out += [
                    t
                    for x, seeds in cell.stored.items()
                    for s in seeds
                    if (t := cell.trial(x, s)).trial_id in failed
                ]
        return out

    def _next_points(self, cell: _Cell) -> list[float]:
        pending = [x for x in cell.stored if not cell.complete(x)]  # a round cut short
        if pending:
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
