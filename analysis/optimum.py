"""The optimal learning rate of each cell, its interval, and the flags that forbid claims.

A cell is one configuration with every field but lr and seed fixed. Its loss curve is the mean
over seeds at each lr of the grid; a diverged trial counts as +inf (so an lr where any seed
diverged is never the argmin), an lr with no trial is simply absent. The optimum is located by
the asymmetric fit of location.py.

Uncertainty. A seed fixes initialisation and batch order for every lr of a cell (and of every
width), so part of a seed's effect is an offset shared by all its lrs: it moves the curve up or
down and the optimum not at all. What moves the optimum is the lr-by-seed interaction. Its
variance is measured from the seeds' residuals after removing each lr's mean and each seed's
offset (a two-way layout), over the points of each cell's fit window, pooled over the cells of
one optimizer (noise grows near divergence, and optimizers differ). The interval then comes from
a parametric bootstrap: the mean curve plus Gaussian noise of that variance over the seeds at
each lr, with the variance itself drawn from its chi-square distribution (so a variance measured
from few seeds widens the interval as Student's t does), located again. Percentiles of the
located draws give the 95 % interval, which is then widened (in quadrature) by the location
method's own error on the grid at hand (location.method_error). With one seed there is no
measured noise: no interval is given, and the report says so.

Flags: `edge` (the optimum is on the lr grid's edge: widen the grid), `divergence-bounded`
(the loss still falls at the last lr that did not diverge: the optimum lies near the cliff,
location unknown). Neither has an interval, and neither enters a transfer fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .fitting import Z_975
from .load import CONFIG_COLUMNS, Results
from .location import (
    WINDOW_OCTAVES,
    CurveFit,
    fit_curves,
    locate_optimum,
    method_error,
    shape_ambiguity,
)

__all__ = ["WINDOW", "Optima", "find_optima", "locate_optimum", "loss_at"]

N_BOOTSTRAP = 400
WINDOW = WINDOW_OCTAVES
# Near-optimal set: lrs whose mean loss is within this fraction of the cell's best (Step Law).
NEAR_OPTIMAL = 0.0025


@dataclass
class Noise:
    """The lr-by-seed noise of one optimizer's losses: standard deviation and its degrees of
    freedom (0: not measured)."""

    sigma: float
    dof: int


@dataclass
class Optima:
    """Per-cell optima.

    table: one row per cell (config columns, label, log2_lr_star, ci_lo/ci_hi, status, ...).
    curves: one row per (cell, lr): mean loss over seeds (inf if any seed diverged), sem, counts.
    point: cell -> the fit of its mean curve (a CurveFit of one row).
    draws: cell -> the fits of its bootstrap draws (a CurveFit of n_bootstrap rows; draws of
        every cell share their index, so transfer fits combine them draw by draw). Cells whose
        noise is not measured have none.
    boot: cell -> its bootstrap draws of the mean curve, (n_bootstrap, L) on the cell's grid.
    noise: optimizer -> Noise.
    """

    table: pd.DataFrame
    curves: pd.DataFrame
    point: dict[int, CurveFit]
    draws: dict[int, CurveFit]
    boot: dict[int, np.ndarray]
    noise: dict[str, Noise]
    n_bootstrap: int
    _curve_index: dict[int, pd.DataFrame] | None = field(default=None, repr=False)

    def curve(self, cell: int) -> pd.DataFrame:
        """The loss curve of one cell."""
        if self._curve_index is None:
            self._curve_index = {int(c): g for c, g in self.curves.groupby("cell", sort=False)}
        return self._curve_index.get(int(cell), self.curves.iloc[:0])

    def samples(self, cell: int) -> np.ndarray | None:
        """Bootstrap draws of the cell's log2 lr* (NaN where a draw had no optimum)."""
        d = self.draws.get(int(cell))
        return None if d is None else d.x0

    def excess_draws(self, cell: int, x: np.ndarray) -> np.ndarray | None:
        """Per bootstrap draw, the cell's loss at log2 lr x[draw] above that draw's minimum:
        the draw's fitted curve inside its span, its curve interpolated beyond (inf across a
        diverged point, NaN off the grid)."""
        d = self.draws.get(int(cell))
        if d is None:
            return None
        out = d.excess(x)
        grid = self.curve(cell)["log2_lr"].to_numpy(float)
        for k in np.flatnonzero(np.isnan(out) & np.isfinite(x)):
            out[k] = _interpolate(grid, self.boot[int(cell)][k], float(x[k])) - d.c[k]
        return out


