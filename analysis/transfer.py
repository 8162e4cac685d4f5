"""Does the optimal lr transfer across width (or depth)?

A family is a set of cells equal in everything but the size axis. Per family: the slope of
log2 lr* against log2 size by least squares, its interval from the cells' bootstrap draws
(combined draw by draw) widened by the location method's own error, the three-way verdict of
analysis/verdict.py on that interval, the drift in octaves, the transfer penalty (what copying
the smallest model's lr to the largest costs) with its interval from the same draws, a "wider is
better" check and an optional prediction for an untrained size. With one seed and no measured
noise the slope's interval comes from the optima's scatter about the line (Student's t with
n - 2 degrees of freedom; none from two sizes). Only interior optima enter the fit: an optimum on
the grid's edge or bounded by divergence is a bound, not a measurement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .fitting import Z_975, t_quantile_975
from .load import CONFIG_COLUMNS, format_value
from .optimum import Optima, loss_at, method_sd, widen
from .verdict import DEFAULT_TOLERANCE, judge

TRANSFER_AXES = ("width", "depth")


@dataclass
class TransferFit:
    """One family's transfer across `axis`. Octaves are log2 units; slopes are octaves of lr*
    per doubling of the size. Intervals are 95 %."""

    axis: str
    optimizer: str
    family: dict[str, Any]  # the family's fixed values of the store's varying config columns
    label: str
    sizes: list[int]
    cells: list[int]
    log2_lr_star: list[float | None]
    log2_lr_star_ci: list[list[float | None]]
    size_status: list[str]  # per size: ok | edge | all_diverged | no_data
    used: list[bool]  # per size: entered the fit
    loss_star: list[float | None]
    n_seeds: int  # fewest seeds of any of the family's cells
    status: str = "impossible"  # ok | impossible
    reason: str | None = None  # why the fit is impossible, in words
    slope: float | None = None
    slope_ci: list[float] | None = None
    intercept: float | None = None
    noise: str | None = None  # where the slope's interval comes from: seeds | scatter
    verdict: str = "inconclusive"  # transfers | drifts | inconclusive (analysis/verdict.py)
    verdict_why: str | None = None
    tolerance: float | None = None  # octaves of lr* per doubling
    drift: float | None = None  # log2 lr*(largest used size) - log2 lr*(smallest), octaves
    drift_ci: list[float] | None = None
    penalty: float | None = None  # L(s_max, lr*(s_min)) - L(s_max, lr*(s_max)), nats
    penalty_ci: list[float] | None = None
    penalty_rel: float | None = None  # penalty / L(s_max, lr*(s_max))
    penalty_rel_ci: list[float] | None = None
    penalty_note: str | None = None
    wider_is_better: bool | None = None  # at one fixed lr near the optima, loss falls with size
    wider_log2_lr: float | None = None
    wider_losses: list[float | None] = field(default_factory=list)
    best_loss_falls: bool | None = None  # the optimal loss falls with size
    prediction: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _range_words(axis: str, sizes: list[int]) -> str:
    return f"{axis} {', '.join(str(s) for s in sizes)}"


def _impossible_reason(axis: str, sizes: list[int], status: list[str], sides: list) -> str:
    if len(sizes) == 1:
        return f"fit impossible: only one {axis} ({sizes[0]}) in this family"
    if all(s in ("all_diverged", "no_data") for s in status):
        return f"fit impossible: every trial diverged at every {axis}"
    parts = []
    edge = [sz for sz, s in zip(sizes, status, strict=True) if s == "edge"]
    if edge:
        low = [
            sz
            for sz, s, side in zip(sizes, status, sides, strict=True)
            if s == "edge" and side == "low"
        ]
        direction = (
            "smaller" if len(low) == len(edge) else ("larger" if not low else "smaller and larger")
        )
        parts.append(
            f"the optimum lies on the lr grid's edge at {_range_words(axis, edge)}"
            f" (widen the grid towards {direction} lrs)"
        )
    bounded = [sz for sz, s in zip(sizes, status, strict=True) if s == "divergence_bounded"]
    if bounded:
        parts.append(
            f"the optimum is bounded by divergence at {_range_words(axis, bounded)} (the loss"
            " still falls at the last lr where no seed diverged: a finer grid below the"
            " divergence would locate it)"
        )
    dead = [sz for sz, s in zip(sizes, status, strict=True) if s == "all_diverged"]
    if dead:
        parts.append(f"every trial diverged at {_range_words(axis, dead)}")
    short = [sz for sz, s in zip(sizes, status, strict=True) if s == "too_few_lrs"]
    if short:
        parts.append(f"fewer than 3 lrs on the grid at {_range_words(axis, short)}")
    return "fit impossible: fewer than two sizes with an interior optimum; " + "; ".join(parts)


def fit_transfer(
    optima: Optima,
    axis: str = "width",
    *,
    varying: list[str] | None = None,
    predict: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[TransferFit]:
    """One TransferFit per family of cells that differ only in `axis` (width or depth)."""
    if axis not in TRANSFER_AXES:
        raise ValueError(f"axis must be one of {TRANSFER_AXES}")
    table = optima.table
    if table.empty:
        return []
    keys = [c for c in CONFIG_COLUMNS if c != axis]
    shown = [c for c in (varying or []) if c not in (axis, "optimizer")]
    fits = []
    for _, fam in table.groupby(keys, dropna=False, sort=True):
        fam = fam.sort_values(axis)
        first = fam.iloc[0]
        family = {c: first[c].item() if hasattr(first[c], "item") else first[c] for c in shown}
        label = " ".join([str(first["optimizer"]), *(format_value(c, first[c]) for c in shown)])
        sizes = [int(s) for s in fam[axis]]
        fit = TransferFit(
            axis=axis,
            optimizer=str(first["optimizer"]),
            family=family,
            label=label,
            sizes=sizes,
            cells=[int(c) for c in fam["cell"]],
            log2_lr_star=[_clean(v) for v in fam["log2_lr_star"]],
            log2_lr_star_ci=[
                [_clean(a), _clean(b)] for a, b in zip(fam["ci_lo"], fam["ci_hi"], strict=True)
            ],
            size_status=list(fam["status"]),
            used=list(fam["status"] == "ok"),
            loss_star=[_clean(v) for v in fam["loss_star"]],
            n_seeds=int(fam["n_seeds"].min()),
        )
        _fill(fit, fam, optima, predict, tolerance)
        fits.append(fit)
    return fits


def _what_would_settle(fit: TransferFit, used: pd.DataFrame) -> str:
    """The cheapest changes that would narrow this family's slope interval."""
    wants = []
    seeds = int(used["n_seeds"].min())
    if seeds < 3:
        wants.append(f"3 or more seeds per point (now {seeds})")
    step = float(used["lr_step"].max())
    if step > 0.5:
        wants.append(f"a finer lr grid near the optimum (now {step:.2g} octave)")
    doublings = np.log2(fit.sizes[-1] / fit.sizes[0])
    if doublings < 3:
        wants.append(f"a wider range of {fit.axis}s (now {doublings:g} doublings)")
    return " or ".join(wants) if wants else "more seeds"


