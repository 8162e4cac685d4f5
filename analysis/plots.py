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
from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

from .load import CONFIG_COLUMNS, format_value
from .pipeline import Analysis
from .transfer import TransferFit, headline

FIGURE_NEEDS = {
    "loss_vs_lr": "at least one cell with a finite loss",
    "lr_star_vs_width": "at least two widths",
    "loss_vs_norm": "output norms (out_rms_to_inf) in the steps table",
    "lr_batch_heatmap": "at least two batch sizes in one configuration",
    "loss_vs_time": "steps rows for the tuned trials",
    "coord_check": "coord-check rows (train.coord_check > 0) at two or more widths",
}
DPI = 110
PANEL = (5.2, 4.0)


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


def plot_loss_vs_lr(an: Analysis) -> Figure | None:
    fams = headline(an.width_transfer)
    curves = an.optima.curves
    if not fams or curves.empty or not np.isfinite(curves["mean"].to_numpy(float)).any():
        return None
    fig, axes = _panels(len(fams))
    shown = curves[curves["cell"].isin([c for f in fams.values() for c in f.cells])]
    ylo, yhi = _y_limits(shown["mean"].to_numpy(float))
    table = an.optima.table.set_index("cell")
    all_sizes = sorted({s for f in fams.values() for s in f.sizes})
    cmap = colormaps["viridis"]
    colour = {s: cmap(i / max(len(all_sizes) - 1, 1)) for i, s in enumerate(all_sizes)}
    for ax, fit in zip(axes, fams.values(), strict=True):
        for size, cell in zip(fit.sizes, fit.cells, strict=True):
            c = curves[curves["cell"] == cell].sort_values("log2_lr")
            x, m, sem = (c[k].to_numpy(float) for k in ("log2_lr", "mean", "sem"))
            fin = np.isfinite(m)
            col = colour[size]
            ax.plot(x[fin], m[fin], "-o", ms=3, color=col, label=f"width {size}")
            band = fin & np.isfinite(sem)
            ax.fill_between(x[band], (m - sem)[band], (m + sem)[band], color=col, alpha=0.25, lw=0)
            dead = np.isinf(m)
            if dead.any():  # an empty unclipped line would still stretch the layout to x=0
                ax.plot(
                    x[dead], np.full(dead.sum(), yhi), "x", color=col, ms=7, mew=2, clip_on=False
                )
            opt = table.loc[cell]
            if np.isfinite(opt["log2_lr_star"]):
                ax.plot(
                    opt["log2_lr_star"],
                    min(opt["loss_star"], yhi),
                    "*",
                    ms=14,
                    mec="black",
                    mfc=col if opt["status"] == "ok" else "white",
                    zorder=5,
                    clip_on=False,
                )
        ax.set_ylim(ylo, yhi)
        xs = curves[curves["cell"].isin(fit.cells)]["log2_lr"]
        _log2_axis(ax, "x", float(xs.max() - xs.min()))
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel(f"loss, {an.results.metric} (nats/token)")
        ax.set_title(_family_title(fit), fontsize=10)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Line2D([], [], marker="*", ls="", color="grey", mec="black", ms=12, label="optimum"),
            Line2D(
                [],
                [],
                marker="*",
                ls="",
                mfc="white",
                mec="black",
                ms=12,
                label="optimum on grid edge",
            ),
            Line2D([], [], marker="x", ls="", color="grey", mew=2, label="diverged (drawn at top)"),
        ]
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Loss vs learning rate, one curve per width (mean over seeds, band = ±SEM)")
    return fig


# --------------------------------------------------------------------------- (2) lr* vs width