def cell_matrix(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid x (L,), losses (L, seeds)): NaN where unmeasured, inf where diverged."""
    x, li = np.unique(part["log2_lr"].to_numpy(), return_inverse=True)
    seeds, si = np.unique(part["seed"].to_numpy(), return_inverse=True)
    y = np.full((len(x), len(seeds)), np.nan)
    y[li, si] = np.where(part["diverged"].to_numpy(), np.inf, part["loss"].to_numpy())
    return x, y


def _mean(y: np.ndarray) -> np.ndarray:
    """Each lr's mean loss over its seeds (inf if any diverged, NaN with none measured).

    Where some seeds were not measured at some lrs, a plain mean would carry those seeds' shared
    offsets into the curve's shape (an lr run with only the luckiest seed looks best): the seeds'
    offsets are then fitted (an additive lr + seed model over the finite losses) and removed
    first. With every seed at every finite lr this is the plain mean.
    """
    n = (~np.isnan(y)).sum(axis=-1)
    finite = np.isfinite(y)
    rows = finite.any(axis=1)
    offset = np.zeros(y.shape[1])
    if not (finite[rows] == finite[rows].all(axis=0)).all():
        z = np.where(finite, y, np.nan)
        seen = finite.any(axis=0)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows and columns
            for _ in range(100):
                level = np.nanmean(z - offset, axis=1)
                new = np.where(seen, np.nanmean(z - level[:, None], axis=0), 0.0)
                new = np.where(seen, new - new[seen].mean(), 0.0)
                if np.allclose(new, offset, atol=1e-12):
                    break
                offset = new
    with np.errstate(invalid="ignore", divide="ignore"):
        centred = np.where(finite, y - offset, 0.0).sum(axis=-1) / np.maximum(finite.sum(-1), 1)
        return np.where(np.isinf(y).any(axis=-1), np.inf, np.where(n > 0, centred, np.nan))


def _sem(y: np.ndarray) -> np.ndarray:
    """Standard error of each row's finite values (NaN with fewer than two)."""
    fin = np.isfinite(y)
    n = fin.sum(axis=1)
    mean = np.where(fin, y, 0.0).sum(axis=1) / np.maximum(n, 1)
    with np.errstate(invalid="ignore"):
        ss = (np.where(fin, y - mean[:, None], 0.0) ** 2).sum(axis=1)
    return np.where(n >= 2, np.sqrt(ss / np.maximum(n - 1, 1) / np.maximum(n, 1)), np.nan)


def _step_at(x: np.ndarray, i: int) -> float:
    """The lr grid's resolution at the argmin: the wider of its gaps to its neighbours (a
    search's scan points far from the optimum do not count)."""
    gaps = [x[j + 1] - x[j] for j in (i - 1, i) if 0 <= j < len(x) - 1]
    return float(max(gaps)) if gaps else np.nan


def _interaction(x: np.ndarray, y: np.ndarray, centre: float) -> tuple[float, int]:
    """Sum of squares and degrees of freedom of the lr-by-seed interaction over the lrs within
    the fit window of `centre` where every seed of the cell was measured and finite."""
    rows = (np.abs(x - centre) <= WINDOW + 1e-9) & np.isfinite(y).all(axis=1)
    z = y[rows]
    if z.shape[0] < 2 or z.shape[1] < 2:
        return 0.0, 0
    resid = z - z.mean(axis=1, keepdims=True) - z.mean(axis=0, keepdims=True) + z.mean()
    return float((resid**2).sum()), (z.shape[0] - 1) * (z.shape[1] - 1)


