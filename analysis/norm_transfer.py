"""Norm transfer: is the loss-optimal output-layer norm the same across horizons and widths?

For each (lr, B) at a token horizon D: the mean loss over seeds and the geometric-mean output
norm (`out_rms_to_inf`). Per (configuration, D, B) the lr sweep traces a curve of loss against
x = log2 norm; a weighted parabola (weights 1/sigma^2 from the seeds' standard error) through
the ~7 points around its minimum gives the optimal norm x0 = -b / 2a. Many (lr, B) pairs reach
a given norm and only one reaches the best loss, so the headline per (configuration, D) is the
fit at the batch size with the lowest loss; the other batch sizes are kept in `fits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .fitting import fit_parabola
from .load import CONFIG_COLUMNS

N_POINTS = 7
N_BOOTSTRAP = 1000
# A point's seed variance from 2-3 seeds is too noisy for 1/sigma^2 weights (a lucky small
# spread makes one point dominate the fit): it is shrunk toward the pooled within-point variance
# as if that came with this many degrees of freedom.
PRIOR_DOF = 4
# Seeds are resampled (bootstrap) only when every point has at least this many; otherwise the
# interval comes from Gaussian noise of each point's standard error (see optimum.py).
MIN_SEEDS_TO_RESAMPLE = 3
# Optimal norms of one configuration agreeing within this many octaves (standard deviation)
# count as "the same".
CONSISTENT_SD = 0.5

NORM_GROUP = tuple(c for c in CONFIG_COLUMNS if c not in ("batch_size", "steps"))


@dataclass
class NormTransfer:
    """points: (group, horizon, batch_size, log2_lr) -> loss, sem, log2_norm, n_seeds.
    fits: one row per (group, horizon, batch_size): log2_norm_opt with CI, status.
    best: one row per (group, horizon): the fit at the batch size with the lowest loss.
    across_horizons / across_widths: spread of the best optimal norms.
    """

    points: pd.DataFrame
    fits: pd.DataFrame
    best: pd.DataFrame
    across_horizons: list[dict[str, Any]] = field(default_factory=list)
    across_widths: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _point_sems(loss: np.ndarray, n: np.ndarray) -> np.ndarray | None:
    """Standard error of each point's mean loss, its variance shrunk toward the pooled
    within-point variance (PRIOR_DOF pseudo-degrees of freedom); None without any seeds to
    estimate a spread from."""
    mean = np.nansum(loss, axis=1) / n
    ss = np.nansum((loss - mean[:, None]) ** 2, axis=1)
    dof = n - 1
    if dof.sum() == 0:
        return None
    pooled = ss.sum() / dof.sum()
    if not pooled > 0:
        return None
    var = (ss + PRIOR_DOF * pooled) / (dof + PRIOR_DOF)
    return np.sqrt(var / n)


def _fit_one(
    loss: np.ndarray,  # (K, S) per point and seed, NaN-padded
    norm: np.ndarray,  # (K, S) log2 norms
    rng: np.random.Generator,
    n_boot: int,
    n_points: int,
    fixed_c: float | None,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The point fit, and the bootstrap resamples (x, y, weights), each (n_boot, n_points) and
    NaN-padded, for one batched fit of every configuration's resamples afterwards."""
    n = (~np.isnan(loss)).sum(axis=1)
    y = np.nansum(loss, axis=1) / n
    x = np.nansum(norm, axis=1) / n
    order = np.argsort(x)
    x, y, n, loss, norm = x[order], y[order], n[order], loss[order], norm[order]
    i = int(np.argmin(y))
    k = min(n_points, len(x))
    s = int(np.clip(i - k // 2, 0, len(x) - k))
    sl = slice(s, s + k)
    sem = _point_sems(loss, n)
    sem = None if sem is None else sem[sl]
    w = None if sem is None else 1.0 / sem**2
    fit = fit_parabola(x[sl], y[sl], w, fixed_c=fixed_c)
    out: dict[str, Any] = {
        "n_points": int(k),
        "weighted": w is not None,
        "log2_norm_opt": np.nan,
        "ci_lo": np.nan,
        "ci_hi": np.nan,
        "loss_opt": np.nan,
        "a": float(fit.a),
        "b": float(fit.b),
        "c": float(fit.c),
        "x_lo": float(fit.x_lo),
        "x_hi": float(fit.x_hi),
        "bootstrap": None,
    }
    if k < fit.min_points:
        out["status"] = "too_few_points"
        return out, None
    if not bool(fit.convex):
        out["status"] = "not_convex"
        return out, None
    x0 = float(fit.vertex)
    out["log2_norm_opt"] = x0
    out["loss_opt"] = float(fit(x0))
    interior = fit.x_lo <= x0 <= fit.x_hi and 0 < i < len(x) - 1
    out["status"] = "ok" if interior else "edge"

    # Bootstrap: resample seeds per point (loss and norm together) when there are enough,
    # else Gaussian noise of each point's standard error (of the fit's residuals without seeds).
    ys, xs, ns = loss[sl], norm[sl], n[sl]
    if ns.min() >= MIN_SEEDS_TO_RESAMPLE:
        # Each point draws as many seeds as it has: the first ns[k] of S draws count.
        width = ys.shape[1]
        draws = rng.integers(0, 1 << 30, size=(n_boot, k, width)) % ns[None, :, None]
        counted = (np.arange(width)[None, :] < ns[:, None]) / ns[:, None]
        picked_y = np.take_along_axis(np.broadcast_to(ys, (n_boot, *ys.shape)), draws, 2)
        picked_x = np.take_along_axis(np.broadcast_to(xs, (n_boot, *xs.shape)), draws, 2)
        # Undo the bootstrap's sqrt((n-1)/n) shrinkage of a mean's spread.
        inflate = np.sqrt(ns / (ns - 1))
        by = y[sl] + ((picked_y * counted).sum(2) - y[sl]) * inflate
        bx = x[sl] + ((picked_x * counted).sum(2) - x[sl]) * inflate
        out["bootstrap"] = "seeds"
    else:
        if sem is not None:
            sigma = sem
        else:
            dof = k - (3 if fixed_c is None else 2)
            resid = y[sl] - fit(x[sl])
            floor = 0.001 * float(np.nanmin(y[sl]))
            sigma = float(np.sqrt(resid @ resid / dof)) if dof > 0 else floor
        by = y[sl][None, :] + rng.standard_normal((n_boot, k)) * sigma
        bx = np.broadcast_to(x[sl], by.shape)
        out["bootstrap"] = "parametric"
    pad = ((0, 0), (0, n_points - k))
    weights = np.broadcast_to(np.ones(k) if w is None else w, by.shape)
    return out, (
        np.pad(bx, pad, constant_values=np.nan),
        np.pad(by, pad, constant_values=np.nan),
        np.pad(weights, pad, constant_values=0.0),
    )


def _bootstrap_intervals(
    rows: list[dict[str, Any]],
    draws: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]],
    fixed_c: float | None,
    n_boot: int,
) -> None:
    """Fit every configuration's resamples in one batched call and set ci_lo / ci_hi."""
    if not draws:
        return
    bx = np.stack([d[1][0] for d in draws])
    by = np.stack([d[1][1] for d in draws])
    bw = np.stack([d[1][2] for d in draws])
    fit = fit_parabola(bx, by, bw, fixed_c=fixed_c)
    vertex, convex = fit.vertex, fit.convex
    for j, (row_index, _) in enumerate(draws):
        v = vertex[j][convex[j]]
        if len(v) >= n_boot // 2:
            rows[row_index]["ci_lo"], rows[row_index]["ci_hi"] = (
                float(q) for q in np.quantile(v, [0.025, 0.975])
            )