def plot_lr_star_vs_width(an: Analysis) -> Figure | None:
    fams = headline(an.width_transfer)
    if not fams or all(len(f.sizes) < 2 for f in fams.values()):
        return None
    fig, axes = _panels(len(fams))
    for ax, fit in zip(axes, fams.values(), strict=True):
        x = np.log2(np.array(fit.sizes, float))
        y = np.array([np.nan if v is None else v for v in fit.log2_lr_star])
        lo = np.array([np.nan if c[0] is None else c[0] for c in fit.log2_lr_star_ci])
        hi = np.array([np.nan if c[1] is None else c[1] for c in fit.log2_lr_star_ci])
        used = np.array(fit.used)
        err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        err = np.where(np.isfinite(err), err, 0)
        ax.errorbar(
            x[used],
            y[used],
            yerr=err[:, used],
            fmt="o",
            color="C0",
            capsize=4,
            label="lr* (95 % bootstrap CI)",
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
                label="on the grid edge (not fitted)",
            )
        if fit.status == "ok":
            xx = np.linspace(x.min() - 0.3, x.max() + 0.3, 20)
            ci = fit.slope_ci or [np.nan, np.nan]
            ax.plot(
                xx,
                fit.intercept + fit.slope * xx,
                "-",
                color="C0",
                label=f"fit: slope {fit.slope:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]",
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
                fontsize=9,
                color="C3",
                bbox={"fc": "white", "ec": "C3"},
            )
        ax.set_xticks(x, [f"{v:g}\n({s})" for v, s in zip(x, fit.sizes, strict=True)])
        ax.set_xlabel("log2 width (width in parentheses)")
        ax.set_ylabel("log2 optimal learning rate")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_family_title(fit), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Optimal learning rate vs width (slope 0 = the lr transfers)")
    return fig


# --------------------------------------------------------------------------- (3) loss vs norm


def plot_loss_vs_norm(an: Analysis) -> Figure | None:
    nt = an.norm
    if nt is None or nt.points.empty:
        return None
    pts = nt.points
    # Per optimizer: its widest configuration (then the shallowest) with the most points.
    picks = []
    for opt, p in pts.groupby("optimizer", sort=True):
        width = p["width"].max()
        depth = p[p["width"] == width]["depth"].min()
        picks.append((opt, width, depth))
    fig, axes = _panels(len(picks), 4.4)
    horizons = sorted(pts["horizon"].unique())
    cmap = colormaps["plasma"]
    hcol = {h: cmap(0.85 * i / max(len(horizons) - 1, 1)) for i, h in enumerate(horizons)}
    batches = sorted(pts["batch_size"].unique())
    bsize = {b: 12 + 60 * i / max(len(batches) - 1, 1) for i, b in enumerate(batches)}
    for ax, (opt, width, depth) in zip(axes, picks, strict=True):
        mine = pts[(pts["optimizer"] == opt) & (pts["width"] == width) & (pts["depth"] == depth)]
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
        best = nt.best[
            (nt.best["optimizer"] == opt)
            & (nt.best["width"] == width)
            & (nt.best["depth"] == depth)
        ]
        for _, f in best.iterrows():
            if f["status"] not in ("ok", "edge"):
                continue
            xx = np.linspace(f["x_lo"], f["x_hi"], 50)
            ax.plot(xx, f["a"] * xx**2 + f["b"] * xx + f["c"], color=hcol[f["horizon"]], lw=1.5)
            ax.axvline(f["log2_norm_opt"], color=hcol[f["horizon"]], ls=":", lw=1)
            ax.plot(
                f["log2_norm_opt"], f["loss_opt"], "D", color=hcol[f["horizon"]], mec="black", ms=7
            )
        ax.set_ylim(*_y_limits(mine["loss"].to_numpy(float)))
        ax.set_xlabel("log2 output-layer norm (rms→inf)")
        ax.set_ylabel("train loss at horizon (nats/token)")
        ax.set_title(f"{opt}, width {width}, depth {depth}", fontsize=10)
        ax.grid(alpha=0.3)
        handles = [
            Line2D([], [], marker="o", ls="", color=hcol[h], label=f"{h:,} tokens")
            for h in horizons
        ]
        handles += [
            Line2D([], [], marker="o", ls="", color="grey", ms=np.sqrt(bsize[b]), label=f"B={b}")
            for b in batches
        ]
        handles.append(
            Line2D([], [], marker="D", ls="", color="grey", mec="black", label="optimal norm (fit)")
        )
        ax.legend(handles=handles, fontsize=7, ncol=2)
    fig.suptitle(
        "Loss vs output norm: colour = token horizon, size = batch size; parabola at the best batch"
    )
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
            ax.clabel(cs, fmt=lambda v: f"{v:g} %", fontsize=7)
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
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
        fig.colorbar(im, ax=ax, label="L / L_min - 1 (%), grey: > 2 % or missing")
    fig.suptitle("Relative loss over learning rate x batch size (contours at 0.25 / 1 / 2 %)")
    return fig


