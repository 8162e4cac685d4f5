"""The report's six figures, drawn headless with matplotlib's object API (no pyplot, so no
global backend is touched: a notebook user's backend stays as it was).

Each `plot_*` returns a Figure, or None when the store cannot support that figure (the report
then says why, from `FIGURE_NEEDS`).
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

from .coord import coord_at_one_lr
from .load import CONFIG_COLUMNS, format_value
from .pipeline import Analysis
from .transfer import TransferFit, headline, spans_sizes

FIGURE_NEEDS = {
    "loss_vs_lr": "at least one cell with a finite loss at two or more lrs",
    "lr_star_vs_width": "at least two widths, and two or more lrs in a cell",
    "loss_vs_norm": "output norms (out_rms_to_inf) in the steps table, at two or more lrs",
    "lr_batch_heatmap": "at least two batch sizes in one configuration",
    "loss_vs_time": "steps rows for the tuned trials",
    "coord_check": "coord-check rows (train.coord_check > 0) at two or more widths",
}
DPI = 110
# Inches per panel. The report shows a figure at most REPORT_WIDTH_PX wide (report.py's CSS:
# body max-width 1200px, img max-width 100%); three panels make a 12-inch, 1320 px PNG, so one
# point of text shows as DPI / 72 * 1200 / 1320 = 1.39 px (figures of 1-2 panels: 1.53 px).
PANEL = (4.0, 3.4)
REPORT_WIDTH_PX = 1200
FS_SMALL = 9  # pt: legends, annotations, contour labels (12.5 px in a 3-panel figure)
FS = 10  # pt: tick labels, axis labels, panel titles (13.9 px)
FS_TITLE = 11  # pt: the figure's title


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _panels(n: int, height: float = PANEL[1]) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(PANEL[0] * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _readable(ax) -> None:
    """Tick and axis labels at FS whatever the user's matplotlib rc says."""
    ax.tick_params(labelsize=FS)
    ax.xaxis.label.set_size(FS)
    ax.yaxis.label.set_size(FS)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _positive(*arrays: np.ndarray) -> np.ndarray:
    """Mask of the points that a log axis can show (all coordinates > 0 and finite): a zero
    (the step-0 row has 0 tokens and 0 s) would be clipped to the far left of the axis."""
    mask = np.ones(len(arrays[0]), bool)
    for a in arrays:
        a = np.asarray(a, float)
        mask &= np.isfinite(a) & (a > 0)
    return mask


