"""Best loss across batch sizes at a fixed token budget: which optimizer loses least as the
batch grows (the Scion paper's large-batch figure)?

Only where a family of cells (equal in all but lr, seed, batch size, and the steps a token
budget sets from it) trains two or more batch sizes on the same number of tokens. Per family:

- loss*(B): each batch size's best loss over lr;
- rise = L*(B_max) / L*(B_min) - 1: what the largest batch costs against the smallest.

Across the families of one setting (model and tokens; optimizers and their hyperparameters
differ), at each batch size every family's L* against the lowest one's, and every family's rise
against the smallest rise. Intervals and verdicts as in loss_compare.py: the cells' bootstrap
draws, draw by draw; a rise difference of `larger` or `indistinguishable`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .loss_compare import LossComparison, pct_ci, simultaneous, verdict
from .optimum import Optima
from .scaling import SCALING_GROUP, group_label, group_labels

# A family: every config column but batch size and the steps the budget sets from it.
FAMILY = SCALING_GROUP
# Families compared with each other share the model, the data and the token budget.
SETTING = ("model", "width", "depth", "seq_len", "head_dim", "data", "data_fingerprint", "budget")
# Steps are whole, so a budget not divisible by batch x sequence length gives each batch size a
# slightly different token count: counts within this relative gap are one budget.
BUDGET_TOLERANCE = 0.05


def fit_batch_sizes(optima: Optima, usable: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per setting with a family over two or more batch sizes (`usable`: the
    results' usable trials, for the seeds' offsets)."""
    table = optima.table
    if table.empty or table["batch_size"].nunique() < 2:
        return []
    table = table.assign(budget=_budgets(table["tokens"].to_numpy(float)))
    labels = group_labels(table)
    out = []
    for _, setting in table.groupby(list(SETTING), dropna=False, sort=True):
        families = [
            fam.sort_values("batch_size")
            for _, fam in setting.groupby(list(FAMILY), dropna=False, sort=True)
            if fam["batch_size"].nunique() >= 2 and len(fam) == fam["batch_size"].nunique()
        ]
        if families:
            comp = LossComparison(optima, usable, setting["cell"])
            out.append(_setting_record(comp, families, labels))
    return out


def _budgets(tokens: np.ndarray) -> np.ndarray:
    """Each cell's token budget: its token count, or the smallest of a run of counts each
    within BUDGET_TOLERANCE of the next."""
    order = np.sort(np.unique(tokens))
    start = {}
    for i, t in enumerate(order):
        near = i > 0 and t <= order[i - 1] * (1 + BUDGET_TOLERANCE)
        start[t] = start[order[i - 1]] if near else t
    return np.array([start[t] for t in tokens])


def _setting_record(
    comp: LossComparison, families: list[pd.DataFrame], labels: dict[tuple, str]
) -> dict[str, Any]:
    first = families[0].iloc[0]
    fams = []
    for fam in families:
        lo, hi = int(fam["cell"].iloc[0]), int(fam["cell"].iloc[-1])
        ends_finite = all(np.isfinite(comp.loss(c)) for c in (lo, hi))
        if ends_finite:
            (rise,) = comp.compare([(hi, lo)])
            rise["verdict"] = rise["verdict"] if rise["verdict"] != "reference" else "no interval"
        else:  # every lr diverged at the smallest or the largest batch size
            rise = {"relative": None, "relative_ci": None, "verdict": "diverged"}
        fams.append(
            {
                "label": group_label(labels, tuple(fam[list(FAMILY)].iloc[0])),
                "optimizer": str(fam["optimizer"].iloc[0]),
                "cells": [int(c) for c in fam["cell"]],
                "batch_sizes": [int(b) for b in fam["batch_size"]],
                "loss_star": [float(v) for v in fam["loss_star"]],
                "log2_lr_star": [float(v) for v in fam["log2_lr_star"]],
                "lr_status": [str(s) for s in fam["status"]],
                "rise": rise["relative"],
                "rise_ci": rise["relative_ci"],
                # worse: the largest batch's best loss is higher; better: lower.
                "rise_verdict": rise["verdict"],
            }
        )
    by_batch = []
    for b in sorted({b for f in fams for b in f["batch_sizes"]}):
        at = [
            (f, f["cells"][f["batch_sizes"].index(b)])
            for f in fams
            if b in f["batch_sizes"] and np.isfinite(f["loss_star"][f["batch_sizes"].index(b)])
        ]
        if len(at) < 2:
            continue
        best_f, best_cell = min(at, key=lambda p: comp.loss(p[1]))
        others = [(f, c) for f, c in at if f is not best_f]
        versus = comp.compare([(c, best_cell) for _, c in others])
        by_batch.append(
            {
                "batch_size": b,
                "best": best_f["label"],
                "best_loss": comp.loss(best_cell),
                "best_lr_status": str(comp.table.loc[best_cell, "status"]),
                "others": [
                    {"label": f["label"], "loss_star": comp.loss(c), **vs}
                    for (f, c), vs in zip(others, versus, strict=True)
                ],
            }
        )
    return {
        "width": int(first["width"]),
        "depth": int(first["depth"]),
        "tokens": int(first["budget"]),
        "families": [{k: v for k, v in f.items() if k != "cells"} for f in fams],
        "by_batch_size": by_batch,
        "least_rise": _least_rise(comp, fams),
    }


