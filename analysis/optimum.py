"""The optimal learning rate of each cell: grid argmin, parabola refinement, edge flag, bootstrap.

A cell is one configuration with every field but lr and seed fixed. Its loss curve is the mean
over seeds at each lr of the grid; a diverged trial counts as +inf (so an lr where any seed
diverged is never the argmin), an lr with no trial is simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .fitting import ParabolaFit, fit_parabola
from .load import CONFIG_COLUMNS, Results

N_BOOTSTRAP = 1000
# Parabola refinement uses this many grid points centred on the argmin (shifted inward at the
# grid's ends): 5 on a half-octave grid spans 2 octaves around the minimum.
WINDOW = 5
# Near-optimal set: lrs whose mean loss is within this fraction of the cell's best (Step Law).
NEAR_OPTIMAL = 0.0025
# Resample seeds only when every lr of the cell has at least this many: the spread of 2 seeds
# has one degree of freedom, and its bootstrap intervals covered the truth ~87 % of the time on
# synthetic stores; the pooled spread (parametric) covers it as advertised.
MIN_SEEDS_TO_RESAMPLE = 3
# One seed and no seed-to-seed spread anywhere in the store: the parametric bootstrap uses the
# RMS residual of the cell's parabola fit, but never less than this fraction of the loss (a
# perfect parabola through 3 points has no residual at all, yet the loss is not noise-free).
NOISE_FLOOR_REL = 0.001


@dataclass
class Located:
    """Optima of N loss curves on one lr grid (arrays of shape (N,))."""

    x_star: np.ndarray  # log2 lr*, NaN when every point diverged
    loss_star: np.ndarray
    argmin: np.ndarray  # index into the grid
    refined: np.ndarray  # the parabola was used
    interior: np.ndarray  # inside [x_1, x_{L-2}] and the argmin not at an end
    valid: np.ndarray  # some point is finite
    fit: ParabolaFit


def locate_optimum(x: np.ndarray, y: np.ndarray, window: int = WINDOW) -> Located:
    """Optima of curves `y` (N, L) on the ascending grid `x` (L,) (log2 lr).

    +inf marks a diverged point, NaN an unmeasured one. The parabola through the `window` grid
    points around the argmin refines it; a fit that is not convex (a <= 0) or has fewer than 3
    finite points falls back to the argmin, and a vertex outside the fitted points is clipped
    to them (the parabola is not trusted beyond its data).
    """
    x = np.asarray(x, float)
    y = np.atleast_2d(np.asarray(y, float))
    n_grid = len(x)
    for_argmin = np.where(np.isnan(y), np.inf, y)
    valid = np.isfinite(for_argmin).any(axis=1)
    i = np.argmin(for_argmin, axis=1)
    k = min(window, n_grid)
    start = np.clip(i - k // 2, 0, n_grid - k)
    idx = start[:, None] + np.arange(k)
    fit = fit_parabola(x[idx], np.take_along_axis(y, idx, axis=1))
    refined = fit.convex & valid
    vertex = np.clip(fit.vertex, fit.x_lo, fit.x_hi)
    grid_min = np.take_along_axis(for_argmin, i[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore"):
        x_star = np.where(refined, vertex, np.where(valid, x[i], np.nan))
        loss_star = np.where(refined, fit(vertex), np.where(valid, grid_min, np.nan))
    if n_grid >= 3:
        interior = valid & (i > 0) & (i < n_grid - 1) & (x_star >= x[1]) & (x_star <= x[-2])
    else:
        interior = np.zeros(len(y), bool)
    return Located(x_star, loss_star, i, refined, interior, valid, fit)


@dataclass
class Optima:
    """Per-cell optima.

    table: one row per cell (config columns, label, log2_lr_star, ci, edge, ...).
    curves: one row per (cell, lr): mean loss over seeds (inf if any seed diverged), sem, counts.
    samples: cell -> bootstrap samples of log2 lr* (NaN where a resample had no optimum); all
        arrays share one length so transfer fits can combine them resample by resample.
    seed_spread: optimizer -> pooled seed-to-seed standard deviation of the loss ("*": all).
    """

    table: pd.DataFrame
    curves: pd.DataFrame
    samples: dict[int, np.ndarray]
    seed_spread: dict[str, float]
    _curve_index: dict[int, pd.DataFrame] | None = field(default=None, repr=False)

    def curve(self, cell: int) -> pd.DataFrame:
        """The loss curve of one cell (indexed once: per-family filtering of the whole frame
        dominated the transfer fits on large stores)."""
        if self._curve_index is None:
            self._curve_index = {int(c): g for c, g in self.curves.groupby("cell", sort=False)}
        return self._curve_index.get(int(cell), self.curves.iloc[:0])


def seed_spread(usable: pd.DataFrame) -> dict[str, float]:
    """Pooled within-(cell, lr) standard deviation of finite losses, per optimizer and overall."""
    finite = usable[np.isfinite(usable["loss"])]
    g = finite.groupby(["cell", "log2_lr"])["loss"]
    stats = pd.DataFrame({"var": g.var(ddof=1), "n": g.size()}).reset_index()
    stats = stats[stats["n"] >= 2]
    if stats.empty:
        return {}
    stats["optimizer"] = stats["cell"].map(
        usable.drop_duplicates("cell").set_index("cell")["optimizer"]
    )
    stats["ss"] = stats["var"] * (stats["n"] - 1)
    stats["dof"] = stats["n"] - 1
    out = {"*": float(np.sqrt(stats["ss"].sum() / stats["dof"].sum()))}
    for opt, s in stats.groupby("optimizer"):
        out[str(opt)] = float(np.sqrt(s["ss"].sum() / s["dof"].sum()))
    return out


def _cell_matrix(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(grid x (L,), losses (L, R)): replicates packed to the left, NaN-padded, inf = diverged."""
    x, li = np.unique(part["log2_lr"].to_numpy(), return_inverse=True)
    rep = part.groupby("log2_lr").cumcount().to_numpy()
    y = np.full((len(x), rep.max() + 1), np.nan)
    y[li, rep] = np.where(part["diverged"].to_numpy(), np.inf, part["loss"].to_numpy())
    return x, y


