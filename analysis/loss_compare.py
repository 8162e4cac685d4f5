"""Is one cell's best loss lower than another's? Relative losses with intervals and verdicts.

The comparison of per-layer lr multipliers (layer_lr.py) and of batch sizes and optimizers at a
fixed token budget (batch_size.py). relative = L*(cell) / L*(ref) - 1, each L* the cell's best
loss over lr (its fitted minimum).

Uncertainty, two parts:
- the lr-by-seed noise that moves a cell's optimum, which the cells' bootstrap draws
  (optimum.find_optima) carry;
- each seed's offset in the cell: a seed fixes initialisation and data order, and the part of
  its offset the compared cells share cancels, but the part a cell does not share (another
  batch size reads the data in other batches; another optimizer starts from the same weights
  but takes another path) does not. Its variance is measured from the seeds' offsets near each
  cell's optimum, less the offset the seed has in all the compared cells (pooled over them),
  and added to each cell's draws as Gaussian noise of variance tau^2 / seeds. The measure
  carries some lr-by-seed noise as well: it errs wide.

Intervals are simultaneous over the comparisons asked together (a max statistic over the joint
draws): "the best of 24 combinations beats all ones" is a claim about the best of 24, and a
95 % interval for each alone would call one of 24 equal combinations better by chance.
Verdicts: `better` or `worse` when the whole interval is below or above 0, `indistinguishable`
otherwise; `no interval` without seed noise to measure (one seed) or too few draws with a
minimum; `not located` when either cell's lr optimum is on its grid's edge or bounded by
divergence (its L* is then only an upper bound). Calibrated on planted stores with shared and
per-cell seed offsets: tests/test_layer_lr.py and tests/test_batch_size.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from .optimum import Optima, cell_matrix

# An interval needs at least this share of draws with a minimum in every cell it compares.
MIN_FINITE_DRAWS = 0.9
# The lrs whose seed offsets are measured: within this many octaves of the cell's best lr.
OFFSET_WINDOW = 1.0
LEVEL = 0.95


class LossComparison:
    """Draws of the best loss of a set of cells that are compared with each other."""

    def __init__(self, optima: Optima, usable: pd.DataFrame, cells: Iterable[int]) -> None:
        self.optima = optima
        self.cells = sorted({int(c) for c in cells})
        self.table = optima.table.set_index("cell")
        self.tau, self.tau_dof = seed_cell_sd(usable, self.cells)
        # Fixed generator: a report re-derived from the same store gives the same intervals.
        rng = np.random.default_rng([0, *self.cells])
        self._draws: dict[int, np.ndarray] = {}
        for cell in self.cells:
            d = optima.draws.get(cell)
            if d is None:
                continue
            n = max(int(self.table.loc[cell, "n_seeds"]), 1)
            extra = rng.standard_normal(len(d.c)) * self.tau / np.sqrt(n)
            self._draws[cell] = d.c + (extra if self.tau_dof > 0 else 0.0)

    def loss(self, cell: int) -> float:
        return float(self.table.loc[cell, "loss_star"])

    def located(self, *cells: int) -> bool:
        return all(self.table.loc[c, "status"] == "ok" for c in cells)

    def relative_draws(self, cell: int, ref: int) -> np.ndarray | None:
        a, b = self._draws.get(cell), self._draws.get(ref)
        return None if a is None or b is None else a / b - 1

    def compare(self, pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """relative, relative_ci (simultaneous over `pairs`) and verdict of each (cell, ref)."""
        draws = [self.relative_draws(c, r) for c, r in pairs]
        cis = simultaneous(draws)
        out = []
        for (cell, ref), ci in zip(pairs, cis, strict=True):
            ok = self.located(cell, ref)
            out.append(
                {
                    "relative": self.loss(cell) / self.loss(ref) - 1,
                    "relative_ci": ci,
                    "verdict": "reference" if cell == ref else verdict(ci, ok),
                }
            )
        return out


def verdict(ci: list[float] | None, located: bool = True) -> str:
    if not located:
        return "not located"
    if ci is None:
        return "no interval"
    if ci[1] < 0:
        return "better"
    if ci[0] > 0:
        return "worse"
    return "indistinguishable"


def simultaneous(draws: list[np.ndarray | None]) -> list[list[float] | None]:
    """Intervals at LEVEL holding together for every row of draws: each row's median +- q of
    its sd, q the LEVEL quantile over draws of the largest |row - median| / sd. One row: the
    usual 1.96 sd. Rows without enough finite draws get None and do not count."""
    out: list[list[float] | None] = [None] * len(draws)
    rows, index = [], []
    for i, d in enumerate(draws):
        if d is None or np.isfinite(d).mean() < MIN_FINITE_DRAWS:
            continue
        fin = d[np.isfinite(d)]
        sd = float(np.std(fin))
        if sd == 0:  # a cell against itself
            out[i] = [float(fin[0]), float(fin[0])]
            continue
        rows.append((float(np.median(fin)), sd, d))
        index.append(i)
    if not rows:
        return out
    z = np.stack([np.abs(d - m) / sd for m, sd, d in rows])  # NaN where a draw has no minimum
    with np.errstate(invalid="ignore"):
        worst = np.nanmax(np.where(np.isfinite(z), z, np.nan), axis=0)
    q = float(np.quantile(worst[np.isfinite(worst)], LEVEL))
    for i, (m, sd, _) in zip(index, rows, strict=True):
        out[i] = [m - q * sd, m + q * sd]
    return out


def seed_cell_sd(usable: pd.DataFrame, cells: list[int]) -> tuple[float, int]:
    """The sd of the part of a seed's offset that a cell does not share with the other cells,
    pooled over them, and its degrees of freedom (0: not measurable, fewer than two cells or
    seeds in common).

    A seed's offset in a cell is its mean loss, over the lrs within OFFSET_WINDOW octaves of
    the cell's best where every seed finished, less those lrs' means over seeds."""
    offsets: dict[int, pd.Series] = {}
    for cell, part in usable[usable["cell"].isin(cells)].groupby("cell"):
        x, y = cell_matrix(part)
        seeds = np.unique(part["seed"].to_numpy())
        full = np.isfinite(y).all(axis=1)
        if full.sum() == 0 or len(seeds) < 2:
            continue
        mean = y[full].mean(axis=1)
        best = x[full][np.argmin(mean)]
        near = full & (np.abs(x - best) <= OFFSET_WINDOW + 1e-9)
        dev = y[near] - y[near].mean(axis=1, keepdims=True)
        offsets[int(cell)] = pd.Series(dev.mean(axis=0), index=seeds)
    if len(offsets) < 2:
        return 0.0, 0
    frame = pd.DataFrame(offsets).dropna()  # seeds x cells, the seeds every cell ran
    n_seeds, n_cells = frame.shape
    if n_seeds < 2 or n_cells < 2:
        return 0.0, 0
    # Remove the offset each seed has in every cell (it cancels in a comparison).
    own = frame.to_numpy() - frame.to_numpy().mean(axis=1, keepdims=True)
    dof = (n_seeds - 1) * (n_cells - 1)
    return float(np.sqrt((own**2).sum() / dof)), dof


def pct_ci(ci: list[float] | None, prefix: str = "95 % CI ", unit: str = "%") -> str:
    """An interval of a relative loss in percent, for sentences (and, prefix "", tables)."""
    if ci is None:
        return "no interval"
    return f"{prefix}[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] {unit}"
