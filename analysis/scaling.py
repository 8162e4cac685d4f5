"""Scaling rules for the optimal lr and batch size, by least squares in log2 space.

    log2 lr* = a log2 B + b log2 D + c        (lr law; a or b dropped when B or D is fixed)
    log2 B*  = e log2 D + log2 k              (batch law: B*(D) = k D^e)

The (B, D) optima come from the horizon table (train loss at each token horizon, so one
constant-lr run gives points at several D), or, without steps rows, from the cells' optima
with D = the planned tokens. Only interior optima are used: an edge optimum is a bound, and so
is one next to a diverged lr. A horizon read where the lr schedule had begun to decay is not
used either (see horizons.py): its optimum is that of a partly annealed run.

Intervals. Each term's 95 % interval is the hull of two: a bootstrap one and the OLS t one.
The bootstrap resamples runs: the seeds of a configuration, drawn with replacement once per
resample and shared by every (B, D, lr) point (a seed is the same run at every horizon, and
fixes the batch order across lrs), after which every optimum is located again and the law
refitted. With fewer than three seeds it resamples the (B, D) points with replacement instead. The
bootstrap carries the noise of the optima, which the OLS interval only guesses from the
scatter about the line; the OLS interval carries misfit, which the bootstrap cannot see.
A law with as many points as terms passes through every point whatever the truth: it is
reported as `exactly-determined`, with no terms, never as an exponent.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .fitting import OLSFit, ols
from .load import format_value, hparams_varying
from .norm_transfer import NORM_GROUP
from .optimum import WINDOW, locate_optimum

SCALING_GROUP = NORM_GROUP  # every config column but batch size and planned steps
# Resamples of the runs bootstrap: each locates every (B, D) optimum again, the costly part.
# 200 put the 2.5 / 97.5 % quantiles within about a tenth of the interval's width.
N_RESAMPLES = 200
# Runs are resampled only with at least this many seeds: two seeds give three distinct
# resamples, too few for quantiles (the points are resampled instead).
MIN_SEEDS_TO_RESAMPLE = 3
# A bootstrap interval needs this share of resamples usable (every point located, the design
# of full rank); otherwise the survivors are a biased subset and only the OLS interval is given.
MIN_USABLE = 0.5
EXACT_WORDS = (
    "exactly determined: {n} points for {p} terms, so the law passes through every point"
    " whatever the truth and its exponents are not estimates"
)


class Resamples:
    """Bootstrap draws of log2 lr* and of the loss there, one row per optima row (by position),
    NaN where a resample had no optimum. It travels in the optima frame's `attrs`, out of
    fits.json; pandas copies attrs into every derived frame, so a copy is the object itself."""

    def __init__(self, log2_lr_star: np.ndarray, loss_star: np.ndarray) -> None:
        self.log2_lr_star = log2_lr_star
        self.loss_star = loss_star

    def __deepcopy__(self, memo: dict) -> Resamples:
        return self


@dataclass
class ScalingFits:
    """optima: one row per (group, batch_size, horizon). lr_law / batch_law: one dict per group."""

    optima: pd.DataFrame
    lr_law: list[dict[str, Any]] = field(default_factory=list)
    batch_law: list[dict[str, Any]] = field(default_factory=list)
    source: str = "horizons"


# --------------------------------------------------------------------------- optima


def _seed_matrix(part: pd.DataFrame, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lr grid (L,) and the loss per lr and seed (L, S) with NaN where a seed has no run."""
    table = part.pivot_table(index="log2_lr", columns="seed", values="loss", aggfunc="mean")
    table = table.reindex(columns=seeds)
    return table.index.to_numpy(float), table.to_numpy(float)