def _fill(
    fit: TransferFit, fam: pd.DataFrame, optima: Optima, predict: int | None, tolerance: float
) -> None:
    fit.tolerance = tolerance
    _wider_is_better(fit, fam, optima)
    used = fam[fam["status"] == "ok"]
    if len(used) < 2:
        fit.reason = _impossible_reason(
            fit.axis, fit.sizes, fit.size_status, list(fam["edge_side"])
        )
        fit.verdict, fit.verdict_why = "inconclusive", fit.reason
        return
    fit.status = "ok"
    x = np.log2(used[fit.axis].to_numpy(float))
    y = used["log2_lr_star"].to_numpy(float)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean()) / sxx)
    fit.slope, fit.intercept = slope, float(y.mean() - slope * x.mean())
    fit.drift = float(y[-1] - y[0])
    # The location method's error, as standard deviations, enters every interval in quadrature.
    m_sd = np.array([method_sd(v) for v in used["method_error"]])
    slope_method = Z_975 * float(np.sqrt(np.sum((xc / sxx) ** 2 * m_sd**2)))
    drift_method = Z_975 * float(np.hypot(m_sd[0], m_sd[-1]))

    samples = [optima.samples(c) for c in used["cell"]]
    slopes = intercepts = draws = None
    if all(s is not None for s in samples):
        draws = np.column_stack(samples)
        draws = draws[np.isfinite(draws).all(axis=1)]
        if len(draws) >= max(10, optima.n_bootstrap // 2):
            slopes = (draws - draws.mean(axis=1, keepdims=True)) @ xc / sxx
            intercepts = draws.mean(axis=1) - slopes * x.mean()
            fit.slope_ci = widen(slope, *np.quantile(slopes, [0.025, 0.975]), slope_method)
            dq = np.quantile(draws[:, -1] - draws[:, 0], [0.025, 0.975])
            fit.drift_ci = widen(fit.drift, *dq, drift_method)
            fit.noise = "seeds"
    elif len(used) >= 3:
        # No measured seed noise: the scatter of the optima about the line is the only
        # measurement of it (Student's t with n - 2 degrees of freedom).
        resid = y - (fit.intercept + slope * x)
        se = float(np.sqrt(resid @ resid / (len(y) - 2) / sxx))
        half = t_quantile_975(len(y) - 2) * se
        fit.slope_ci = widen(slope, slope - half, slope + half, slope_method)
        fit.noise = "scatter"
    v = judge(slope, fit.slope_ci, tolerance, settle=_what_would_settle(fit, used))
    fit.verdict, fit.verdict_why = v.verdict, v.why

    _penalty(fit, used, optima, draws)
    if predict is not None and fit.axis == "width":
        target = float(np.log2(predict))
        value = fit.intercept + fit.slope * target
        pred: dict[str, Any] = {
            "width": int(predict),
            "log2_lr": value,
            "lr": float(2.0**value),
            "extrapolation": bool(predict < fit.sizes[0] or predict > fit.sizes[-1]),
        }
        if slopes is not None:
            q = np.quantile(intercepts + slopes * target, [0.025, 0.975])
            pred["log2_lr_ci"] = [float(q[0]), float(q[1])]
            pred["lr_ci"] = [float(2.0 ** q[0]), float(2.0 ** q[1])]
        fit.prediction = pred


def _penalty(
    fit: TransferFit, used: pd.DataFrame, optima: Optima, draws: np.ndarray | None
) -> None:
    """What copying the smallest size's lr* to the largest costs, from the largest size's
    fitted curve (its measured curve, interpolated, beyond the fit's span), with an interval
    from the same draws as the slope's."""
    lo, hi = used.iloc[0], used.iloc[-1]
    copied = float(lo["log2_lr_star"])
    best = float(hi["loss_star"])
    excess = float(optima.point[int(hi["cell"])].excess(copied)[0])
    if np.isnan(excess):
        excess = loss_at(optima.curve(hi["cell"]), copied) - best
    if np.isnan(excess):
        fit.penalty_note = (
            f"lr*({fit.axis} {int(lo[fit.axis])}) lies outside the lr grid of"
            f" {fit.axis} {int(hi[fit.axis])}"
        )
        return
    if np.isinf(excess):
        fit.penalty_note = (
            f"copying lr*({fit.axis} {int(lo[fit.axis])}) to {fit.axis} {int(hi[fit.axis])}"
            " diverges"
        )
        return
    # The fitted minimum lies below the fitted curve anywhere else; the measured curve can dip
    # below it by noise: clip at 0.
    fit.penalty = max(0.0, excess)
    fit.penalty_rel = fit.penalty / best
    lo_samples = optima.samples(int(lo["cell"]))
    per_draw = None if draws is None else optima.excess_draws(int(hi["cell"]), lo_samples)
    if per_draw is None:
        return
    per_draw = np.clip(per_draw, 0.0, None)
    # A draw whose copied lr diverges costs everything: inf is a legitimate upper quantile.
    if (~np.isnan(per_draw)).mean() >= 0.9:
        q = np.nanquantile(per_draw, [0.025, 0.975], method="inverted_cdf")
        fit.penalty_ci = [float(q[0]), float(q[1])]
        fit.penalty_rel_ci = [float(q[0]) / best, float(q[1]) / best]


def _wider_is_better(fit: TransferFit, fam: pd.DataFrame, optima: Optima) -> None:
    valid = fam[np.isfinite(fam["loss_star"].to_numpy(float))]
    if len(valid) < 2:
        return
    stars = valid["loss_star"].to_numpy(float)
    fit.best_loss_falls = bool(np.all(np.diff(stars) < 0))
    # lrs measured (and not diverged) at every size; keys rounded to survive float noise.
    measured = []
    for cell in valid["cell"]:
        c = optima.curve(cell)
        fin = np.isfinite(c["mean"].to_numpy(float))
        measured.append(
            dict(
                zip(
                    np.round(c["log2_lr"].to_numpy(float)[fin], 9),
                    c["mean"].to_numpy(float)[fin],
                    strict=True,
                )
            )
        )
    common = np.array(sorted(set.intersection(*(set(m) for m in measured))))
    if len(common) == 0:
        return
    centre = float(np.median(valid["log2_lr_star"].to_numpy(float)))
    chosen = float(common[np.argmin(np.abs(common - centre))])
    losses = [float(m[chosen]) for m in measured]
    fit.wider_log2_lr = chosen
    fit.wider_losses = losses
    fit.wider_is_better = bool(np.all(np.diff(losses) < 0))


def spans_sizes(fits: Iterable[TransferFit]) -> bool:
    """Whether any family has two sizes or more: otherwise there is no transfer to show (a
    store with one width says so once, in its conclusions)."""
    return any(len(f.sizes) >= 2 for f in fits)


def headline(fits: list[TransferFit]) -> dict[str, TransferFit]:
    """Per optimizer, the family its figures show: most sizes used, most sizes, lowest loss."""
    best: dict[str, TransferFit] = {}

    def rank(f: TransferFit) -> tuple:
        losses = [v for v in f.loss_star if v is not None]
        return (sum(f.used), len(f.sizes), -(min(losses) if losses else np.inf))

    for f in fits:
        if f.optimizer not in best or rank(f) > rank(best[f.optimizer]):
            best[f.optimizer] = f
    return best
