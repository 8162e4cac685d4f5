"""Per-layer-group lr multipliers: which (input, hidden, output, vector) multipliers are best?

Only when the grid varies a multiplier. Per family of cells equal in everything but the
multipliers, each multiplier combination's best loss (over lr) is compared with the all-ones
combination: relative = L*(combo) / L*(ones) - 1 (negative = better than ones).

Each comparison has a 95 % interval and a verdict (better, worse, indistinguishable: see
loss_compare.py), and the best combination is flagged when it sits at the end of a group's
multiplier range, where a more extreme ratio was not tried.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .load import CONFIG_COLUMNS, MULTIPLIER_COLUMNS
from .loss_compare import LossComparison, pct_ci
from .optimum import Optima

GROUP_NAMES = {
    "lr_input": "input",
    "lr_hidden": "hidden",
    "lr_output": "output",
    "lr_vector": "vector",
}


def fit_layer_lr(optima: Optima, usable: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per family whose cells differ in a multiplier (`usable`: the results'
    usable trials, for the seeds' offsets)."""
    table = optima.table
    if table.empty or all(table[c].nunique() < 2 for c in MULTIPLIER_COLUMNS):
        return []
    keys = [c for c in CONFIG_COLUMNS if c not in MULTIPLIER_COLUMNS]
    out = []
    for _, fam in table.groupby(keys, dropna=False, sort=True):
        if len(fam) < 2:
            continue
        finite = fam[np.isfinite(fam["loss_star"].to_numpy(float))]
        if finite.empty:
            continue
        ones = fam[(fam[list(MULTIPLIER_COLUMNS)] == 1.0).all(axis=1)]
        ref = ones.iloc[0] if len(ones) else None
        if ref is not None and not np.isfinite(float(ref["loss_star"])):
            ref_state = "diverged"  # every lr of all ones diverged: nothing to compare with
        else:
            ref_state = "absent" if ref is None else "ok"
        rows = finite.sort_values("loss_star")
        if ref_state == "ok":
            comp = LossComparison(optima, usable, finite["cell"])
            pairs = [(int(c), int(ref["cell"])) for c in rows["cell"]]
            versus = comp.compare(pairs)
        else:
            versus = [
                {"relative": None, "relative_ci": None, "verdict": f"all ones {ref_state}"}
            ] * len(rows)
        combos = [_combo(row, vs) for (_, row), vs in zip(rows.iterrows(), versus, strict=True)]
        diverged = [
            {c: float(r[c]) for c in MULTIPLIER_COLUMNS}
            for _, r in fam[~np.isfinite(fam["loss_star"].to_numpy(float))].iterrows()
        ]
        first = fam.iloc[0]
        out.append(
            {
                "optimizer": str(first["optimizer"]),
                "width": int(first["width"]),
                "depth": int(first["depth"]),
                "batch_size": int(first["batch_size"]),
                "best": combos[0],
                "best_at_grid_end": _grid_ends(combos[0], fam),
                "ones": ref_state,
                "ones_loss": float(ref["loss_star"]) if ref_state == "ok" else None,
                "combos": combos,
                # Combinations where every lr diverged: no best loss, and worse than any.
                "diverged": diverged,
            }
        )
    return out


def _combo(row: pd.Series, versus: dict[str, Any]) -> dict[str, Any]:
    return {
        **{c: float(row[c]) for c in MULTIPLIER_COLUMNS},
        "loss_star": float(row["loss_star"]),
        "log2_lr_star": float(row["log2_lr_star"]),
        "lr_status": str(row["status"]),
        "edge": bool(row["edge"]),
        **versus,
    }


def _grid_ends(best: dict[str, Any], fam: pd.DataFrame) -> list[str]:
    """The groups whose best multiplier is the lowest or highest the family tried: a more
    extreme ratio there was not measured, so the best combination may lie beyond the grid."""
    ends = []
    for col, name in GROUP_NAMES.items():
        tried = np.unique(fam[col].to_numpy(float))
        if len(tried) < 2:
            continue
        if best[col] == tried[0]:
            ends.append(f"{name} (lowest tried)")
        elif best[col] == tried[-1]:
            ends.append(f"{name} (highest tried)")
    return ends


def ratio(c: dict[str, Any]) -> str:
    """input:hidden:output:vector multipliers, as the report writes them."""
    return ":".join(f"{c[col]:g}" for col in MULTIPLIER_COLUMNS)


def layer_lr_sentences(rec: dict[str, Any]) -> list[str]:
    """The family's best combination against all ones, with its interval and verdict, the
    tally of the others, and whether the best sits at the end of the multipliers' grid."""
    b = rec["best"]
    where = f"{rec['optimizer']} width {rec['width']} depth {rec['depth']} B {rec['batch_size']}"
    if rec["ones"] != "ok":
        why = {
            "absent": "no all-ones combination in the grid",
            "diverged": "every lr of the all-ones combination diverged",
        }[rec["ones"]]
        return [
            f"{where}: best lr multipliers input:hidden:output:vector = {ratio(b)}; {why}, so"
            " nothing to compare with."
        ]
    if b["verdict"] == "reference":
        head = f"{where}: no lr multipliers beat all ones (all ones has the lowest loss)."
    else:
        head = (
            f"{where}: best lr multipliers input:hidden:output:vector = {ratio(b)},"
            f" loss {b['loss_star']:.4f} against {rec['ones_loss']:.4f} with all ones:"
            f" {100 * b['relative']:+.2f} % ({pct_ci(b['relative_ci'])}), {b['verdict']}."
        )
    others = [c for c in rec["combos"] if c["verdict"] != "reference"]
    tally = {
        v: sum(c["verdict"] == v for c in others)
        for v in ("better", "indistinguishable", "worse", "no interval", "not located")
    }
    if others:
        head += (
            f" Of {len(others)} combinations other than all ones: "
            + ", ".join(f"{n} {v}" for v, n in tally.items() if n)
            + " (95 % intervals holding for all of them at once)."
        )
    if rec["diverged"]:
        head += (
            f" {len(rec['diverged'])} more diverged at every lr: "
            + ", ".join(ratio(c) for c in rec["diverged"])
            + "."
        )
    out = [head]
    if b["lr_status"] != "ok":
        out.append(
            f"{where}: the best combination's lr optimum is {b['lr_status'].replace('_', '-')}:"
            " its loss is an upper bound, widen its lr grid."
        )
    if rec["best_at_grid_end"] and b["verdict"] != "reference":
        out.append(
            f"{where}: the best combination is at the end of the multipliers' range for "
            + ", ".join(rec["best_at_grid_end"])
            + ": a more extreme ratio was not tried, so the best may lie beyond the grid."
        )
    return out
