"""Per-layer-group lr multipliers: which (input, hidden, output, vector) multipliers are best?

Only when the grid varies a multiplier. Per family of cells equal in everything but the
multipliers, each multiplier combination's best loss (over lr) is compared with the all-ones
combination: relative = L*(combo) / L*(ones) - 1 (negative = better than ones).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .load import CONFIG_COLUMNS, MULTIPLIER_COLUMNS


def fit_layer_lr(table: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per family whose cells differ in a multiplier."""
    if table.empty or all(table[c].nunique() < 2 for c in MULTIPLIER_COLUMNS):
        return []
    keys = [c for c in CONFIG_COLUMNS if c not in MULTIPLIER_COLUMNS]
    out = []
    for _, fam in table.groupby(keys, dropna=False, sort=True):
        if len(fam) < 2:
            continue
        fam = fam[np.isfinite(fam["loss_star"].to_numpy(float))]
        if fam.empty:
            continue
        ones = fam[(fam[list(MULTIPLIER_COLUMNS)] == 1.0).all(axis=1)]
        ref = float(ones["loss_star"].iloc[0]) if len(ones) else None
        combos = []
        for _, row in fam.sort_values("loss_star").iterrows():
            combos.append(
                {
                    **{c: float(row[c]) for c in MULTIPLIER_COLUMNS},
                    "loss_star": float(row["loss_star"]),
                    "log2_lr_star": float(row["log2_lr_star"]),
                    "edge": bool(row["edge"]),
                    "relative": (float(row["loss_star"]) / ref - 1) if ref else None,
                }
            )
        first = fam.iloc[0]
        out.append(
            {
                "optimizer": str(first["optimizer"]),
                "width": int(first["width"]),
                "depth": int(first["depth"]),
                "batch_size": int(first["batch_size"]),
                "best": combos[0],
                "ones_loss": ref,
                "combos": combos,
            }
        )
    return out
