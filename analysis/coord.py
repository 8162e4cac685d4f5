"""The coord check in numbers: how much each layer's activations change from the narrowest
width to the widest, after the last recorded step.

A width-consistent parameterization (muP, or an optimizer whose updates are scaled to the
layers' operator norms) keeps each layer's mean |activation| the same at every width, so the
growth factor is about 1; the standard parameterization's grows with width. These are measured
ratios with the seeds' spread, not a fitted verdict: the figure shows the curves behind them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .load import Results


def coord_at_one_lr(res: Results) -> dict[str, tuple[float, pd.DataFrame]]:
    """Per optimizer with coord-check rows at two or more widths: the lr they are read at (the
    one recorded at the most widths, then the middle one) and its rows, with the trials'
    optimizer, width, log2_lr and seed joined on."""
    if res.coord.empty:
        return {}
    info = res.trials.set_index("tix")[["optimizer", "width", "log2_lr", "seed"]]
    rows = res.coord.join(info, on="tix")
    out = {}
    for opt, r in rows.groupby("optimizer", sort=True):
        if r["width"].nunique() < 2:
            continue
        per_lr = r.groupby("log2_lr")["width"].nunique()
        lrs = per_lr.index[per_lr == per_lr.max()].to_numpy(float)
        lr = float(lrs[len(lrs) // 2])
        out[str(opt)] = (lr, r[r["log2_lr"] == lr])
    return out


def coord_growth(res: Results) -> list[dict[str, Any]]:
    """Per optimizer and layer: mean |activation| at the last coord-check step, at the widest
    width that reached it over the narrowest (geometric mean over seeds, with their range).

    Read at coord_at_one_lr's lr, the one the coord-check figure shows. A width whose trials
    diverged before the last step drops out of it; the record says which widths the ratio spans.
    """
    out = []
    for opt, (lr, r) in coord_at_one_lr(res).items():
        step = int(r["step"].max())
        last = r[r["step"] == step]
        widths = sorted(last["width"].unique())
        all_widths = sorted(r["width"].unique())
        if len(widths) < 2:
            continue
        lo, hi = widths[0], widths[-1]
        for (index, layer), g in last.groupby(["layer_index", "layer"], sort=True):
            means = g.groupby(["seed", "width"])["mean_abs"].mean().unstack("width")
            if lo not in means or hi not in means:
                continue
            ratio = (means[hi] / means[lo]).dropna()
            ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
            if ratio.empty:
                continue
            out.append(
                {
                    "optimizer": opt,
                    "log2_lr": lr,
                    "layer": layer,
                    "layer_index": int(index),
                    "step": step,
                    "widths": [int(lo), int(hi)],
                    "widths_short_of_step": [int(w) for w in all_widths if w not in widths],
                    "growth": float(np.exp(np.log(ratio).mean())),
                    "growth_range": [float(ratio.min()), float(ratio.max())],
                    "n_seeds": len(ratio),
                }
            )
    return out


def coord_sentences(records: list[dict[str, Any]]) -> list[str]:
    """One sentence per optimizer: the range of its layers' growth, the largest with its seeds."""
    out = []
    by_opt: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_opt.setdefault(rec["optimizer"], []).append(rec)
    for opt, recs in by_opt.items():
        lowest = min(recs, key=lambda x: x["growth"])
        highest = max(recs, key=lambda x: x["growth"])
        most = max(recs, key=lambda x: abs(np.log(x["growth"])))
        lo_w, hi_w = recs[0]["widths"]
        text = (
            f"coord check, {opt} at lr 2^{recs[0]['log2_lr']:g}: from width {lo_w} to {hi_w}"
            f" ({np.log2(hi_w / lo_w):g} doublings), each layer's mean |activation| after step"
            f" {recs[0]['step']} changes by x{lowest['growth']:.3g} ({lowest['layer']}) to"
            f" x{highest['growth']:.3g} ({highest['layer']}) over {len(recs)} layers"
            " (x1: the same at every width)"
        )
        if most["n_seeds"] > 1:
            lo, hi = most["growth_range"]
            text += f"; {most['layer']}: x{lo:.3g} to x{hi:.3g} across {most['n_seeds']} seeds"
        short = recs[0]["widths_short_of_step"]
        if short:
            text += (
                f"; width {', '.join(map(str, short))} did not reach step {recs[0]['step']}"
                " (diverged or stopped)"
            )
        out.append(text + ".")
    return out