def _span(f: dict[str, Any]) -> tuple[int, int]:
    return f["batch_sizes"][0], f["batch_sizes"][-1]


def _rise_draws(comp: LossComparison, f: dict[str, Any]) -> np.ndarray | None:
    return comp.relative_draws(f["cells"][-1], f["cells"][0])


def _least_rise(comp: LossComparison, fams: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The family whose best loss rises least from its smallest batch to its largest, and
    every other family's rise against it (those over the most common batch range), with
    intervals holding for all of them at once."""
    spans = [(f["batch_sizes"][0], f["batch_sizes"][-1]) for f in fams if f["rise"] is not None]
    if not spans:
        return None
    span = max(set(spans), key=spans.count)
    same = [
        f
        for f in fams
        if f["rise"] is not None and (f["batch_sizes"][0], f["batch_sizes"][-1]) == span
    ]
    if len(same) < 2:
        return None
    least = min(same, key=lambda f: f["rise"])
    others = [f for f in same if f is not least]
    base = _rise_draws(comp, least)
    draws = [
        None if base is None or (d := _rise_draws(comp, f)) is None else d - base for f in others
    ]
    ends = (0, -1)
    out = []
    for f, ci in zip(others, simultaneous(draws), strict=True):
        located = comp.located(*(f["cells"][i] for i in ends), *(least["cells"][i] for i in ends))
        v = verdict(ci, located)
        out.append(
            {
                "label": f["label"],
                "difference": f["rise"] - least["rise"],
                "ci": ci,
                "verdict": {"worse": "larger", "better": "smaller"}.get(v, v),
            }
        )
    return {
        "label": least["label"],
        "batch_sizes": list(span),
        "rise": least["rise"],
        "others": out,
        "left_out": [f["label"] for f in fams if f not in same],
    }


def batch_size_sentences(rec: dict[str, Any]) -> list[str]:
    """Plain words: each family's change of best loss from its smallest batch to its largest,
    the family that changes least against the others, and the best family at the largest
    batch size."""
    where = f"width {rec['width']} depth {rec['depth']}, {rec['tokens']:,} tokens"
    out = []
    for f in rec["families"]:
        b0, b1 = f["batch_sizes"][0], f["batch_sizes"][-1]
        if f["rise"] is None:
            out.append(
                f"{f['label']} ({where}): every lr diverged at batch"
                f" {b0 if not np.isfinite(f['loss_star'][0]) else b1}: no best loss to compare."
            )
            continue
        out.append(
            f"{f['label']} ({where}): best loss {f['loss_star'][0]:.4f} at batch {b0},"
            f" {f['loss_star'][-1]:.4f} at batch {b1}: {100 * f['rise']:+.2f} %"
            f" ({_with_verdict(f['rise_ci'], rise_words(f['rise_verdict']))})."
        )
    least = rec["least_rise"]
    if least is not None:
        b0, b1 = least["batch_sizes"]
        parts = [
            f"{o['label']} {100 * o['difference']:+.2f} points"
            f" ({_with_verdict(o['ci'], o['verdict'], unit='points')})"
            for o in least["others"]
        ]
        text = (
            f"Smallest change of best loss from batch {b0} to {b1} ({where}): {least['label']}"
            f" ({100 * least['rise']:+.2f} %); the others' change against it: "
            + "; ".join(parts)
            + " (intervals holding for all of them at once)."
        )
        if least["left_out"]:
            text += (
                " Not compared (another batch range, or diverged): "
                + ", ".join(least["left_out"])
                + "."
            )
        out.append(text)
    if rec["by_batch_size"]:
        last = rec["by_batch_size"][-1]
        parts = [
            f"{o['label']} {100 * o['relative']:+.2f} %"
            f" ({_with_verdict(o['relative_ci'], o['verdict'])})"
            for o in last["others"]
        ]
        out.append(
            f"At batch {last['batch_size']} ({where}) the lowest loss is {last['best']}'s,"
            f" {last['best_loss']:.4f}; the others against it: " + "; ".join(parts) + "."
        )
    if any(s != "ok" for f in rec["families"] for s in f["lr_status"]):
        out.append(
            f"({where}) some batch sizes' lr optima are on the lr grid's edge or bounded by"
            " divergence: their best loss is an upper bound and comparisons with them are"
            " marked `not located`."
        )
    return out


def _with_verdict(ci: list[float] | None, words: str, unit: str = "%") -> str:
    interval = pct_ci(ci, unit=unit)
    return interval if words == "no interval" else f"{interval}, {words}"


def rise_words(verdict: str) -> str:
    """A family's verdict on its largest batch against its smallest, in words."""
    return {
        "worse": "the largest batch is worse",
        "better": "the largest batch is better",
        "indistinguishable": "no difference shown",
    }.get(verdict, verdict)