# --------------------------------------------------------------------------- (5) loss vs time


def tuned_trials(an: Analysis) -> dict[str, pd.DataFrame]:
    """Per optimizer: the trials of its best cell at the largest width, at the grid lr closest
    to that cell's lr* (all seeds)."""
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
        grid = trials["log2_lr"].unique()
        lr = grid[np.argmin(np.abs(grid - cell["log2_lr_star"]))]
        out[str(opt)] = trials[trials["log2_lr"] == lr]
    return out


def plot_loss_vs_time(an: Analysis) -> Figure | None:
    steps = an.results.steps
    tuned = tuned_trials(an)
    if steps.empty or not tuned:
        return None
    fig, (ax_tok, ax_time) = _panels(2)
    drawn = False
    for k, (opt, trials) in enumerate(tuned.items()):
        rows = steps[steps["tix"].isin(trials["tix"])]
        if rows.empty:
            continue
        mean = rows.groupby("step")[["tokens", "train_loss", "elapsed_s"]].mean()
        first = trials.iloc[0]
        label = (
            f"{opt} (width {int(first['width'])}, lr 2^{first['log2_lr']:.1f}, {len(trials)} seeds)"
        )
        ax_tok.plot(mean["tokens"], mean["train_loss"], color=f"C{k}", label=label)
        ax_time.plot(mean["elapsed_s"], mean["train_loss"], color=f"C{k}", label=label)
        drawn = True
    if not drawn:
        return None
    for ax, xlabel in ((ax_tok, "training tokens"), (ax_time, "training wall-clock (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel + " (log2 scale)")
        ax.set_ylabel("train loss (nats/token)")
        ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
        ax.set_ylim(*_y_limits(ys, quantile=0.9, factor=1.3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_tok.set_title("vs tokens", fontsize=10)
    ax_time.set_title("vs wall-clock", fontsize=10)
    ax_tok.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    fig.suptitle("Training curves at each optimizer's tuned lr (largest width, mean over seeds)")
    return fig


# --------------------------------------------------------------------------- (6) coord check


def plot_coord_check(an: Analysis) -> Figure | None:
    coord = an.results.coord
    if coord.empty:
        return None
    info = an.results.trials.set_index("tix")[["optimizer", "width", "log2_lr"]]
    rows = coord.join(info, on="tix")
    opts = [o for o, r in rows.groupby("optimizer", sort=True) if r["width"].nunique() >= 2]
    if not opts:
        return None
    fig, axes = _panels(len(opts))
    for ax, opt in zip(axes, opts, strict=True):
        r = rows[rows["optimizer"] == opt]
        # One lr for all widths: the one recorded at the most widths, then the middle one.
        per_lr = r.groupby("log2_lr")["width"].nunique()
        lrs = per_lr.index[per_lr == per_lr.max()].to_numpy(float)
        lr = lrs[len(lrs) // 2]
        r = r[r["log2_lr"] == lr]
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
                last = s == shown_steps[-1]
                ax.plot(
                    m.index,
                    m.to_numpy(),
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
            f"{opt}, lr 2^{lr:.2f}: step {shown_steps[-1]} solid, step {shown_steps[0]} dashed",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="layer", title_fontsize=7)
    fig.suptitle("Coord check: activation size per layer vs width (flat = width-consistent)")
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
