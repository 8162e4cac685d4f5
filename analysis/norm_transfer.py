"""Norm transfer: is the loss-optimal output-layer norm the same across horizons and widths?

For each (lr, B) at a token horizon D: the mean loss over seeds and the geometric-mean output
norm (`out_rms_to_inf`). Per (configuration, D, B) the lr sweep traces a curve of loss against
x = log2 norm; a weighted parabola (weights 1/sigma^2 from the seeds' standard error) through
the ~7 points around its minimum gives the optimal norm x0 = -b / 2a. Many (lr, B) pairs reach
a given norm and only one reaches the best loss, so the headline per (configuration, D) is the
fit at the batch size with the lowest loss; the other batch sizes are kept in `fits`.

The claim "x0 is the same across horizons and widths" is tested like lr transfer: per family
(configurations equal but for width), the trend of x0 against log2 width and against log2 D,
both fitted at once by least squares (so neither trend absorbs the other), each slope in octaves
of optimal norm per doubling with a 95 % interval, judged by `verdict.judge` against a
tolerance. A spread below some threshold is not a test: a spread says nothing of a trend, and
two fits say nothing of a spread. Any verdict needs MIN_FITS interior fits over MIN_HORIZONS
horizons. Readings from where the lr schedule had begun to decay (see horizons.py) are left out.

An optimal norm is located only where the lr sets the norm: when the lrs of a fit's window move
the output norm by less than MIN_NORM_SPAN octave (a constrained optimizer holding the layer on
its norm ball, or a head trained by another optimizer at a fixed lr), the loss is not a function
of the norm there, and the "optimum" would only be the norm at the best lr, with an interval as
narrow as the window; such a fit is `norm_flat` and enters no trend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .fitting import Z_975, fit_parabola, ols, t_quantile_975
from .load import CONFIG_COLUMNS, format_value
from .verdict import DEFAULT_TOLERANCE, judge

N_POINTS = 7
N_BOOTSTRAP = 1000
# A point's seed variance from 2-3 seeds is too noisy for 1/sigma^2 weights (a lucky small
# spread makes one point dominate the fit): it is shrunk toward the pooled within-point variance
# as if that came with this many degrees of freedom.
PRIOR_DOF = 4
# Seeds are resampled (bootstrap) only when every point has at least this many; otherwise the
# interval comes from Gaussian noise of each point's standard error (see optimum.py).
MIN_SEEDS_TO_RESAMPLE = 3
# A trend needs a third fit to be more than a line through two points, and a second horizon to
# say anything about horizons (the brief of the claim: "at least 3 fits over 2 horizons").
MIN_FITS = 3
MIN_HORIZONS = 2
# Resamples in which every entering fit is convex, needed for a bootstrap slope interval (as a
# fraction of the resamples; otherwise the surviving ones are a biased subset).
MIN_BOOT_FRACTION = 0.5
TREND_AXES = ("width", "horizon")
# The least span of log2 norms a fit's window must cover: twice the default tolerance, so that
# an optimal norm moving by the tolerance (one doubling's worth of drift) stays inside it.
MIN_NORM_SPAN = 2 * DEFAULT_TOLERANCE
# A fit's status, in words, for the reasons a family's fits stay out of its trends.
STATUS_WORDS = {
    "edge": "the optimal norm on the edge of its fit",
    "not_convex": "a loss curve with no minimum",
    "too_few_points": "too few lrs",
    "norm_flat": f"lrs that move the output norm by under {MIN_NORM_SPAN:g} octave",
}

NORM_GROUP = tuple(c for c in CONFIG_COLUMNS if c not in ("batch_size", "steps"))
# A family: everything fixed but width (and horizon and batch size, inside each fit's group).
FAMILY = tuple(c for c in NORM_GROUP if c != "width")


@dataclass
class NormTransfer:
    """points: (group, horizon, batch_size, log2_lr) -> loss, sem, log2_norm, n_seeds.
    fits: one row per (group, horizon, batch_size): log2_norm_opt with CI, status.
    best: one row per (group, horizon): the fit at the batch size with the lowest loss (its
        index is that of the row in fits).
    across_widths / across_horizons: one trend record per family (see `_trend_records`): the
        slope of x0 per doubling of width / of horizon, its interval and verdict.
    summary: tolerance, counts, and per optimizer the verdicts of its headline family.
    samples: fits row index -> bootstrap samples of log2_norm_opt (NaN where a resample was not
        convex), all of one length so trends combine them resample by resample.
    """

    points: pd.DataFrame
    fits: pd.DataFrame
    best: pd.DataFrame
    across_horizons: list[dict[str, Any]] = field(default_factory=list)
    across_widths: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    samples: dict[int, np.ndarray] = field(default_factory=dict, repr=False)


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
        "n_seeds": int(n[sl].min()),
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
        "norm_span": float(np.ptp(x[sl])),
        "bootstrap": None,
    }
    if k < fit.min_points:
        out["status"] = "too_few_points"
        return out, None
    if out["norm_span"] < MIN_NORM_SPAN:
        out["status"] = "norm_flat"
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
        # A seed's offset is shared by every point of the fit and moves no optimum: with every
        # seed at every point, one draw of seed indices serves all points (seeds resampled
        # jointly); otherwise each point draws from the seeds it has, packed to the left.
        width = ys.shape[1]
        joint = bool((ns == width).all())
        if not joint:
            order = np.argsort(np.isnan(ys), axis=1, kind="stable")
            ys, xs = np.take_along_axis(ys, order, 1), np.take_along_axis(xs, order, 1)
        shape = (n_boot, 1, width) if joint else (n_boot, k, width)
        draws = np.broadcast_to(
            rng.integers(0, 1 << 30, size=shape) % ns[None, :, None], (n_boot, k, width)
        )
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
            out["bootstrap"] = "parametric"
        else:
            # No seeds to measure noise from: a guess from the fit's residuals, labelled so that
            # trends do not pass it on as a measured interval.
            dof = k - (3 if fixed_c is None else 2)
            resid = y[sl] - fit(x[sl])
            floor = 0.001 * float(np.nanmin(y[sl]))
            sigma = float(np.sqrt(resid @ resid / dof)) if dof > 0 else floor
            out["bootstrap"] = "parametric-residual"
        by = y[sl][None, :] + rng.standard_normal((n_boot, k)) * sigma
        bx = np.broadcast_to(x[sl], by.shape)
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
) -> dict[int, np.ndarray]:
    """Fit every configuration's resamples in one batched call and set ci_lo / ci_hi; returns
    each fit's vertex samples (NaN where not convex) by row index."""
    samples: dict[int, np.ndarray] = {}
    if not draws:
        return samples
    bx = np.stack([d[1][0] for d in draws])
    by = np.stack([d[1][1] for d in draws])
    bw = np.stack([d[1][2] for d in draws])
    fit = fit_parabola(bx, by, bw, fixed_c=fixed_c)
    vertex, convex = fit.vertex, fit.convex
    for j, (row_index, _) in enumerate(draws):
        samples[row_index] = np.where(convex[j], vertex[j], np.nan)
        v = vertex[j][convex[j]]
        if len(v) >= n_boot // 2:
            rows[row_index]["ci_lo"], rows[row_index]["ci_hi"] = (
                float(q) for q in np.quantile(v, [0.025, 0.975])
            )
    return samples


