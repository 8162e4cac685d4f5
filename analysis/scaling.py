"""Scaling rules for the optimal lr and batch size, by OLS in log2 space with 95 % t intervals.

    log2 lr* = a log2 B + b log2 D + c        (lr law; a or b dropped when B or D is fixed)
    log2 B*  = e log2 D + log2 k              (batch law: B*(D) = k D^e)

The (B, D) optima come from the horizon table (train loss at each token horizon, so one
constant-lr run gives points at several D), or, without steps rows, from the cells' optima
with D = the planned tokens. Only interior optima are used: an edge optimum is a bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .fitting import ols
from .norm_transfer import NORM_GROUP
from .optimum import WINDOW, locate_optimum

SCALING_GROUP = NORM_GROUP  # every config column but batch size and planned steps


@dataclass
class ScalingFits:
    """optima: one row per (group, batch_size, horizon). lr_law / batch_law: one dict per group."""

    optima: pd.DataFrame
    lr_law: list[dict[str, Any]] = field(default_factory=list)
    batch_law: list[dict[str, Any]] = field(default_factory=list)
    source: str = "horizons"


def optima_at_horizons(horizons: pd.DataFrame, window: int = WINDOW) -> pd.DataFrame:
    """The optimal lr of every (group, batch size, horizon) from a horizon table."""
    if horizons.empty:
        return pd.DataFrame()
    keys = [*SCALING_GROUP, "batch_size", "horizon"]
    # Mean over seeds per lr; an lr where any seed diverged counts as diverged (+inf).
    per_lr = (
        horizons.groupby([*keys, "log2_lr"], dropna=False, sort=True)["loss"].mean().reset_index()
    )
    rows = []
    for key, part in per_lr.groupby(keys, dropna=False, sort=True):
        x = part["log2_lr"].to_numpy(float)
        loc = locate_optimum(x, part["loss"].to_numpy(float)[None, :], window)
        valid = bool(loc.valid[0])
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "log2_lr_star": float(loc.x_star[0]),
                "loss_star": float(loc.loss_star[0]),
                "status": "ok" if loc.interior[0] else ("edge" if valid else "all_diverged"),
            }
        )
    return pd.DataFrame(rows)


def optima_from_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cells' optima as (group, batch size, horizon = planned tokens) rows."""
    if table.empty:
        return pd.DataFrame()
    out = table[[*SCALING_GROUP, "batch_size", "tokens", "log2_lr_star", "loss_star", "status"]]
    return out.rename(columns={"tokens": "horizon"}).reset_index(drop=True)


def _group_dict(key: tuple) -> dict[str, Any]:
    cfg = dict(zip(SCALING_GROUP, key, strict=True))
    return {"optimizer": cfg["optimizer"], "width": int(cfg["width"]), "depth": int(cfg["depth"])}


def fit_lr_law(optima: pd.DataFrame) -> list[dict[str, Any]]:
    """`log2 lr* = a log2 B + b log2 D + c` per group, on interior optima."""
    out = []
    if optima.empty:
        return out
    for key, part in optima.groupby(list(SCALING_GROUP), dropna=False, sort=True):
        ok = part[part["status"] == "ok"]
        record: dict[str, Any] = {**_group_dict(key), "n": len(ok), "status": "impossible"}
        regressors = {}
        if ok["batch_size"].nunique() >= 2:
            regressors["a"] = np.log2(ok["batch_size"].to_numpy(float))
        if ok["horizon"].nunique() >= 2:
            regressors["b"] = np.log2(ok["horizon"].to_numpy(float))
        if part["batch_size"].nunique() < 2 and part["horizon"].nunique() < 2:
            continue  # nothing to scale along: not worth a line in the report
        if not regressors or len(ok) < len(regressors) + 1:
            record["reason"] = (
                "fit impossible: too few interior optima across batch sizes and horizons"
                f" ({len(ok)} of {len(part)})"
            )
            out.append(record)
            continue
        fit = ols(regressors, ok["log2_lr_star"].to_numpy(float), intercept="c")
        record.update(
            status="ok",
            terms=fit.as_dict(),
            dof=fit.dof,
            r2=fit.r2,
            batch_sizes=sorted(int(b) for b in ok["batch_size"].unique()),
            horizons=sorted(int(h) for h in ok["horizon"].unique()),
        )
        out.append(record)
    return out


def fit_batch_law(optima: pd.DataFrame, window: int = WINDOW) -> list[dict[str, Any]]:
    """`B*(D) = k D^e` per group: per horizon the loss-optimal B (parabola over log2 B of the
    lr-optimal losses), then OLS of log2 B* on log2 D over horizons with an interior B*."""
    out = []
    if optima.empty:
        return out
    for key, part in optima.groupby(list(SCALING_GROUP), dropna=False, sort=True):
        if part["batch_size"].nunique() < 3:
            continue
        per_d = []
        for d, at in part[part["status"] == "ok"].groupby("horizon"):
            at = at.sort_values("batch_size")
            if len(at) < 3:
                continue
            x = np.log2(at["batch_size"].to_numpy(float))
            loc = locate_optimum(x, at["loss_star"].to_numpy(float)[None, :], window)
            per_d.append(
                {
                    "horizon": int(d),
                    "log2_b_star": float(loc.x_star[0]),
                    "interior": bool(loc.interior[0]),
                }
            )
        record: dict[str, Any] = {**_group_dict(key), "per_horizon": per_d, "status": "impossible"}
        good = [p for p in per_d if p["interior"]]
        record["n"] = len(good)
        if len(good) < 2:
            record["reason"] = (
                "fit impossible: fewer than two horizons with an interior optimal batch size"
            )
            out.append(record)
            continue
        fit = ols(
            {"e": np.log2([p["horizon"] for p in good])},
            np.array([p["log2_b_star"] for p in good]),
            intercept="log2_k",
        )
        record.update(status="ok", terms=fit.as_dict(), dof=fit.dof, r2=fit.r2)
        out.append(record)
    return out


def fit_scaling(horizon_optima: pd.DataFrame, cell_table: pd.DataFrame) -> ScalingFits:
    """Both laws, from the horizon optima when there are any, else from the cells' optima."""
    if not horizon_optima.empty:
        optima, source = horizon_optima, "horizons"
    else:
        optima, source = optima_from_cells(cell_table), "cells"
    return ScalingFits(optima, fit_lr_law(optima), fit_batch_law(optima), source)
