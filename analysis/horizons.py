"""Loss and output norm of every trial at chosen token horizons, from the steps table.

At horizon D a trial contributes the log row nearest to D (within HORIZON_TOLERANCE), averaged
over a small window of neighbouring rows: the train loss arithmetically, the output norm
geometrically (the mean of its log2). A trial that diverged before reaching D counts as
diverged there (+inf); a trial planned for fewer tokens than D does not appear.

A reading from the middle of a run stands for a run planned for D only while the lr schedule
is still at its peak there: once a warm-down, or a linear or cosine decay, has begun, the loss
and norm at D are those of a partly annealed run, which a run planned for D is not at D (it
anneals at its own end). Such readings are marked `decayed` and the fits leave them out; a
reading at the run's own end is never decayed, nor one where the schedule stays constant. A
reading still inside the warm-up is marked too: warm-up is only harmless once passed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .load import CONFIG_COLUMNS, Results

# Rows on each side of the horizon's row that are averaged (3 rows in all).
WINDOW_ROWS = 1
# The row taken for horizon D must be within this many octaves of D in tokens (7 %); a trial
# logged too sparsely there does not count at that horizon.
HORIZON_TOLERANCE = 0.1
MAX_HORIZONS = 6


def default_horizons(results: Results) -> list[int]:
    """The planned token budgets in the store, plus 1/4 and 1/2 of the largest when the store
    has fewer than three budgets, at most MAX_HORIZONS of them spread evenly in log scale."""
    planned = sorted({int(t) for t in results.usable["tokens"].dropna()})
    if not planned:
        return []
    if len(planned) < 3:
        top = planned[-1]
        planned = sorted(set(planned) | {top // 4, top // 2})
    if len(planned) > MAX_HORIZONS:
        idx = np.unique(np.round(np.linspace(0, len(planned) - 1, MAX_HORIZONS)).astype(int))
        planned = [planned[i] for i in idx]
    return [p for p in planned if p > 0]


def last_clean_step(
    steps: np.ndarray, schedule: np.ndarray, warmup: np.ndarray, warmdown: np.ndarray
) -> np.ndarray:
    """Per trial, the last log row (a row at step s follows updates 0 .. s-1) whose updates all
    ran at the schedule's peak lr, warm-up aside: the rule of `sweeper.train.lr_multiplier`.

    Decay starts after the first post-warm-up update for linear and cosine schedules, and after
    update `steps - round(warmdown * steps)` with a warm-down; never for a constant schedule.
    """
    steps = np.asarray(steps, np.int64)
    n_warm = np.round(np.asarray(warmup, float) * steps).astype(np.int64)
    n_down = np.round(np.asarray(warmdown, float) * steps).astype(np.int64)
    decaying = np.asarray(schedule, dtype=object) != "constant"
    # The first update below the peak is the index returned: rows up to that step are clean.
    first_decayed = np.where(decaying, n_warm + 1, steps + 1)
    return np.where(n_down > 0, np.minimum(first_decayed, steps - n_down + 1), first_decayed)


def horizon_table(results: Results, horizons: list[int], window: int = WINDOW_ROWS) -> pd.DataFrame:
    """One row per (trial, horizon) that the trial reached or diverged before.

    Columns: tix, horizon, loss (inf when diverged), log2_norm (NaN when not logged), decayed
    (read mid-run where the lr had left its peak: see the module docstring), and the trial's
    cell, config columns, log2_lr, seed and planned tokens. Among trials that differ only in
    planned steps, one whose reading is not decayed is preferred, then the one planned for the
    fewest tokens >= D (its lr schedule is the closest to a run planned for D).
    """
    steps = results.steps
    usable = results.usable
    if steps.empty or not horizons or usable.empty:
        return pd.DataFrame()
    tix = steps["tix"].to_numpy(np.int64)
    tokens = steps["tokens"].to_numpy(np.int64)
    loss = steps["train_loss"].to_numpy(float)
    norm = (
        steps["out_rms_to_inf"].to_numpy(float)
        if "out_rms_to_inf" in steps
        else np.full(len(steps), np.nan)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norm = np.where(norm > 0, np.log2(norm), np.nan)

    # Rows are sorted by (tix, step), so tokens rise within a trial: search a combined key.
    span = int(tokens.max()) + 1 if len(tokens) else 1
    key = tix * span + tokens
    ids = usable["tix"].to_numpy(np.int64)
    start = np.searchsorted(tix, ids, side="left")
    end = np.searchsorted(tix, ids, side="right")
    has_rows = end > start
    diverged = usable["diverged"].to_numpy()
    planned = usable["tokens"].to_numpy(np.int64)
    row_step = steps["step"].to_numpy(np.int64)
    planned_steps = usable["steps"].to_numpy(np.int64)
    clean_until = last_clean_step(
        planned_steps,
        usable["schedule"].to_numpy(object),
        usable["warmup"].to_numpy(float),
        usable["warmdown"].to_numpy(float),
    )
    n_warm = np.round(usable["warmup"].to_numpy(float) * planned_steps).astype(np.int64)

    last_tokens = np.where(has_rows, tokens[np.maximum(end - 1, 0)], 0)
    parts = []
    for d in horizons:
        # The logged row nearest to D in log tokens (just before or at/after it).
        after = np.searchsorted(key, ids * span + d, side="left")
        before = after - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            gap_after = np.where(
                after < end, np.abs(np.log2(tokens[np.minimum(after, len(tokens) - 1)] / d)), np.inf
            )
            gap_before = np.where(
                before >= start, np.abs(np.log2(tokens[np.maximum(before, 0)] / d)), np.inf
            )
        pos = np.where(gap_before < gap_after, before, after)
        gap = np.minimum(gap_before, gap_after)
        long_enough = planned * 2.0**HORIZON_TOLERANCE >= d
        reached = has_rows & long_enough & (gap <= HORIZON_TOLERANCE)
        # Diverged before D: its rows stop short of the horizon.
        died = diverged & ~reached & long_enough & (last_tokens < d)
        if not (reached.any() or died.any()):
            continue
        sel = np.flatnonzero(reached)
        p = pos[sel]
        lo, hi = start[sel], end[sel] - 1
        sum_loss = np.zeros(len(sel))
        sum_norm = np.zeros(len(sel))
        n_rows = np.zeros(len(sel))
        n_norm = np.zeros(len(sel))
        for off in range(-window, window + 1):
            q = p + off
            inside = (q >= lo) & (q <= hi)
            qq = np.clip(q, 0, len(loss) - 1)
            sum_loss += np.where(inside, loss[qq], 0.0)
            n_rows += inside
            ok = inside & np.isfinite(log_norm[qq])
            sum_norm += np.where(ok, log_norm[qq], 0.0)
            n_norm += ok
        with np.errstate(invalid="ignore", divide="ignore"):
            h_loss = sum_loss / n_rows
            h_norm = np.where(n_norm > 0, sum_norm / np.maximum(n_norm, 1), np.nan)
        h_loss = np.where(np.isfinite(h_loss), h_loss, np.inf)  # NaN in the window: diverging
        dead = np.flatnonzero(died)
        # The latest row averaged decides (a window reaching into the decay is decayed too); a
        # trial that died before D is judged at the step where D would have fallen.
        last_row = row_step[np.minimum(p + window, hi)]
        dead_step = np.ceil(d * planned_steps[dead] / np.maximum(planned[dead], 1)).astype(np.int64)
        at_step = np.concatenate([last_row, dead_step])
        both = np.concatenate([sel, dead])
        with np.errstate(divide="ignore"):
            own_end = np.abs(np.log2(planned[both] / d)) <= HORIZON_TOLERANCE
        in_warmup = at_step <= n_warm[both]
        decayed = ~own_end & ((at_step > clean_until[both]) | in_warmup)
        parts.append(
            pd.DataFrame(
                {
                    "tix": np.concatenate([ids[sel], ids[dead]]),
                    "horizon": d,
                    "loss": np.concatenate([h_loss, np.full(len(dead), np.inf)]),
                    "log2_norm": np.concatenate([h_norm, np.full(len(dead), np.nan)]),
                    "decayed": decayed,
                }
            )
        )
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    info = usable.set_index("tix")[[*CONFIG_COLUMNS, "cell", "log2_lr", "seed", "tokens"]]
    table = table.join(info, on="tix")
    table["diverged"] = np.isinf(table["loss"].to_numpy())
    # Runs differing only in planned steps: keep one read before its decay, then the one
    # planned for the fewest tokens.
    same = [c for c in CONFIG_COLUMNS if c != "steps"] + ["log2_lr", "seed", "horizon"]
    table = table.sort_values(["decayed", "tokens"], kind="stable").drop_duplicates(
        same, keep="first"
    )
    return table.sort_values(["cell", "horizon", "log2_lr", "seed"]).reset_index(drop=True)