def _mean_over(y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over seeds: +inf when any seed diverged, NaN when none was run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an lr no drawn seed has: NaN
        return np.nanmean(y, axis=axis)


def _point_status(x: np.ndarray, mean: np.ndarray, interior: bool, valid: bool) -> str:
    if not valid:
        return "all_diverged"
    i = int(np.argmin(np.where(np.isfinite(mean), mean, np.inf)))
    if i + 1 < len(x) and np.isinf(mean[i + 1]):
        return "divergence_bounded"  # the loss still falls where the next lr diverges
    return "ok" if interior else "edge"


def optima_at_horizons(
    horizons: pd.DataFrame,
    window: float = WINDOW,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """The optimal lr of every (group, batch size, horizon) from a horizon table, with the runs
    bootstrap's draws in `attrs["resamples"]` (a Resamples). Rows whose every reading was
    decayed have status `decayed` and no optimum."""
    if horizons.empty:
        return pd.DataFrame()
    rng = np.random.default_rng(seed)
    if "decayed" not in horizons:
        horizons = horizons.assign(decayed=False)
    rows, lr_draws, loss_draws = [], [], []
    nothing = np.full(n_resamples, np.nan)
    for gkey, group in horizons.groupby(list(SCALING_GROUP), dropna=False, sort=True):
        seeds = np.unique(group["seed"].to_numpy())
        # One draw of seeds per resample for the whole group: a seed is one run at every horizon.
        picks = None
        if len(seeds) >= MIN_SEEDS_TO_RESAMPLE:
            picks = rng.integers(0, len(seeds), (n_resamples, len(seeds)))
        for (b, d), part in group.groupby(["batch_size", "horizon"], sort=True):
            row = {**dict(zip(SCALING_GROUP, gkey, strict=True)), "batch_size": b, "horizon": d}
            clean = part[~part["decayed"].to_numpy(bool)]
            if clean.empty:
                rows.append(
                    {**row, "log2_lr_star": np.nan, "loss_star": np.nan, "status": "decayed"}
                )
                lr_draws.append(nothing)
                loss_draws.append(nothing)
                continue
            x, y = _seed_matrix(clean, seeds)
            mean = _mean_over(y)
            loc = locate_optimum(x, mean[None, :], window)
            status = _point_status(x, mean, bool(loc.interior[0]), bool(loc.valid[0]))
            rows.append(
                {
                    **row,
                    "log2_lr_star": float(loc.x_star[0]),
                    "loss_star": float(loc.loss_star[0]),
                    "status": status,
                }
            )
            if picks is None or status != "ok":
                lr_draws.append(nothing)
                loss_draws.append(nothing)
                continue
            boot = locate_optimum(x, _mean_over(y[:, picks], axis=-1).T, window)
            lr_draws.append(np.where(boot.valid, boot.x_star, np.nan))
            loss_draws.append(np.where(boot.valid, boot.loss_star, np.nan))
    out = pd.DataFrame(rows)
    out.attrs["resamples"] = Resamples(np.array(lr_draws), np.array(loss_draws))
    return out


def optima_from_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cells' optima as (group, batch size, horizon = planned tokens) rows."""
    if table.empty:
        return pd.DataFrame()
    out = table[[*SCALING_GROUP, "batch_size", "tokens", "log2_lr_star", "loss_star", "status"]]
    return out.rename(columns={"tokens": "horizon"}).reset_index(drop=True)


# --------------------------------------------------------------------------- intervals


def _resamples(optima: pd.DataFrame) -> Resamples | None:
    r = optima.attrs.get("resamples")
    return r if isinstance(r, Resamples) and len(r.log2_lr_star) == len(optima) else None


def _bootstrap(
    x: np.ndarray,
    y: np.ndarray,
    draws: np.ndarray | None,
    n_resamples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray | None, str]:
    """Coefficients of every resample (rows) and how they were drawn: refits on the runs
    bootstrap's `draws` (resamples x points, NaN where a point had no optimum) when there are
    any, else on the points resampled with replacement."""
    if draws is not None and np.isfinite(draws).any():
        draws = draws[np.isfinite(draws).all(axis=1)]
        return (draws @ np.linalg.pinv(x).T if len(draws) else None), "runs"
    return _pairs_bootstrap(x, y, n_resamples, rng), "points"


def _pairs_bootstrap(
    x: np.ndarray, y: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Resample the points with replacement and refit; resamples whose design lost rank (too
    few distinct B or D drawn) are skipped."""
    n, p = x.shape
    coefs = []
    for idx in rng.integers(0, n, (n_resamples, n)):
        xs = x[idx]
        if np.linalg.matrix_rank(xs) == p:
            coefs.append(np.linalg.lstsq(xs, y[idx], rcond=None)[0])
    return np.array(coefs) if coefs else None


def _terms(
    fit: OLSFit, boot: np.ndarray | None, n_resamples: int, method: str
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """{name: {value, se, ci, ci_ols, ci_bootstrap}}: ci is the hull of the OLS t interval and
    the bootstrap's 2.5 / 97.5 % quantiles (when enough resamples were usable)."""
    usable = boot is not None and len(boot) >= max(10, MIN_USABLE * n_resamples)
    terms = {}
    for i, (name, t) in enumerate(fit.as_dict().items()):
        ci_ols = t["ci"]
        ci_boot = [float(q) for q in np.quantile(boot[:, i], [0.025, 0.975])] if usable else None
        ci = ci_ols if ci_boot is None else [min(ci_ols[0], ci_boot[0]), max(ci_ols[1], ci_boot[1])]
        terms[name] = {**t, "ci": ci, "ci_ols": ci_ols, "ci_bootstrap": ci_boot}
    return terms, (method if usable else None)


def _design(columns: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The regressors in order, then the intercept: the column order of `fitting.ols`."""
    return np.column_stack([*columns.values(), np.ones(n)])


# --------------------------------------------------------------------------- laws


def _group_dict(key: tuple, labels: dict[tuple, str]) -> dict[str, Any]:
    cfg = dict(zip(SCALING_GROUP, key, strict=True))
    return {
        "optimizer": cfg["optimizer"],
        "width": int(cfg["width"]),
        "depth": int(cfg["depth"]),
        "label": group_label(labels, key),
    }


def group_label(labels: dict[tuple, str], key: tuple) -> str:
    """A group's label from group_labels, by its SCALING_GROUP values."""
    return labels.get(tuple(map(str, key)), str(key[SCALING_GROUP.index("optimizer")]))


def group_labels(optima: pd.DataFrame) -> dict[tuple, str]:
    """Per group, the optimizer and what tells the group apart from the others of its
    optimizer, width and depth (lr multipliers, hyperparameters such as Muon's adam_lr).
    Keyed by the group's SCALING_GROUP values as strings (see group_label)."""
    keys = optima[list(SCALING_GROUP)].drop_duplicates()
    same_as = ["optimizer", "width", "depth"]
    labels = {}
    for _, same in keys.groupby(same_as, dropna=False, sort=False):
        varying = [
            c
            for c in SCALING_GROUP
            if c not in same_as and same[c].astype(str).nunique(dropna=False) > 1
        ]
        hp_keys = hparams_varying(same).get(str(same["optimizer"].iloc[0]), [])
        for row in same.itertuples(index=False):
            cfg = dict(zip(SCALING_GROUP, row, strict=True))
            params = json.loads(cfg["hparams"] or "{}") if hp_keys else {}
            parts = [str(cfg["optimizer"])]
            parts += [format_value(c, cfg[c]) for c in varying if c != "hparams"]
            parts += [f"{k}={params.get(k)}" for k in hp_keys]
            labels[tuple(map(str, row))] = " ".join(parts)  # str: a NaN key equals itself
    return labels


def fit_lr_law(
    optima: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> list[dict[str, Any]]:
    """`log2 lr* = a log2 B + b log2 D + c` per group, on interior optima."""
    out: list[dict[str, Any]] = []
    if optima.empty:
        return out
    rng = np.random.default_rng(seed)
    resamples = _resamples(optima)
    labels = group_labels(optima)
    for key, part in optima.groupby(list(SCALING_GROUP), dropna=False, sort=True):
        read = part[part["status"] != "decayed"]
        if read["batch_size"].nunique() < 2 and read["horizon"].nunique() < 2:
            continue  # nothing to scale along: not worth a line in the report
        ok = part[part["status"] == "ok"]
        record: dict[str, Any] = {
            **_group_dict(key, labels),
            "n": len(ok),
            "status": "impossible",
        }
        record["n_decayed"] = int((part["status"] == "decayed").sum())
        regressors = {}
        if ok["batch_size"].nunique() >= 2:
            regressors["a"] = np.log2(ok["batch_size"].to_numpy(float))
        if ok["horizon"].nunique() >= 2:
            regressors["b"] = np.log2(ok["horizon"].to_numpy(float))
        if not regressors or len(ok) < len(regressors) + 1:
            record["reason"] = (
                "fit impossible: too few interior optima across batch sizes and horizons"
                f" ({len(ok)} of {len(part)})"
            )
            out.append(record)
            continue
        record.update(
            batch_sizes=sorted(int(b) for b in ok["batch_size"].unique()),
            horizons=sorted(int(h) for h in ok["horizon"].unique()),
        )
        y = ok["log2_lr_star"].to_numpy(float)
        fit = ols(regressors, y, intercept="c")
        if fit.dof == 0:
            p = len(regressors) + 1
            record.update(status="exactly-determined", terms=None, dof=0, r2=None)
            record["reason"] = EXACT_WORDS.format(n=len(ok), p=p)
            out.append(record)
            continue
        x = _design(regressors, len(ok))
        draws = None if resamples is None else resamples.log2_lr_star[ok.index].T
        boot, method = _bootstrap(x, y, draws, n_resamples, rng)
        terms, used = _terms(fit, boot, n_resamples, method)
        record.update(status="ok", terms=terms, dof=fit.dof, r2=fit.r2, bootstrap=used)
        out.append(record)
    return out


def _b_star(at: pd.DataFrame, draws: np.ndarray | None, window: float) -> dict[str, Any]:
    """The loss-optimal log2 B at one horizon (over the lr-optimal losses `at`, sorted by B),
    with its resampled values when the loss resamples are given."""
    x = np.log2(at["batch_size"].to_numpy(float))
    loc = locate_optimum(x, at["loss_star"].to_numpy(float)[None, :], window)
    out = {
        "horizon": int(at["horizon"].iloc[0]),
        "log2_b_star": float(loc.x_star[0]),
        "interior": bool(loc.interior[0]),
        "samples": None,
    }
    if draws is not None:
        boot = locate_optimum(x, draws.T, window)
        out["samples"] = np.where(boot.valid, boot.x_star, np.nan)
    return out


def fit_batch_law(
    optima: pd.DataFrame,
    window: float = WINDOW,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """`B*(D) = k D^e` per group: per horizon the loss-optimal B (located over log2 B of the
    lr-optimal losses), then least squares of log2 B* on log2 D over horizons with an interior
    B*."""
    out: list[dict[str, Any]] = []
    if optima.empty:
        return out
    rng = np.random.default_rng(seed)
    resamples = _resamples(optima)
    labels = group_labels(optima)
    for key, part in optima.groupby(list(SCALING_GROUP), dropna=False, sort=True):
        if part["batch_size"].nunique() < 3:
            continue
        per_d = []
        for _, at in part[part["status"] == "ok"].groupby("horizon"):
            if len(at) < 3:
                continue
            at = at.sort_values("batch_size")
            draws = None if resamples is None else resamples.loss_star[at.index]
            per_d.append(_b_star(at, draws, window))
        good = [p for p in per_d if p["interior"]]
        record: dict[str, Any] = {
            **_group_dict(key, labels),
            "per_horizon": [{k: v for k, v in p.items() if k != "samples"} for p in per_d],
            "status": "impossible",
            "n": len(good),
        }
        out.append(record)
        if len(good) < 2:
            record["reason"] = (
                "fit impossible: fewer than two horizons with an interior optimal batch size"
            )
            continue
        if len(good) == 2:
            record.update(status="exactly-determined", terms=None, dof=0, r2=None)
            record["reason"] = EXACT_WORDS.format(n=2, p=2)
            continue
        log2_d = np.log2([p["horizon"] for p in good])
        y = np.array([p["log2_b_star"] for p in good])
        fit = ols({"e": log2_d}, y, intercept="log2_k")
        x = _design({"e": log2_d}, len(good))
        draws = None
        if all(p["samples"] is not None for p in good):
            draws = np.column_stack([p["samples"] for p in good])
        boot, method = _bootstrap(x, y, draws, n_resamples, rng)
        terms, used = _terms(fit, boot, n_resamples, method)
        record.update(status="ok", terms=terms, dof=fit.dof, r2=fit.r2, bootstrap=used)
    return out


def fit_scaling(horizon_optima: pd.DataFrame, cell_table: pd.DataFrame) -> ScalingFits:
    """Both laws, from the horizon optima when there are any, else from the cells' optima."""
    if not horizon_optima.empty:
        optima, source = horizon_optima, "horizons"
    else:
        optima, source = optima_from_cells(cell_table), "cells"
    return ScalingFits(optima, fit_lr_law(optima), fit_batch_law(optima), source)
