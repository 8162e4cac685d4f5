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

from .load import CONFIG_COLUMNS, format_value
from .loss_compare import MIN_FINITE_DRAWS, compare, pct_ci
from .optimum import Optima

# A family: every config column but batch size and the steps the budget sets from it.
FAMILY = tuple(c for c in CONFIG_COLUMNS if c not in ("batch_size", "steps"))
# Families compared with each other share the model, the data and the token budget.
SETTING = ("model", "width", "depth", "seq_len", "head_dim", "data", "data_fingerprint", "tokens")


def fit_batch_sizes(optima: Optima) -> list[dict[str, Any]]:
    """One record per setting with at least one family over two or more batch sizes."""
    table = optima.table
    if table.empty or table["batch_size"].nunique() < 2:
        return []
    table = table[np.isfinite(table["loss_star"].to_numpy(float))]
    out = []
    for _, setting in table.groupby(list(SETTING), dropna=False, sort=True):
        families = [
            fam.sort_values("batch_size")
            for _, fam in setting.groupby(list(FAMILY), dropna=False, sort=True)
            if fam["batch_size"].nunique() >= 2 and len(fam) == fam["batch_size"].nunique()
        ]
        if families:
            out.append(_setting_record(optima, families))
    return out


def _family_label(fam: pd.DataFrame) -> str:
    # The cell's label without its batch size and steps, which vary inside the family.
    drop = (format_value("batch_size", ""), format_value("steps", ""))
    return " ".join(p for p in str(fam["label"].iloc[0]).split() if not p.startswith(drop))


def _rise_draws(optima: Optima, fam: pd.DataFrame) -> np.ndarray | None:
    a, b = optima.draws.get(int(fam["cell"].iloc[-1])), optima.draws.get(int(fam["cell"].iloc[0]))
    return None if a is None or b is None else a.c / b.c - 1


def _quantiles(draws: np.ndarray | None) -> list[float] | None:
    if draws is None:
        return None
    finite = np.isfinite(draws)
    if finite.mean() < MIN_FINITE_DRAWS:
        return None
    q = np.quantile(draws[finite], [0.025, 0.975])
    return [float(q[0]), float(q[1])]


def _setting_record(optima: Optima, families: list[pd.DataFrame]) -> dict[str, Any]:
    first = families[0].iloc[0]
    fams = []
    for fam in families:
        lo, hi = fam.iloc[0], fam.iloc[-1]
        rise = compare(optima, int(hi["cell"]), int(lo["cell"]))
        fams.append(
            {
                "label": _family_label(fam),
                "optimizer": str(lo["optimizer"]),
                "batch_sizes": [int(b) for b in fam["batch_size"]],
                "loss_star": [float(v) for v in fam["loss_star"]],
                "log2_lr_star": [float(v) for v in fam["log2_lr_star"]],
                "lr_status": [str(s) for s in fam["status"]],
                "rise": rise["relative"],
                "rise_ci": rise["relative_ci"],
                # worse: the largest batch's loss is higher; better: lower.
                "rise_verdict": rise["verdict"],
            }
        )
    by_batch = []
    sizes = sorted({int(b) for fam in families for b in fam["batch_size"]})
    for b in sizes:
        at = [(f, fam[fam["batch_size"] == b]) for f, fam in zip(fams, families, strict=True)]
        at = [(f, row.iloc[0]) for f, row in at if len(row)]
        if len(at) < 2:
            continue
        best_f, best_row = min(at, key=lambda p: float(p[1]["loss_star"]))
        others = []
        for f, row in at:
            if f is best_f:
                continue
            vs = compare(optima, int(row["cell"]), int(best_row["cell"]))
            others.append({"label": f["label"], "loss_star": float(row["loss_star"]), **vs})
        by_batch.append(
            {
                "batch_size": b,
                "best": best_f["label"],
                "best_loss": float(best_row["loss_star"]),
                "best_lr_status": str(best_row["status"]),
                "others": others,
            }
        )
    return {
        "width": int(first["width"]),
        "depth": int(first["depth"]),
        "tokens": int(first["tokens"]),
        "families": fams,
        "by_batch_size": by_batch,
        "least_rise": _least_rise(optima, families, fams),
    }


def _least_rise(
    optima: Optima, families: list[pd.DataFrame], fams: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The family whose loss rises least from its smallest batch to its largest, and every
    other family's rise against it (same batch range only)."""
    span = [(f["batch_sizes"][0], f["batch_sizes"][-1]) for f in fams]
    pairs = [(f, fam) for f, fam, s in zip(fams, families, span, strict=True) if s == span[0]]
    if len(pairs) < 2:
        return None
    least_f, least_fam = min(pairs, key=lambda p: p[0]["rise"])
    least_draws = _rise_draws(optima, least_fam)
    located = all(s == "ok" for f, _ in pairs for s in (f["lr_status"][0], f["lr_status"][-1]))
    others = []
    for f, fam in pairs:
        if f is least_f:
            continue
        draws = _rise_draws(optima, fam)
        ci = None if draws is None or least_draws is None else _quantiles(draws - least_draws)
        if not located:
            verdict = "not located"
        elif ci is None:
            verdict = "no interval"
        else:
            verdict = "larger" if ci[0] > 0 else "indistinguishable"
        others.append(
            {
                "label": f["label"],
                "difference": f["rise"] - least_f["rise"],
                "ci": ci,
                "verdict": verdict,
            }
        )
    return {"label": least_f["label"], "rise": least_f["rise"], "others": others}


def batch_size_sentences(rec: dict[str, Any]) -> list[str]:
    """Plain words: each family's rise, the least-rising family against the others, and the
    best family at the largest batch size."""
    where = f"width {rec['width']} depth {rec['depth']}, {rec['tokens']:,} tokens"
    out = []
    for f in rec["families"]:
        b0, b1 = f["batch_sizes"][0], f["batch_sizes"][-1]
        out.append(
            f"{f['label']} ({where}): best loss {f['loss_star'][0]:.4f} at batch {b0},"
            f" {f['loss_star'][-1]:.4f} at batch {b1}: {100 * f['rise']:+.2f} %"
            f" ({_with_verdict(f['rise_ci'], _rise_words(f['rise_verdict']))})."
        )
    least = rec["least_rise"]
    if least is not None:
        parts = [
            f"{o['label']} {100 * o['difference']:+.2f} points"
            f" ({_with_verdict(o['ci'], o['verdict'])})"
            for o in least["others"]
        ]
        out.append(
            f"Least rise from the smallest batch to the largest ({where}): {least['label']};"
            " the others' rise against it: " + "; ".join(parts) + "."
        )
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


def _with_verdict(ci: list[float] | None, verdict: str) -> str:
    return pct_ci(ci) if verdict == "no interval" else f"{pct_ci(ci)}, {verdict}"


def _rise_words(verdict: str) -> str:
    return {
        "worse": "the largest batch is worse",
        "better": "the largest batch is better",
        "indistinguishable": "no difference shown",
    }.get(verdict, verdict)