def _figure_legend(fig: Figure, handles: list, labels: list[str] | None = None) -> None:
    """One legend for the whole figure, below its panels, in as few rows as fit its width
    (so that it never widens the PNG, which would shrink all its text in the report)."""
    labels = labels if labels is not None else [h.get_label() for h in handles]
    if not labels:
        return
    # Width of an entry, inches: handle and padding, plus ~0.6 em per character.
    entry = sorted((0.7 + 0.6 * FS_SMALL / 72 * len(t) for t in labels), reverse=True)
    room = 0.95 * fig.get_figwidth()
    ncol = max(k for k in range(1, len(entry) + 1) if k == 1 or sum(entry[:k]) <= room)
    rows = -(-len(entry) // ncol)
    fig.legend(
        handles=handles,
        labels=labels,
        loc="outside lower center",
        ncol=-(-len(entry) // rows),  # the same rows, balanced
        fontsize=FS_SMALL,
        frameon=False,
    )


def _one_legend(fig: Figure, axes: list) -> None:
    """The figure legend of what the panels drew: each label once, in drawing order, and no
    label of a line with no points."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if isinstance(handle, Line2D) and len(handle.get_xdata()) == 0:
                continue
            entries.setdefault(label, handle)
    if entries:
        _figure_legend(fig, list(entries.values()), labels=list(entries))


def _log2_axis(ax, axis: str = "x", span: float | None = None) -> None:
    step = 1 if span is None or span <= 12 else 2
    loc = MultipleLocator(step)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(loc)


def _y_limits(
    values: np.ndarray, quantile: float = 0.75, factor: float = 2.0
) -> tuple[float, float]:
    """Clip the y axis to the basin: from the best loss to `factor` times the distance to the
    given quantile above it (the blown-up ends of a wide lr grid would flatten the basin)."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    typical = float(np.quantile(v, quantile))
    top = min(hi, lo + factor * max(typical - lo, 1e-6))
    pad = 0.05 * max(top - lo, 1e-6)
    return lo - pad, top + pad


def _wrap(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _family_title(fit: TransferFit) -> str:
    fixed = " ".join(format_value(k, v) for k, v in fit.family.items())
    return f"{fit.optimizer}" + (f"\n{fixed}" if fixed else "")


# --------------------------------------------------------------------------- (1) loss vs lr


def _band_label(ns: set[int], band: bool) -> str:
    """The legend's word on the ±SEM band: it says 'band' only when one is drawn."""
    if not band:
        return "one seed: no band" if max(ns, default=1) <= 1 else "no band (no finite SEM)"
    lo, hi = min(ns), max(ns)
    seeds = _count(hi, "seed") if lo == hi else f"{lo}-{hi} seeds"
    return f"±SEM band ({seeds}{'; none where 1' if lo == 1 else ''})"


def _hollow_label(statuses: set[str]) -> str:
    if statuses == {"edge"}:
        return "optimum on the grid edge"
    return "optimum, flagged: " + ", ".join(s.replace("_", " ") for s in sorted(statuses))


def plot_loss_vs_lr(an: Analysis) -> Figure | None:
    fams = headline(an.width_transfer)
    curves = an.optima.curves
    if an.fixed_lr or not fams or curves.empty:
        return None
    if not np.isfinite(curves["mean"].to_numpy(float)).any():
        return None
    fig, axes = _panels(len(fams))
    shown = curves[curves["cell"].isin([c for f in fams.values() for c in f.cells])]
    ylo, yhi = _y_limits(shown["mean"].to_numpy(float))
    table = an.optima.table.set_index("cell")
    all_sizes = sorted({s for f in fams.values() for s in f.sizes})
    cmap = colormaps["viridis"]
    colour = {s: cmap(i / max(len(all_sizes) - 1, 1)) for i, s in enumerate(all_sizes)}
    # What the figure actually shows, so that its one legend lists nothing else.
    sizes_drawn: set[int] = set()
    ns: set[int] = set()  # seeds per drawn point
    band_drawn = diverged_drawn = filled_star = False
    hollow: set[str] = set()  # statuses of the optima drawn hollow
    for ax, fit in zip(axes, fams.values(), strict=True):
        for size, cell in zip(fit.sizes, fit.cells, strict=True):
            c = curves[curves["cell"] == cell].sort_values("log2_lr")
            x, m, sem = (c[k].to_numpy(float) for k in ("log2_lr", "mean", "sem"))
            fin = np.isfinite(m)
            col = colour[size]
            if fin.any():
                ax.plot(x[fin], m[fin], "-o", ms=3, color=col, label=f"width {size}")
                sizes_drawn.add(size)
                if "n" in c:
                    ns |= {int(v) for v in c["n"].to_numpy()[fin]}
            band = fin & np.isfinite(sem)
            if band.any():
                ax.fill_between(
                    x[band], (m - sem)[band], (m + sem)[band], color=col, alpha=0.25, lw=0
                )
                band_drawn = True
            dead = np.isinf(m)
            if dead.any():  # an empty unclipped line would still stretch the layout to x=0
                ax.plot(
                    x[dead], np.full(dead.sum(), yhi), "x", color=col, ms=7, mew=2, clip_on=False
                )
                diverged_drawn = True
            opt = table.loc[cell]
            if np.isfinite(opt["log2_lr_star"]):
                ok = opt["status"] == "ok"
                ax.plot(
                    opt["log2_lr_star"],
                    min(opt["loss_star"], yhi),
                    "*",
                    ms=14,
                    mec="black",
                    mfc=col if ok else "white",
                    zorder=5,
                    clip_on=False,
                )
                if ok:
                    filled_star = True
                else:
                    hollow.add(str(opt["status"]))
        ax.set_ylim(ylo, yhi)
        xs = curves[curves["cell"].isin(fit.cells)]["log2_lr"]
        _log2_axis(ax, "x", float(xs.max() - xs.min()))
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel(f"loss, {an.results.metric} (nats/token)")
        ax.set_title(_family_title(fit), fontsize=FS)
        ax.grid(alpha=0.3)
        _readable(ax)
    handles: list = [
        Line2D([], [], marker="o", ms=4, color=colour[s], label=f"width {s}")
        for s in all_sizes
        if s in sizes_drawn
    ]
    band_label = _band_label(ns, band_drawn)
    if band_drawn:
        handles.append(Patch(color="grey", alpha=0.25, lw=0, label=band_label))
    else:  # no handle to draw: the entry is words only
        handles.append(Line2D([], [], ls="none", label=band_label))
    if filled_star:
        handles.append(
            Line2D([], [], marker="*", ls="", color="grey", mec="black", ms=12, label="optimum")
        )
    if hollow:
        hollow_star = {"marker": "*", "ls": "", "mfc": "white", "mec": "black", "ms": 12}
        handles.append(Line2D([], [], **hollow_star, label=_hollow_label(hollow)))
    if diverged_drawn:
        handles.append(
            Line2D([], [], marker="x", ls="", color="grey", mew=2, label="diverged (drawn at top)")
        )
    _figure_legend(fig, handles)
    over = "mean over seeds" if max(ns, default=1) > 1 else "one seed per point"
    fig.suptitle(f"Loss vs learning rate, one curve per width ({over})", fontsize=FS_TITLE)
    return fig


# --------------------------------------------------------------------------- (2) lr* vs width


def plot_lr_star_vs_width(an: Analysis) -> Figure | None:
    fams = headline(an.width_transfer)
    if not spans_sizes(fams.values()) or an.fixed_lr:
        return None
    fig, axes = _panels(len(fams))
    for ax, fit in zip(axes, fams.values(), strict=True):
        x = np.log2(np.array(fit.sizes, float))
        y = np.array([np.nan if v is None else v for v in fit.log2_lr_star])
        lo = np.array([np.nan if c[0] is None else c[0] for c in fit.log2_lr_star_ci])
        hi = np.array([np.nan if c[1] is None else c[1] for c in fit.log2_lr_star_ci])
        used = np.array(fit.used)
        err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        has_ci = np.isfinite(err).all(axis=0)
        err = np.where(np.isfinite(err), err, 0)
        if used.any():
            ax.errorbar(
                x[used],
                y[used],
                yerr=err[:, used],
                fmt="o",
                color="C0",
                capsize=4,
                label="lr* (95 % CI)" if has_ci[used].all() else "lr* (one seed: no interval)",
            )
        edge = ~used & np.isfinite(y)
        if edge.any():
            ax.errorbar(
                x[edge],
                y[edge],
                yerr=err[:, edge],
                fmt="o",
                mfc="white",
                color="C3",
                capsize=4,
                label="flagged: grid edge or divergence (not fitted)",
            )
        title = _family_title(fit)
        if fit.status == "ok":
            xx = np.linspace(x.min() - 0.3, x.max() + 0.3, 20)
            ci = fit.slope_ci or [np.nan, np.nan]
            title += f"\nslope {fit.slope:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]: {fit.verdict}"
            ax.plot(
                xx,
                fit.intercept + fit.slope * xx,
                "-",
                color="C0",
                label="fit (slope [95 % CI] in the panel title)",
            )
            xm = float(x[used].mean())
            ym = fit.intercept + fit.slope * xm
            for ref, style in ((0.0, "--"), (-1.0, ":")):
                ax.plot(
                    xx,
                    ym + ref * (xx - xm),
                    style,
                    color="grey",
                    lw=1,
                    label=f"reference slope {ref:g}",
                )
        else:
            ax.text(
                0.5,
                0.5,
                _wrap(fit.reason or "fit impossible", 40),
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=FS_SMALL,
                color="C3",
                bbox={"fc": "white", "ec": "C3"},
            )
        ax.set_xticks(x, [f"{v:g}\n({s})" for v, s in zip(x, fit.sizes, strict=True)])
        ax.set_xlabel("log2 width (width in parentheses)")
        ax.set_ylabel("log2 optimal learning rate")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=FS)
        ax.grid(alpha=0.3)
        _readable(ax)
    _one_legend(fig, axes)
    tolerance = next(iter(fams.values())).tolerance
    band = f"; verdicts at +-{tolerance:g} octave per doubling" if tolerance else ""
    fig.suptitle(
        f"Optimal learning rate vs width (slope 0 = the lr transfers{band})", fontsize=FS_TITLE
    )
    return fig


# --------------------------------------------------------------------------- (3) loss vs norm


def _norm_family(nt, opt: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The headline family of `opt` (the one its norm-transfer verdicts speak for): its fixed
    values, and its rows of nt.points and nt.best."""
    s = nt.summary.get("by_optimizer", {}).get(opt)
    rec = next(
        (r for r in nt.across_widths if r["optimizer"] == opt and s and r["label"] == s["label"]),
        None,
    )
    family = {} if rec is None else rec["family"]

    def mine(frame: pd.DataFrame) -> pd.DataFrame:
        keep = frame["optimizer"] == opt
        for col, value in family.items():
            keep &= frame[col].astype(str) == str(value)
        return frame[keep]

    return family, mine(nt.points), mine(nt.best)


def plot_loss_vs_norm(an: Analysis) -> Figure | None:
    nt = an.norm
    if nt is None or nt.points.empty or an.fixed_lr:
        return None
    # One panel per width of each optimizer's headline family: every width its verdict on the
    # optimal norm's trend rests on is shown, and those that could not enter it too.
    panels = []
    for opt in sorted(nt.points["optimizer"].unique()):
        _, pts, best = _norm_family(nt, str(opt))
        s = nt.summary.get("by_optimizer", {}).get(str(opt))
        for k, width in enumerate(sorted(pts["width"].unique())):
            panels.append((str(opt), int(width), pts, best, s if k == 0 else None))
    fig, axes = _panels(len(panels), PANEL[1] + 0.4)
    horizons = sorted(nt.points["horizon"].unique())
    cmap = colormaps["plasma"]
    hcol = {h: cmap(0.85 * i / max(len(horizons) - 1, 1)) for i, h in enumerate(horizons)}
    batches = sorted(nt.points["batch_size"].unique())
    bsize = {b: 12 + 60 * i / max(len(batches) - 1, 1) for i, b in enumerate(batches)}
    for ax, (opt, width, pts, best, s) in zip(axes, panels, strict=True):
        mine = pts[pts["width"] == width]
        for h in horizons:
            ph = mine[mine["horizon"] == h]
            ax.scatter(
                ph["log2_norm"],
                ph["loss"],
                s=ph["batch_size"].map(bsize),
                color=hcol[h],
                alpha=0.7,
                edgecolors="none",
            )
        fits = best[best["width"] == width]
        for _, f in fits.iterrows():
            if f["status"] not in ("ok", "edge"):
                continue
            xx = np.linspace(f["x_lo"], f["x_hi"], 50)
            ax.plot(xx, f["a"] * xx**2 + f["b"] * xx + f["c"], color=hcol[f["horizon"]], lw=1.5)
            ax.plot(
                f["log2_norm_opt"],
                f["loss_opt"],
                "D" if f["status"] == "ok" else "s",
                color=hcol[f["horizon"]],
                mec="black",
                ms=7,
                mfc=None if f["status"] == "ok" else "none",
            )
        ax.set_ylim(*_y_limits(mine["loss"].to_numpy(float)))
        # One norm axis for all widths of an optimizer, so that a drift of x0 shows as a shift.
        xs = pts["log2_norm"].to_numpy(float)
        xs = xs[np.isfinite(xs)]
        if len(xs):
            pad = 0.05 * max(float(np.ptp(xs)), 1.0)
            ax.set_xlim(float(xs.min()) - pad, float(xs.max()) + pad)
        ax.set_xlabel("log2 output-layer norm (rms→inf)")
        ax.set_ylabel("train loss at horizon")
        n_in = int((fits["status"] == "ok").sum())
        title = f"{opt}, width {width}: {_count(n_in, 'fit')} in the trend"
        if s is not None:
            title += f"\nvs width: {s['width']['verdict']}; vs horizon: {s['horizon']['verdict']}"
        ax.set_title(title, fontsize=FS)
        ax.grid(alpha=0.3)
        _readable(ax)
    handles = [
        Line2D([], [], marker="o", ls="", color=hcol[h], label=f"{h:,} tokens") for h in horizons
    ]
    if len(batches) > 1:
        handles += [
            Line2D([], [], marker="o", ls="", color="grey", ms=np.sqrt(bsize[b]), label=f"B={b}")
            for b in batches
        ]
    handles.append(
        Line2D([], [], marker="D", ls="", color="grey", mec="black", label="optimal norm (fit)")
    )
    if (nt.best["status"] == "edge").any():
        handles.append(
            Line2D([], [], marker="s", ls="", mfc="none", mec="black", label="on the fit's edge")
        )
    _figure_legend(fig, handles)
    tol = nt.summary.get("tolerance")
    title = (
        "Loss vs output norm at each width: colour = token horizon, size = batch size,"
        " parabola at the best batch size"
    )
    if tol is not None:
        title += f"\nverdicts on norm*: tolerance +-{tol:g} octave per doubling"
    fig.suptitle(title, fontsize=FS_TITLE)
    return fig


# --------------------------------------------------------------------------- (4) lr x batch


HEAT_LEVELS = (0.25, 1.0, 2.0)  # percent above the minimum


def _heatmap_pick(an: Analysis) -> list[tuple[str, pd.DataFrame]]:
    table = an.optima.table
    if table.empty:
        return []
    keys = [c for c in CONFIG_COLUMNS if c not in ("batch_size", "steps")]
    picks = []
    for opt, t in table.groupby("optimizer", sort=True):
        best = None
        for _, fam in t.groupby(keys, dropna=False):
            if fam["batch_size"].nunique() < 2:
                continue
            rank = (int(fam["width"].iloc[0]), fam["batch_size"].nunique())
            if best is None or rank > best[0]:
                best = (rank, fam)
        if best is not None:
            picks.append((str(opt), best[1]))
    return picks


def plot_lr_batch_heatmap(an: Analysis) -> Figure | None:
    picks = _heatmap_pick(an)
    if not picks:
        return None
    fig, axes = _panels(len(picks), 4.2)
    curves = an.optima.curves
    cmap = colormaps["viridis_r"].with_extremes(bad="#e6e6e6")
    for ax, (opt, fam) in zip(axes, picks, strict=True):
        fam = fam.sort_values("batch_size")
        c = curves[curves["cell"].isin(fam["cell"])].merge(fam[["cell", "batch_size"]], on="cell")
        grid = c.pivot_table(index="batch_size", columns="log2_lr", values="mean", aggfunc="first")
        values = grid.to_numpy(float)
        finite = np.isfinite(values)
        if not finite.any():
            ax.set_visible(False)
            continue
        best = np.nanmin(np.where(finite, values, np.nan))
        rel = 100 * (values / best - 1)
        shown = np.ma.masked_where(~np.isfinite(rel) | (rel > HEAT_LEVELS[-1]), rel)
        xs = grid.columns.to_numpy(float)
        ys = np.log2(grid.index.to_numpy(float))
        dx = np.median(np.diff(xs)) if len(xs) > 1 else 1.0
        dy = np.median(np.diff(ys)) if len(ys) > 1 else 1.0
        extent = (xs[0] - dx / 2, xs[-1] + dx / 2, ys[0] - dy / 2, ys[-1] + dy / 2)
        im = ax.imshow(
            shown,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap=cmap,
            vmin=0,
            vmax=HEAT_LEVELS[-1],
            interpolation="nearest",
        )
        if len(xs) > 1 and len(ys) > 1:
            filled = np.where(np.isfinite(rel), rel, 100.0)
            cs = ax.contour(
                xs, ys, filled, levels=list(HEAT_LEVELS), colors="black", linewidths=0.8
            )
            ax.clabel(cs, fmt=lambda v: f"{v:g} %", fontsize=FS_SMALL)
        i, j = np.unravel_index(np.nanargmin(np.where(finite, values, np.nan)), values.shape)
        ax.plot(xs[j], ys[i], "*", color="red", mec="white", ms=16, label="minimum")
        stars = fam[fam["status"] == "ok"]
        ax.plot(
            stars["log2_lr_star"],
            np.log2(stars["batch_size"].astype(float)),
            "o",
            mfc="white",
            mec="black",
            ms=5,
            label="refined lr* per batch",
        )
        ax.set_yticks(ys, [f"{y:g}\n({b})" for y, b in zip(ys, grid.index, strict=True)])
        _log2_axis(ax, "x", float(xs[-1] - xs[0]))
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel("log2 batch size (sequences)")
        fixed = fam.iloc[0]
        title = f"{opt}, width {int(fixed['width'])}, depth {int(fixed['depth'])}"
        if fam["tokens"].nunique() > 1:
            title += "\n(steps fixed: larger batches saw more tokens)"
        ax.set_title(title, fontsize=FS)
        _readable(ax)
        cb = fig.colorbar(im, ax=ax)
        cb.set_label("L / L_min - 1 (%), grey: > 2 % or missing", fontsize=FS_SMALL)
        cb.ax.tick_params(labelsize=FS_SMALL)
    _one_legend(fig, axes)
    fig.suptitle(
        "Relative loss over learning rate x batch size (contours at 0.25 / 1 / 2 %)",
        fontsize=FS_TITLE,
    )
    return fig


# --------------------------------------------------------------------------- (5) loss vs time


def tuned_trials(an: Analysis) -> dict[str, pd.DataFrame]:
    """Per optimizer: the trials of its best cell at the largest width, at the grid lr closest
    to that cell's lr* (the lowest-loss grid lr when lr* is not finite), all seeds."""
    table = an.optima.table
    usable = an.results.usable
    out: dict[str, pd.DataFrame] = {}
    if table.empty:
        return out
    for opt, t in table.groupby("optimizer", sort=True):
        t = t[np.isfinite(t["loss_star"].to_numpy(float))]
        if t.empty:
            continue
        widest = t[t["width"] == t["width"].max()]
        cell = widest.sort_values("loss_star").iloc[0]
        trials = usable[(usable["cell"] == cell["cell"]) & ~usable["diverged"]]
        if trials.empty:
            continue
        grid = np.sort(trials["log2_lr"].unique())
        star = float(cell["log2_lr_star"])
        if np.isfinite(star):
            lr = grid[np.argmin(np.abs(grid - star))]
        else:
            lr = trials.groupby("log2_lr")["loss"].mean().idxmin()
        out[str(opt)] = trials[trials["log2_lr"] == lr]
    return out


def _tuned_label(an: Analysis, opt: str, trials: pd.DataFrame) -> str:
    """Which lr a training curve is at, said honestly: a grid point, and how it was chosen."""
    first = trials.iloc[0]
    grid = float(first["log2_lr"])
    row = an.optima.table.set_index("cell").loc[first["cell"]]
    star, status = float(row["log2_lr_star"]), str(row["status"])
    if not np.isfinite(star):
        how = "lowest-loss grid point; no fitted optimum"
    elif status == "ok":
        how = f"grid point nearest the fitted optimum 2^{star:.2f}"
    else:
        how = f"grid point nearest the optimum 2^{star:.2f}, flagged {status.replace('_', ' ')}"
    n = trials["seed"].nunique()
    return f"{opt}, width {int(first['width'])}: lr 2^{grid:g} ({how}); {_count(n, 'seed')}"


def plot_loss_vs_time(an: Analysis) -> Figure | None:
    steps = an.results.steps
    tuned = tuned_trials(an)
    if steps.empty or not tuned:
        return None
    fig, (ax_tok, ax_time) = _panels(2)
    handles = []
    most_seeds = 0
    for k, (opt, trials) in enumerate(tuned.items()):
        rows = steps[steps["tix"].isin(trials["tix"])]
        if rows.empty:
            continue
        mean = rows.groupby("step")[["tokens", "train_loss", "elapsed_s"]].mean()
        loss = mean["train_loss"].to_numpy(float)
        drew = False
        for ax, col in ((ax_tok, "tokens"), (ax_time, "elapsed_s")):
            x = mean[col].to_numpy(float)
            keep = _positive(x) & np.isfinite(loss)  # log x axis: no step-0 row
            if keep.any():
                ax.plot(x[keep], loss[keep], color=f"C{k}")
                drew = True
        if drew:
            handles.append(Line2D([], [], color=f"C{k}", label=_tuned_label(an, opt, trials)))
            most_seeds = max(most_seeds, trials["seed"].nunique())
    if not handles:
        return None
    for ax, xlabel in ((ax_tok, "training tokens"), (ax_time, "training wall-clock (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel + " (log2 scale)")
        ax.set_ylabel("train loss (nats/token)")
        lines = ax.get_lines()
        if lines:
            ys = np.concatenate([line.get_ydata() for line in lines])
            ax.set_ylim(*_y_limits(ys, quantile=0.9, factor=1.3))
        ax.grid(alpha=0.3)
        _readable(ax)
    _figure_legend(fig, handles)
    ax_tok.set_title("vs tokens", fontsize=FS)
    ax_time.set_title("vs wall-clock", fontsize=FS)
    ax_tok.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    over = "mean over seeds" if most_seeds > 1 else "one seed"
    fig.suptitle(
        f"Training curves near each optimizer's optimal lr (largest width, best cell; {over})",
        fontsize=FS_TITLE,
    )
    return fig


# --------------------------------------------------------------------------- (6) coord check


def plot_coord_check(an: Analysis) -> Figure | None:
    per_opt = coord_at_one_lr(an.results)
    if not per_opt:
        return None
    fig, axes = _panels(len(per_opt))
    for ax, (opt, (lr, r)) in zip(axes, per_opt.items(), strict=True):
        steps = sorted(r["step"].unique())
        shown_steps = [steps[0], steps[-1]] if len(steps) > 1 else steps
        layers = r.drop_duplicates("layer_index").sort_values("layer_index")
        cmap = colormaps["viridis"]
        for k, (_, layer) in enumerate(layers.iterrows()):
            col = cmap(k / max(len(layers) - 1, 1))
            for s in shown_steps:
                m = (
                    r[(r["layer_index"] == layer["layer_index"]) & (r["step"] == s)]
                    .groupby("width")["mean_abs"]
                    .mean()
                )
                wx, my = m.index.to_numpy(float), m.to_numpy(float)
                keep = _positive(wx, my)  # both axes are log
                last = s == shown_steps[-1]
                ax.plot(
                    wx[keep],
                    my[keep],
                    "-o" if last else "--",
                    color=col,
                    ms=3,
                    lw=1.5 if last else 0.8,
                    label=f"{layer['layer']}" if last else None,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width (log2 scale)")
        ax.set_ylabel("mean |activation| (log2 scale)")
        ax.set_title(
            f"{opt}, lr 2^{lr:g}\nstep {shown_steps[-1]} solid, step {shown_steps[0]} dashed",
            fontsize=FS,
        )
        ax.grid(alpha=0.3, which="both")
        _readable(ax)
        ax.legend(fontsize=FS_SMALL, title="layer", title_fontsize=FS_SMALL)
    fig.suptitle(
        "Coord check: activation size per layer vs width (flat = width-consistent)",
        fontsize=FS_TITLE,
    )
    return fig


PLOTS = {
    "loss_vs_lr": plot_loss_vs_lr,
    "lr_star_vs_width": plot_lr_star_vs_width,
    "loss_vs_norm": plot_loss_vs_norm,
    "lr_batch_heatmap": plot_lr_batch_heatmap,
    "loss_vs_time": plot_loss_vs_time,
    "coord_check": plot_coord_check,
}
FIGURE_TITLES = {
    "loss_vs_lr": "Loss vs learning rate across width",
    "lr_star_vs_width": "Optimal learning rate vs width",
    "loss_vs_norm": "Loss vs output norm (norm transfer)",
    "lr_batch_heatmap": "Learning rate x batch size",
    "loss_vs_time": "Training curves at the tuned learning rate",
    "coord_check": "Coord check",
}