def fit_norm_transfer(
    horizons: pd.DataFrame,
    *,
    n_points: int = N_POINTS,
    n_bootstrap: int = N_BOOTSTRAP,
    fixed_c: float | None = None,
    seed: int = 0,
) -> NormTransfer | None:
    """Optimal output norms from a horizon table (see `horizons.horizon_table`); None when the
    store logged no output norm."""
    if horizons.empty:
        return None
    data = horizons[~horizons["diverged"] & np.isfinite(horizons["log2_norm"].to_numpy(float))]
    if data.empty:
        return None
    rng = np.random.default_rng(seed)
    group = [*NORM_GROUP, "horizon", "batch_size"]
    point_keys = [*group, "log2_lr"]
    g = data.groupby(point_keys, dropna=False, sort=True)
    points = g.agg(
        loss=("loss", "mean"),
        loss_sd=("loss", "std"),
        log2_norm=("log2_norm", "mean"),
        n_seeds=("loss", "size"),
    ).reset_index()
    points["sem"] = points["loss_sd"] / np.sqrt(points["n_seeds"])
    points = points.drop(columns="loss_sd")

    rows: list[dict[str, Any]] = []
    draws: list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    data = data.assign(rep=data.groupby(point_keys, dropna=False).cumcount())
    for key, part in data.groupby(group, dropna=False, sort=True):
        pid, lr_values = pd.factorize(part["log2_lr"], sort=True)
        loss = np.full((len(lr_values), part["rep"].max() + 1), np.nan)
        norm = np.full_like(loss, np.nan)
        loss[pid, part["rep"]] = part["loss"].to_numpy()
        norm[pid, part["rep"]] = part["log2_norm"].to_numpy()
        res, resamples = _fit_one(loss, norm, rng, n_bootstrap, n_points, fixed_c)
        if resamples is not None:
            draws.append((len(rows), resamples))
        rows.append({**dict(zip(group, key, strict=True)), **res})
    _bootstrap_intervals(rows, draws, fixed_c, n_bootstrap)
    fits = pd.DataFrame(rows)
    fits["log2_norm_opt"] = fits["log2_norm_opt"].astype(float)

    # Per (configuration, horizon): the batch size whose fit reaches the lowest loss.
    ranked = fits.assign(
        _rank=np.where(fits["status"] == "ok", fits["loss_opt"], np.inf),
    ).sort_values(["_rank"], kind="stable")
    best = ranked.drop_duplicates([*NORM_GROUP, "horizon"], keep="first").drop(columns="_rank")
    best = best.sort_values([*NORM_GROUP, "horizon"]).reset_index(drop=True)

    result = NormTransfer(points, fits, best)
    _spreads(result)
    return result