def fit_norm_transfer(
    horizons: pd.DataFrame,
    *,
    n_points: int = N_POINTS,
    n_bootstrap: int = N_BOOTSTRAP,
    fixed_c: float | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> NormTransfer | None:
    """Optimal output norms from a horizon table (see `horizons.horizon_table`) and their trends
    across width and horizon, judged against `tolerance` (octaves of optimal norm per doubling);
    None when the store logged no output norm."""
    if horizons.empty:
        return None
    decayed = (
        horizons["decayed"].to_numpy(bool)
        if "decayed" in horizons
        else np.zeros(len(horizons), bool)
    )
    data = horizons[
        ~decayed & ~horizons["diverged"] & np.isfinite(horizons["log2_norm"].to_numpy(float))
    ]
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
    # Column = the seed's rank within the configuration, so that a column is one seed (one
    # initialisation and batch order) at every point, and a resample can draw seeds jointly.
    data = data.assign(
        rep=data.groupby(group, dropna=False)["seed"].rank(method="dense").astype(int) - 1
    )
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
    samples = _bootstrap_intervals(rows, draws, fixed_c, n_bootstrap)
    fits = pd.DataFrame(rows)
    fits["log2_norm_opt"] = fits["log2_norm_opt"].astype(float)

    # Per (configuration, horizon): the batch size whose fit reaches the lowest loss.
    ranked = fits.assign(
        _rank=np.where(fits["status"] == "ok", fits["loss_opt"], np.inf),
    ).sort_values(["_rank"], kind="stable")
    best = ranked.drop_duplicates([*NORM_GROUP, "horizon"], keep="first").drop(columns="_rank")
    # best keeps the row labels of fits: they are the keys of the bootstrap samples.
    best = best.sort_values([*NORM_GROUP, "horizon"])

    result = NormTransfer(points, fits, best, samples=samples)
    varying = [
        c for c in FAMILY if c != "optimizer" and data[c].astype(str).nunique(dropna=False) > 1
    ]
    _trend_records(result, tolerance, n_bootstrap, varying)
    result.summary["n_decayed_excluded"] = int(decayed.sum())
    return result


# --------------------------------------------------------------------------- trends

_SETTLE = {
    "width": "more seeds, a finer lr grid near the optimal norm, or a wider range of widths",
    "horizon": "more seeds, a finer lr grid near the optimal norm, or a wider range of horizons",
}
# The keys of a trend record repeated in the summary.
_SUMMARY_KEYS = ("slope", "slope_ci", "n_fits", "n_horizons", "verdict", "verdict_why")


def _clean(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _item(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _family_label(optimizer: str, family: dict[str, Any]) -> str:
    # hparams is a JSON string: too long for a label, and kept in the family dict anyway.
    shown = [format_value(c, v) for c, v in family.items() if c != "hparams"]
    return " ".join([optimizer, *shown])


def _trend_records(nt: NormTransfer, tolerance: float, n_boot: int, varying: list[str]) -> None:
    """Fill across_widths, across_horizons and summary with one record per family and axis."""
    headline: dict[str, dict[str, dict[str, Any]]] = {}
    for _, fam in nt.best.groupby(list(FAMILY), dropna=False, sort=True):
        first = fam.iloc[0]
        optimizer = str(first["optimizer"])
        family = {c: _item(first[c]) for c in ("depth", *varying)}
        records = _family_trends(fam, nt.samples, tolerance, n_boot)
        for rec in records.values():
            rec.update(optimizer=optimizer, family=family, label=_family_label(optimizer, family))
        nt.across_widths.append(records["width"])
        nt.across_horizons.append(records["horizon"])
        # The family a summary sentence speaks for: the one with the most fits entered.
        n_fits = records["width"]["n_fits"]
        if optimizer not in headline or n_fits > headline[optimizer]["width"]["n_fits"]:
            headline[optimizer] = records
    by_optimizer = {}
    for opt, recs in sorted(headline.items()):
        by_optimizer[opt] = {
            "label": recs["width"]["label"],
            "n_families": sum(r["optimizer"] == opt for r in nt.across_widths),
            **{axis: {k: recs[axis][k] for k in _SUMMARY_KEYS} for axis in TREND_AXES},
        }
    nt.summary = {
        "tolerance": float(tolerance),
        "unit": "octaves of optimal output norm per doubling (of width, of horizon)",
        "min_fits": MIN_FITS,
        "min_horizons": MIN_HORIZONS,
        "n_fits": int(len(nt.fits)),
        "n_ok": int((nt.fits["status"] == "ok").sum()),
        "by_optimizer": by_optimizer,
    }


def _family_trends(
    fam: pd.DataFrame, samples: dict[int, np.ndarray], tolerance: float, n_boot: int
) -> dict[str, dict[str, Any]]:
    """The width and horizon trend records of one family (`fam`: its rows of `best`)."""
    used = _entered(fam)
    base = {
        "tolerance": float(tolerance),
        "n_fits": len(used),
        "n_horizons": int(used["horizon"].nunique()),
        "n_widths": int(used["width"].nunique()),
        "fits": [_fit_entry(r) for _, r in used.iterrows()],
        "not_used": [
            {"width": int(r["width"]), "horizon": int(r["horizon"]), "status": str(r["status"])}
            for _, r in fam.drop(used.index).iterrows()
        ],
    }
    out = {}
    for axis in TREND_AXES:
        out[axis] = {
            "axis": axis,
            "unit": f"octaves of optimal output norm per doubling of {axis}",
            "slope": None,
            "slope_ci": None,
            "slope_ci_method": None,
            "verdict": "inconclusive",
            "verdict_why": "",
            **base,
        }
    _judge_trends(out, used, fam, samples, tolerance, n_boot)
    return out


def _entered(fam: pd.DataFrame) -> pd.DataFrame:
    """The fits a trend rests on: interior optima only (an edge optimum is a bound)."""
    ok = (fam["status"] == "ok") & np.isfinite(fam["log2_norm_opt"].to_numpy(float))
    return fam[ok].sort_values(["width", "horizon"])


def _fit_entry(r: pd.Series) -> dict[str, Any]:
    lo, hi = _clean(r["ci_lo"]), _clean(r["ci_hi"])
    return {
        "width": int(r["width"]),
        "horizon": int(r["horizon"]),
        "batch_size": int(r["batch_size"]),
        "log2_norm_opt": float(r["log2_norm_opt"]),
        "log2_norm_opt_ci": None if lo is None or hi is None else [lo, hi],
        "bootstrap": r["bootstrap"],
    }


def _judge_trends(
    out: dict[str, dict[str, Any]],
    used: pd.DataFrame,
    fam: pd.DataFrame,
    samples: dict[int, np.ndarray],
    tolerance: float,
    n_boot: int,
) -> None:
    """Fit both trends at once and set each axis' slope, interval and verdict in `out`."""
    missing = _missing_words(used, fam)
    if len(used) == 0:
        for rec in out.values():
            rec["verdict_why"] = missing
        return
    x, names = _design(used)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        for rec in out.values():
            rec["verdict_why"] = (
                "width and horizon change together across these fits, so their trends cannot"
                " be told apart: fit more horizons at each width"
            )
        return
    y = used["log2_norm_opt"].to_numpy(float)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    boot = _bootstrap_coefs(used, x, samples, n_boot)
    enough = len(used) >= MIN_FITS and used["horizon"].nunique() >= MIN_HORIZONS
    for axis, rec in out.items():
        if axis not in names:
            # One horizon always falls short of MIN_HORIZONS; one width may not be all.
            why = [] if enough else [missing]
            if axis == "width":
                why.append(f"only one width ({int(used['width'].iloc[0])}) among the fits")
            rec["verdict_why"] = "; ".join(why)
            continue
        j = names.index(axis)
        rec["slope"] = float(coef[j])
        seeds = int(used["n_seeds"].min()) if used["bootstrap"].eq("seeds").all() else 0
        rec["slope_ci"], rec["slope_ci_method"] = _interval(boot, j, x, y, coef[j], seeds)
        if not enough:
            rec["verdict_why"] = missing
        elif rec["slope_ci"] is None:
            rec["verdict_why"] = (
                f"no interval: {len(used)} fits for {x.shape[1]} parameters leave no scatter to"
                " measure and there are no seed resamples to propagate: more seeds or more fits"
            )
        else:
            v = judge(rec["slope"], rec["slope_ci"], tolerance, settle=_SETTLE[axis])
            rec["verdict"], rec["verdict_why"] = v.verdict, v.why


def _missing_words(used: pd.DataFrame, fam: pd.DataFrame) -> str:
    """What keeps a family below MIN_FITS fits over MIN_HORIZONS horizons, in words."""
    n, h = len(used), used["horizon"].nunique()
    words = (
        f"a verdict needs at least {MIN_FITS} interior fits over at least {MIN_HORIZONS}"
        f" horizons; this family has {n} fit{'s' if n != 1 else ''} over {h}"
        f" horizon{'s' if h != 1 else ''}"
    )
    left_out = fam.drop(used.index)["status"].value_counts()
    if len(left_out):
        parts = [f"{c} with {STATUS_WORDS.get(s, s)}" for s, c in left_out.items()]
        words += " (left out: " + "; ".join(parts) + ")"
    return words


def _design(used: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Columns log2 width and log2 horizon (each only where it takes two values or more), then
    an intercept; the axes' names in column order."""
    cols, names = [], []
    for axis in TREND_AXES:
        values = np.log2(used[axis].to_numpy(float))
        if len(np.unique(values)) >= 2:
            cols.append(values)
            names.append(axis)
    cols.append(np.ones(len(used)))
    return np.column_stack(cols), names


def _bootstrap_coefs(
    used: pd.DataFrame, x: np.ndarray, samples: dict[int, np.ndarray], n_boot: int
) -> np.ndarray | None:
    """Least-squares coefficients of every resample (rows), combining the fits' bootstrap
    samples resample by resample; None when a fit has no measured-noise samples or too few
    resamples have every fit convex."""
    if not all(b in ("seeds", "parametric") for b in used["bootstrap"]):
        return None  # a residual-based guess is not measured noise: no interval from it
    if not all(int(i) in samples for i in used.index):
        return None
    draws = np.column_stack([samples[int(i)] for i in used.index])
    draws = draws[np.isfinite(draws).all(axis=1)]
    if len(draws) < max(10, MIN_BOOT_FRACTION * n_boot):
        return None
    return draws @ np.linalg.pinv(x).T


def _interval(
    boot: np.ndarray | None,
    j: int,
    x: np.ndarray,
    y: np.ndarray,
    estimate: float,
    seeds: int,
) -> tuple[list[float] | None, str | None]:
    """The 95 % interval of coefficient j: bootstrap quantiles when there are resamples, else
    an OLS t-interval (n - parameters dof), else none.

    Resampling n seeds measures their spread but not the uncertainty of that spread: with 3
    seeds the percentile interval is far too narrow (a t quantile with 2 dof is 4.30, not 1.96),
    so an interval from seed resamples is stretched about the estimate by t_{n-1} / z."""
    if boot is not None:
        lo, hi = np.quantile(boot[:, j], [0.025, 0.975])
        stretch = t_quantile_975(seeds - 1) / Z_975 if seeds >= 2 else 1.0
        lo, hi = estimate - (estimate - lo) * stretch, estimate + (hi - estimate) * stretch
        return [float(lo), float(hi)], "bootstrap"
    fit = ols({f"x{k}": x[:, k] for k in range(x.shape[1] - 1)}, y, intercept="c")
    lo, hi = _clean(fit.ci_lo[j]), _clean(fit.ci_hi[j])
    if fit.dof < 1 or lo is None or hi is None:
        return None, None
    return [lo, hi], "ols"


# --------------------------------------------------------------------------- words


def _axis_words(axis: str, rec: dict[str, Any]) -> str:
    where = "across width" if axis == "width" else "across horizons"
    if rec["slope"] is None:
        return f"{where}: {rec['verdict']} ({rec['verdict_why']})"
    ci = rec["slope_ci"]
    interval = "no interval" if ci is None else f"95 % CI [{ci[0]:+.2f}, {ci[1]:+.2f}]"
    return (
        f"{where}: {rec['verdict']}, slope {rec['slope']:+.2f} octave per doubling"
        f" ({interval}; {rec['verdict_why']})"
    )


def summary_sentences(nt: NormTransfer) -> list[str]:
    """One plain-words conclusion per optimizer: its headline family's two verdicts, with the
    tolerance they were judged against."""
    out = []
    tol = nt.summary.get("tolerance", DEFAULT_TOLERANCE)
    for s in nt.summary.get("by_optimizer", {}).values():
        w = s["width"]
        out.append(
            f"{s['label']}: does the loss-optimal output norm stay the same? "
            + "; ".join(_axis_words(axis, s[axis]) for axis in TREND_AXES)
            + f". From {w['n_fits']} interior fits over {w['n_horizons']} horizon"
            + ("s" if w["n_horizons"] != 1 else "")
            + f"; tolerance +-{tol:g} octave of optimal norm per doubling."
        )
    return out
