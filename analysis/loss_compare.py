"""Is one cell's best loss lower than another's? Relative loss with a 95 % interval and a verdict.

The comparison of per-layer lr multipliers (layer_lr.py) and of batch sizes and optimizers at a
fixed token budget (batch_size.py). relative = L*(cell) / L*(ref) - 1, each L* the cell's best
loss over lr (its fitted minimum).

Uncertainty. Cells compared share their seeds (a seed fixes initialisation and batch order
whatever the rest of the configuration), so the seeds' shared offsets cancel in the comparison:
what is left is the seed-by-setting noise that moves a cell's optimum, which the cells'
bootstrap draws (optimum.find_optima) carry. The relative loss is taken draw by draw; its
2.5 / 97.5 % quantiles are the interval (calibrated on planted stores in tests/test_layer_lr.py
and tests/test_batch_size.py). Verdicts: `better` or `worse` when the whole interval is below or
above 0, `indistinguishable` otherwise; `no interval` with one seed; `not located` when either
cell's lr optimum is on its grid's edge or bounded by divergence (its L* is then only an upper
bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .optimum import Optima

# An interval needs at least this share of draws with a minimum in both cells.
MIN_FINITE_DRAWS = 0.9
LOSS_VERDICTS = ("better", "worse", "indistinguishable", "no interval", "not located")


def relative_ci(optima: Optima, cell: int, ref: int) -> list[float] | None:
    """95 % interval of L*(cell) / L*(ref) - 1 from the two cells' bootstrap draws."""
    a, b = optima.draws.get(cell), optima.draws.get(ref)
    if a is None or b is None:
        return None
    if cell == ref:
        return [0.0, 0.0]
    rel = a.c / b.c - 1
    finite = np.isfinite(rel)
    if finite.mean() < MIN_FINITE_DRAWS:
        return None
    q = np.quantile(rel[finite], [0.025, 0.975])
    return [float(q[0]), float(q[1])]


def compare(optima: Optima, cell: int, ref: int) -> dict[str, Any]:
    """relative, relative_ci and verdict of cell against ref (`reference` when they are one)."""
    table = optima.table.set_index("cell")
    loss, ref_loss = float(table.loc[cell, "loss_star"]), float(table.loc[ref, "loss_star"])
    ci = relative_ci(optima, cell, ref)
    located = table.loc[cell, "status"] == "ok" and table.loc[ref, "status"] == "ok"
    if cell == ref:
        verdict = "reference"
    elif not located:
        verdict = "not located"
    elif ci is None:
        verdict = "no interval"
    elif ci[1] < 0:
        verdict = "better"
    elif ci[0] > 0:
        verdict = "worse"
    else:
        verdict = "indistinguishable"
    return {"relative": loss / ref_loss - 1, "relative_ci": ci, "verdict": verdict}


def pct_ci(ci: list[float] | None, prefix: str = "95 % CI ") -> str:
    """An interval of a relative loss in percent, for sentences (and, prefix "", tables)."""
    return "no interval" if ci is None else f"{prefix}[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] %"