def _mean_over_replicates(y: np.ndarray) -> np.ndarray:
    """Mean of each row's measured values (inf if any is inf), NaN for a row with none."""
    n = (~np.isnan(y)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(np.isnan(y), 0.0, y).sum(axis=-1)
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _sem(y: np.ndarray) -> np.ndarray:
    """Standard error of each row's finite values (NaN with fewer than two)."""
    fin = np.isfinite(y)
    n = fin.sum(axis=1)
    mean = np.where(fin, y, 0.0).sum(axis=1) / np.maximum(n, 1)
    with np.errstate(invalid="ignore"):
        ss = (np.where(fin, y - mean[:, None], 0.0) ** 2).sum(axis=1)
    return np.where(n >= 2, np.sqrt(ss / np.maximum(n - 1, 1) / np.maximum(n, 1)), np.nan)


def _seed_resamples(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, L): at each lr, draw its replicates with replacement and average them.

    The spread of a resampled mean around the sample mean is sqrt((n-1)/n) too small (half
    the variance with 2 seeds, which made 95 % intervals cover the truth ~80 % of the time on
    synthetic stores); deviations are scaled up by sqrt(n/(n-1)) to undo that.
    """
    counts = (~np.isnan(y)).sum(axis=1)
    out = np.full((n_boot, len(y)), np.nan)
    for n in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == n)
        vals = y[rows, :n]  # replicates are packed to the left
        draw = rng.integers(0, n, size=(n_boot, len(rows), n))
        picked = np.take_along_axis(np.broadcast_to(vals, (n_boot, *vals.shape)), draw, axis=2)
        with np.errstate(invalid="ignore"):
            means = picked.mean(axis=2)
            if n >= 2:
                centre = vals.mean(axis=1)
                finite = np.isfinite(means) & np.isfinite(centre)
                scaled = centre + (means - centre) * np.sqrt(n / (n - 1))
                means = np.where(finite, scaled, means)
            out[:, rows] = means
    return out


def _residual_sigma(x: np.ndarray, mean: np.ndarray, located: Located) -> float:
    """RMS residual of the cell's parabola over its window (degrees of freedom n - 3)."""
    if not located.refined[0]:
        return float("nan")
    inside = (x >= located.fit.x_lo[0]) & (x <= located.fit.x_hi[0]) & np.isfinite(mean)
    dof = int(inside.sum()) - 3
    if dof < 1:
        return float("nan")
    resid = mean[inside] - (
        located.fit.a[0] * x[inside] ** 2 + located.fit.b[0] * x[inside] + located.fit.c[0]
    )
    return float(np.sqrt(np.sum(resid**2) / dof))


def find_optima(
    results: Results,
    *,
    n_bootstrap: int = N_BOOTSTRAP,
    window: int = WINDOW,
    seed: int = 0,
) -> Optima:
    """The optimum of every cell with at least one usable trial, with its bootstrap interval."""
    usable = results.usable.sort_values(["cell", "log2_lr", "seed"], kind="stable")
    spread = seed_spread(usable)
    rng = np.random.default_rng(seed)
    rows, curve_parts, samples = [], [], {}
    first = usable.drop_duplicates("cell").set_index("cell")

    for cell, part in usable.groupby("cell", sort=True):
        x, y = _cell_matrix(part)
        mean = _mean_over_replicates(y)
        n_rep = (~np.isnan(y)).sum(axis=1)
        sem = _sem(y)
        curve_parts.append(
            pd.DataFrame(
                {
                    "cell": cell,
                    "log2_lr": x,
                    "mean": mean,
                    "sem": sem,
                    "n": n_rep,
                    "n_diverged": np.isinf(y).sum(axis=1),
                }
            )
        )

        point = locate_optimum(x, mean[None, :], window)
        opt = str(first.loc[cell, "optimizer"])
        sigma = spread.get(opt, spread.get("*", float("nan")))
        if n_rep.min() >= MIN_SEEDS_TO_RESAMPLE:
            kind = "seeds"
            boot = _seed_resamples(y, n_bootstrap, rng)
        else:
            # Too few seeds to resample: Gaussian noise on each lr's mean, of the pooled
            # seed-to-seed spread over sqrt(seeds at that lr).
            kind = "parametric"
            if not np.isfinite(sigma):
                kind = "parametric-residual"
                resid = _residual_sigma(x, mean, point)
                floor = NOISE_FLOOR_REL * abs(float(point.loss_star[0]))
                sigma = max(resid, floor) if np.isfinite(resid) else 5 * floor
            scale = (sigma if np.isfinite(sigma) else 0.0) / np.sqrt(np.maximum(n_rep, 1))
            boot = mean[None, :] + rng.standard_normal((n_bootstrap, len(x))) * scale
            # inf (diverged) stays inf and NaN (unmeasured) stays NaN
        located = locate_optimum(x, boot, window)
        draws = np.where(located.valid, located.x_star, np.nan)
        samples[int(cell)] = draws
        n_valid = int(np.isfinite(draws).sum())
        ci = (
            np.nanquantile(draws, [0.025, 0.975])
            if n_valid >= max(10, n_bootstrap // 2)
            else [np.nan, np.nan]
        )

        valid = bool(point.valid[0])
        i = int(point.argmin[0])
        xs = float(point.x_star[0])
        interior = bool(point.interior[0])
        if not valid:
            status, edge_side = "all_diverged" if np.isinf(y).any() else "no_data", None
        elif len(x) < 3:  # no interior to speak of: neither an optimum nor an edge
            status, edge_side = "too_few_lrs", None
        elif interior:
            status, edge_side = "ok", None
        else:
            status = "edge"
            low = i == 0 or (len(x) >= 2 and xs < x[min(1, len(x) - 1)])
            edge_side = "low" if low else "high"
        finite_mean = np.where(np.isfinite(mean), mean, np.nan)
        best = np.nanmin(finite_mean) if valid else np.nan
        near = x[finite_mean <= best * (1 + NEAR_OPTIMAL)] if valid else np.array([])
        rows.append(
            {
                "cell": int(cell),
                "n_lr": len(x),
                "n_seeds": int(n_rep.max()),
                "n_trials": int(n_rep.sum()),
                "n_diverged": int(np.isinf(y).sum()),
                "log2_lr_min": float(x[0]),
                "log2_lr_max": float(x[-1]),
                "argmin_log2_lr": float(x[i]) if valid else np.nan,
                "log2_lr_star": xs,
                "lr_star": float(2.0**xs) if valid else np.nan,
                "loss_star": float(point.loss_star[0]),
                "method": "parabola" if point.refined[0] else ("argmin" if valid else "none"),
                "status": status,
                "edge": status == "edge",
                "edge_side": edge_side,
                "ci_lo": float(ci[0]),
                "ci_hi": float(ci[1]),
                "interior_frac": float(located.interior.mean()),
                "bootstrap": kind,
                "seed_sigma": float(sigma) if sigma is not None else np.nan,
                "parabola_a": float(point.fit.a[0]) if point.refined[0] else np.nan,
                "parabola_b": float(point.fit.b[0]) if point.refined[0] else np.nan,
                "parabola_c": float(point.fit.c[0]) if point.refined[0] else np.nan,
                "fit_lo": float(point.fit.x_lo[0]) if point.refined[0] else np.nan,
                "fit_hi": float(point.fit.x_hi[0]) if point.refined[0] else np.nan,
                "near_opt_lo": float(near.min()) if len(near) else np.nan,
                "near_opt_hi": float(near.max()) if len(near) else np.nan,
            }
        )

    table = pd.DataFrame(rows)
    if table.empty:
        return Optima(table, pd.DataFrame(), samples, spread)
    config = first[[*CONFIG_COLUMNS, "label", "tokens", "n_params"]]
    table = config.join(table.set_index("cell"), how="right").reset_index()
    curves = pd.concat(curve_parts, ignore_index=True)
    return Optima(table, curves, samples, spread)


def loss_at(optimum: pd.Series, curve: pd.DataFrame, x: float) -> float:
    """The cell's loss at log2 lr `x`: its parabola inside the fitted window, else the measured
    curve interpolated linearly in log2 lr (inf if it crosses a diverged point, NaN off-grid)."""
    if optimum["method"] == "parabola" and optimum["fit_lo"] <= x <= optimum["fit_hi"]:
        return float(
            optimum["parabola_a"] * x**2 + optimum["parabola_b"] * x + optimum["parabola_c"]
        )
    c = curve.sort_values("log2_lr")
    c = c[~np.isnan(c["mean"].to_numpy())]
    gx, gy = c["log2_lr"].to_numpy(), c["mean"].to_numpy()
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