def _status(x: np.ndarray, mean: np.ndarray, fit: CurveFit) -> tuple[str, str | None]:
    """ok | edge | divergence_bounded | all_diverged | no_data | too_few_lrs, and the edge's
    side (low | high) when the optimum is on the grid's edge."""
    finite = np.isfinite(mean)
    if not finite.any():
        return ("all_diverged" if np.isinf(mean).any() else "no_data"), None
    if len(x) < 3:
        return "too_few_lrs", None
    i = int(np.argmin(np.where(finite, mean, np.inf)))
    if i + 1 < len(x) and np.isinf(mean[i + 1]):
        return "divergence_bounded", None
    x0 = float(fit.x0[0])
    if i == 0 or x0 < x[1]:
        return "edge", "low"
    if i == len(x) - 1 or x0 > x[-2]:
        return "edge", "high"
    return "ok", None


def _flags(status: str, n_seeds: int, measured: bool) -> list[str]:
    flags = {"edge": ["edge"], "divergence_bounded": ["divergence-bounded"]}.get(status, [])
    if n_seeds < 2 and not measured:
        flags.append("single-seed")
    return flags


def find_optima(
    results: Results,
    *,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Optima:
    """The optimum of every cell with at least one usable trial, with its interval."""
    usable = results.usable.sort_values(["cell", "log2_lr", "seed"], kind="stable")
    first = usable.drop_duplicates("cell").set_index("cell")
    cells = []
    for cell, part in usable.groupby("cell", sort=True):
        x, y = cell_matrix(part)
        mean = _mean(y)
        cells.append(
            (int(cell), str(first.loc[cell, "optimizer"]), x, y, mean, fit_curves(x, mean))
        )

    noise = _pooled_noise(cells)
    rng = np.random.default_rng(seed)
    # One chi-square draw per optimizer and bootstrap draw: the variance estimate is shared by
    # the optimizer's cells, so its uncertainty moves them together.
    scale = {
        opt: np.sqrt(nz.dof / rng.chisquare(nz.dof, n_bootstrap)) * nz.sigma
        for opt, nz in noise.items()
        if nz.dof > 0
    }
    rows, curve_parts, point, draws, boots = [], [], {}, {}, {}
    for cell, opt, x, y, mean, fit in cells:
        n_rep = (~np.isnan(y)).sum(axis=1)
        curve_parts.append(
            pd.DataFrame(
                {
                    "cell": cell,
                    "log2_lr": x,
                    "mean": mean,
                    "sem": _sem(y),
                    "n": n_rep,
                    "n_diverged": np.isinf(y).sum(axis=1),
                }
            )
        )
        point[cell] = fit
        status, edge_side = _status(x, mean, fit)
        finite = np.isfinite(mean)
        i = int(np.argmin(np.where(finite, mean, np.inf))) if finite.any() else 0
        m_err = method_error(x, finite, i) if finite.any() else np.nan
        ci = [np.nan, np.nan]
        interior = np.nan
        if opt in scale and finite.any():
            noise_sd = scale[opt][:, None] / np.sqrt(np.maximum(n_rep, 1))[None, :]
            boot = mean[None, :] + rng.standard_normal((n_bootstrap, len(x))) * noise_sd
            d = fit_curves(x, boot)  # inf (diverged) stays inf and NaN (unmeasured) NaN
            draws[cell], boots[cell] = d, boot
            interior = float(np.mean((d.x0 >= x[1]) & (d.x0 <= x[-2]))) if len(x) >= 3 else 0.0
            # Shapes that fit as well as the best one but put the optimum elsewhere are as much
            # the method's error as the grid's resolution is.
            var = float(np.mean(scale[opt] ** 2) / max(int(n_rep.min()), 1))
            m_err = float(np.hypot(m_err, shape_ambiguity(x, mean, var)))
            if status == "ok":
                ci = _interval(float(fit.x0[0]), d.x0, m_err)
        x0 = float(fit.x0[0])
        best = np.min(mean[finite]) if finite.any() else np.nan
        near = x[finite & (mean <= best * (1 + NEAR_OPTIMAL))]
        measured = opt in scale
        rows.append(
            {
                "cell": cell,
                "n_lr": len(x),
                "n_seeds": int(n_rep.max()),
                "n_trials": int(n_rep.sum()),
                "n_diverged": int(np.isinf(y).sum()),
                "log2_lr_min": float(x[0]),
                "log2_lr_max": float(x[-1]),
                "argmin_log2_lr": float(x[i]) if finite.any() else np.nan,
                "lr_step": _step_at(x, i) if finite.any() else np.nan,
                "log2_lr_star": x0,
                "lr_star": float(2.0**x0) if np.isfinite(x0) else np.nan,
                "loss_star": float(fit.c[0]),
                "method": str(fit.kind[0]),
                "status": status,
                "flags": _flags(status, int(n_rep.max()), measured),
                "edge": status == "edge",
                "edge_side": edge_side,
                "ci_lo": ci[0],
                "ci_hi": ci[1],
                "interior_frac": interior,
                "noise": "seeds" if measured else "none",
                "seed_sigma": noise[opt].sigma if opt in noise else np.nan,
                "noise_dof": noise[opt].dof if opt in noise else 0,
                "method_error": m_err,
                "fit_lo": float(fit.x_lo[0]),
                "fit_hi": float(fit.x_hi[0]),
                "near_opt_lo": float(near.min()) if len(near) else np.nan,
                "near_opt_hi": float(near.max()) if len(near) else np.nan,
            }
        )

    table = pd.DataFrame(rows)
    if table.empty:
        return Optima(table, pd.DataFrame(), point, draws, boots, noise, n_bootstrap)
    config = first[[*CONFIG_COLUMNS, "label", "tokens", "n_params"]]
    table = config.join(table.set_index("cell"), how="right").reset_index()
    curves = pd.concat(curve_parts, ignore_index=True)
    return Optima(table, curves, point, draws, boots, noise, n_bootstrap)


def _pooled_noise(cells: list) -> dict[str, Noise]:
    ss: dict[str, float] = {}
    dof: dict[str, int] = {}
    for _, opt, x, y, _, fit in cells:
        if not np.isfinite(fit.x0[0]):
            continue
        s, d = _interaction(x, y, float(fit.x0[0]))
        ss[opt] = ss.get(opt, 0.0) + s
        dof[opt] = dof.get(opt, 0) + d
    return {
        opt: Noise(float(np.sqrt(ss[opt] / dof[opt])) if dof[opt] else float("nan"), dof[opt])
        for opt in ss
    }


def method_sd(error_95: float) -> float:
    """The location method's error as a standard deviation (method_error is a 95 % figure)."""
    return error_95 / Z_975 if np.isfinite(error_95) else 0.0


def widen(point: float, lo: float, hi: float, method: float) -> list[float]:
    """Each side of the interval [lo, hi] around `point` widened in quadrature by the location
    method's 95 % error `method` (none when it is not finite)."""
    m = method if np.isfinite(method) else 0.0
    return [
        point - float(np.hypot(max(point - lo, 0.0), m)),
        point + float(np.hypot(max(hi - point, 0.0), m)),
    ]


def _interval(point: float, samples: np.ndarray, m_err: float) -> list[float]:
    """2.5 / 97.5 % of the draws, widened by the method's error."""
    ok = np.isfinite(samples)
    if ok.sum() < max(10, len(samples) // 2):
        return [np.nan, np.nan]
    return widen(point, *np.quantile(samples[ok], [0.025, 0.975]), m_err)


def loss_at(curve: pd.DataFrame, x: float) -> float:
    """The cell's mean loss at log2 lr `x`, interpolated linearly in log2 lr between grid
    points (inf if it crosses a diverged point, NaN off the grid)."""
    c = curve.sort_values("log2_lr")
    return _interpolate(c["log2_lr"].to_numpy(float), c["mean"].to_numpy(float), x)


def _interpolate(gx: np.ndarray, gy: np.ndarray, x: float) -> float:
    keep = ~np.isnan(gy)
    gx, gy = gx[keep], gy[keep]
    if len(gx) == 0 or x < gx[0] - 1e-9 or x > gx[-1] + 1e-9:
        return float("nan")
    j = int(np.searchsorted(gx, x))
    if j < len(gx) and abs(gx[j] - x) < 1e-9:
        return float(gy[j])
    lo, hi = gy[j - 1], gy[j]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return float("inf")
    t = (x - gx[j - 1]) / (gx[j] - gx[j - 1])
    return float(lo + t * (hi - lo))