def _spread(values: np.ndarray) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": float(values.mean()) if len(values) else None,
        "sd": float(values.std(ddof=1)) if len(values) >= 2 else None,
        "min": float(values.min()) if len(values) else None,
        "max": float(values.max()) if len(values) else None,
    }


def _spreads(nt: NormTransfer) -> None:
    ok = nt.best[nt.best["status"] == "ok"]
    for key, part in ok.groupby(list(NORM_GROUP), dropna=False, sort=True):
        cfg = dict(zip(NORM_GROUP, key, strict=True))
        nt.across_horizons.append(
            {
                "optimizer": cfg["optimizer"],
                "width": int(cfg["width"]),
                "depth": int(cfg["depth"]),
                "horizons": [int(h) for h in part["horizon"]],
                "log2_norm_opt": [float(v) for v in part["log2_norm_opt"]],
                **_spread(part["log2_norm_opt"].to_numpy(float)),
            }
        )
    no_width = [c for c in NORM_GROUP if c != "width"]
    for key, part in ok.groupby([*no_width, "horizon"], dropna=False, sort=True):
        cfg = dict(zip([*no_width, "horizon"], key, strict=True))
        if part["width"].nunique() < 2:
            continue
        part = part.sort_values("width")
        nt.across_widths.append(
            {
                "optimizer": cfg["optimizer"],
                "depth": int(cfg["depth"]),
                "horizon": int(cfg["horizon"]),
                "widths": [int(w) for w in part["width"]],
                "log2_norm_opt": [float(v) for v in part["log2_norm_opt"]],
                **_spread(part["log2_norm_opt"].to_numpy(float)),
            }
        )
    per_opt = {}
    for opt, part in ok.groupby("optimizer"):
        s = _spread(part["log2_norm_opt"].to_numpy(float))
        s["consistent"] = bool(s["sd"] is not None and s["sd"] <= CONSISTENT_SD)
        per_opt[str(opt)] = s
    nt.summary = {
        "n_fits": int(len(nt.fits)),
        "n_ok": int((nt.fits["status"] == "ok").sum()),
        "by_optimizer": per_opt,
        "consistent_sd_octaves": CONSISTENT_SD,
    }
