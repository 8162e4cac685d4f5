"""The entry points: `write_report` (report.html + PNGs + fits.json) and `print_summary`.

fits.json is a documented contract: every key is described in the README's "fits.json" section
(and a test checks that the README names every key this module writes).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
from rich.console import Console
from rich.table import Table

from sweeper.store import STATUSES, status_words

from .batch_size import batch_size_sentences, rise_words
from .coord import coord_sentences
from .layer_lr import layer_lr_sentences, ratio
from .load import METRIC_DESCRIPTIONS
from .loss_compare import pct_ci
from .norm_transfer import MIN_NORM_SPAN
from .norm_transfer import summary_sentences as norm_sentences
from .optimum import NEAR_OPTIMAL, WINDOW
from .pipeline import Analysis, analyze
from .plots import FIGURE_NEEDS, FIGURE_TITLES, PLOTS, figure_png
from .transfer import TransferFit, headline, spans_sizes
from .verdict import VERDICTS

FITS_VERSION = 2


# --------------------------------------------------------------------------- JSON


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN and inf become null, numpy and pandas scalars become Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, pd.DataFrame):
        return [jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, pd.Timestamp | datetime):
        return obj.isoformat()
    if obj is None or isinstance(obj, str | int):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def _optimum_record(row: pd.Series, varying: list[str]) -> dict[str, Any]:
    return {
        "cell": row["cell"],
        "label": row["label"],
        "config": {c: row[c] for c in varying},
        "optimizer": row["optimizer"],
        "width": row["width"],
        "depth": row["depth"],
        "batch_size": row["batch_size"],
        "steps": row["steps"],
        "tokens": row["tokens"],
        "n_params": row["n_params"],
        "n_lr": row["n_lr"],
        "n_seeds": row["n_seeds"],
        "n_trials": row["n_trials"],
        "n_diverged": row["n_diverged"],
        "log2_lr_grid": [row["log2_lr_min"], row["log2_lr_max"]],
        "argmin_log2_lr": row["argmin_log2_lr"],
        "log2_lr_star": row["log2_lr_star"],
        "lr_star": row["lr_star"],
        "log2_lr_star_ci": None if not np.isfinite(row["ci_lo"]) else [row["ci_lo"], row["ci_hi"]],
        "loss_star": row["loss_star"],
        "method": row["method"],
        "status": row["status"],
        "flags": list(row["flags"]),
        "edge_side": row["edge_side"],
        "noise": row["noise"],
        "seed_sigma": row["seed_sigma"],
        "noise_dof": row["noise_dof"],
        "method_error": row["method_error"],
        "interior_frac": row["interior_frac"],
        "fit_range": [row["fit_lo"], row["fit_hi"]],
        "near_optimal_log2_lr": [row["near_opt_lo"], row["near_opt_hi"]],
    }


def build_fits(an: Analysis, figures: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Every fitted number, JSON-clean (the keys are described in the README's fits.json
    section)."""
    res = an.results
    table = an.optima.table
    usable = res.usable
    by_opt = {
        str(o): {s: int(v) for s, v in g["status"].value_counts().items()}
        for o, g in res.trials.groupby("optimizer")
    }
    nt = an.norm
    fits = {
        "version": FITS_VERSION,
        "meta": {
            "results": str(res.path),
            "sweeps": res.sweeps,
            "metric": res.metric,
            "metric_description": METRIC_DESCRIPTIONS[res.metric],
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_bootstrap": an.n_bootstrap,
            "fit_window_octaves": WINDOW,
            "tolerance": an.tolerance,
            "near_optimal_fraction": NEAR_OPTIMAL,
            "horizons": an.horizons,
            "predict_width": an.predict_width,
            "timings_s": an.timings,
        },
        "counts": {**res.status_counts(), "by_optimizer": by_opt},
        "varying": {c: sorted(usable[c].dropna().unique().tolist()) for c in res.varying},
        "noise": {opt: {"sigma": nz.sigma, "dof": nz.dof} for opt, nz in an.optima.noise.items()},
        "optima": [_optimum_record(r, res.varying) for _, r in table.iterrows()],
        "width_transfer": [f.to_dict() for f in an.width_transfer],
        "depth_transfer": [f.to_dict() for f in an.depth_transfer],
        "norm_transfer": None
        if nt is None
        else {
            "fits": nt.fits,
            "best": nt.best,
            "across_horizons": nt.across_horizons,
            "across_widths": nt.across_widths,
            "summary": nt.summary,
        },
        "scaling": {
            "source": an.scaling.source,
            "lr_law": an.scaling.lr_law,
            "batch_law": an.scaling.batch_law,
            "optima": an.scaling.optima,
        },
        "layer_lr": an.layer_lr,
        "batch_size": an.batch_sizes,
        "coord_check": an.coord,
        "figures": figures or {},
        "notes": res.notes,
        "conclusions": conclusions(an),
    }
    return jsonable(fits)


# --------------------------------------------------------------------------- words


def _fmt_ci(ci: list | None, fmt: str = "{:+.2f}") -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci[:2]):
        return "[no interval]"
    return "[" + fmt.format(ci[0]) + ", " + fmt.format(ci[1]) + "]"


def _lr(x: float) -> str:
    return f"2^{x:.2f} = {2.0**x:.3g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def transfer_sentence(f: TransferFit) -> str:
    """The family's verdict in words, with the numbers behind it."""
    s0, s1 = f.sizes[0], f.sizes[-1]
    if f.status != "ok":
        return f"{f.label}: inconclusive, {f.reason}."
    used = [s for s, u in zip(f.sizes, f.used, strict=True) if u]
    u0, u1 = used[0], used[-1]
    drift = f"by {f.drift:+.2f} {_fmt_ci(f.drift_ci)} octaves"
    lead = {
        "transfers": f"the optimal lr transfers across {f.axis} {u0}-{u1}",
        "drifts": f"the optimal lr drifts across {f.axis} {u0}-{u1}, {drift}",
        "inconclusive": f"transfer across {f.axis} {u0}-{u1} is inconclusive",
    }[f.verdict]
    slope = f"slope {f.slope:+.2f} {_fmt_ci(f.slope_ci)} octaves per doubling"
    text = (
        f"{f.label}: {lead} ({slope}; {_plural(f.n_seeds, 'seed')} per point;"
        f" tolerance +-{f.tolerance:g}: {f.verdict_why}"
        + ("; interval from the optima's scatter, one seed" if f.noise == "scatter" else "")
        + ")"
    )
    if f.penalty is not None:
        text += (
            f"; tuning at {f.axis} {u0} and copying its lr to {u1} costs"
            f" {100 * f.penalty_rel:.2f} % in loss"
        )
        if f.penalty_rel_ci:
            hi = f.penalty_rel_ci[1]
            upper = f"{100 * hi:.2f} %" if hi is not None and math.isfinite(hi) else "divergence"
            text += f" ({100 * f.penalty_rel_ci[0]:.2f} % to {upper})"
    elif f.penalty_note:
        text += f"; {f.penalty_note}"
    if len(used) < len(f.sizes):
        skipped = [s for s, u in zip(f.sizes, f.used, strict=True) if not u]
        text += (
            f"; {f.axis} {', '.join(map(str, skipped))} left out"
            " (optimum on the grid's edge, bounded by divergence, or none)"
        )
    if f.wider_is_better is not None and f.axis == "width":
        verdict = "falls" if f.wider_is_better else "does not fall monotonically"
        text += f"; at lr 2^{f.wider_log2_lr:g} the loss {verdict} with width {s0}-{s1}"
    return text + "."


def prediction_sentence(f: TransferFit) -> str | None:
    p = f.prediction
    if not p:
        return None
    text = f"{f.label}: predicted optimal lr at width {p['width']}: {_lr(p['log2_lr'])}"
    if p.get("lr_ci"):
        text += f" (95 % interval {p['lr_ci'][0]:.3g} to {p['lr_ci'][1]:.3g})"
    if p["extrapolation"]:
        text += f", extrapolated beyond the measured widths {f.sizes[0]}-{f.sizes[-1]}"
    return text + "."


def _some_labels(cells: pd.DataFrame) -> str:
    """The first few cells' labels, for a sentence."""
    return "; ".join(cells["label"].head(5)) + ("; ..." if len(cells) > 5 else "") + "."


def conclusions(an: Analysis) -> list[str]:
    res = an.results
    counts = res.status_counts()
    out = [
        f"{_plural(counts['total'], 'trial')}: {status_words(counts)}"
        + (
            " (stopped and failed trials are left out of every fit)."
            if counts["stopped"]
            else " (failed trials are left out of every fit)."
        )
    ]
    usable = res.usable
    if usable.empty:
        out.append("Fit impossible: no trial completed or diverged, so there is nothing to fit.")
        return out
    if usable["diverged"].all():
        out.append(
            "Fit impossible: every trial diverged, so no optimal lr exists on this grid"
            " (extend the lr grid towards smaller values)."
        )
        return out
    table = an.optima.table
    if an.fixed_lr:
        out.append(
            "One lr per cell: these runs measure fixed learning rates (a coord check, say), so"
            " there is no optimal lr to fit and no transfer verdict; the figures show the runs."
        )
        dead = table[table["status"] == "all_diverged"]
        if len(dead):
            out.append("Diverged at every seed: " + _some_labels(dead))
        out.extend(coord_sentences(an.coord))
        return out
    short = table[table["status"] == "too_few_lrs"]
    if len(short):
        out.append(
            f"Fit impossible for {len(short)} cell(s) with fewer than 3 lrs on the grid (no"
            " optimum can be told from an edge): " + "; ".join(short["label"].head(5)) + "."
        )
    dead = table[table["status"] == "all_diverged"]
    if len(dead):
        out.append(
            f"Fit impossible for {len(dead)} cell(s) where every trial diverged: "
            + _some_labels(dead)
        )
    bounded = table[table["status"] == "divergence_bounded"]
    if len(bounded):
        out.append(
            f"{len(bounded)} of {len(table)} cells: optimum bounded by divergence (the loss"
            " still falls at the last lr that did not diverge, so the optimum lies near the"
            " divergence cliff; a finer grid there would locate it; no transfer claim rests on"
            " them): " + _some_labels(bounded)
        )
    unmeasured = table[table["noise"] == "none"]
    if len(unmeasured):
        why = (
            "one seed per point"
            if (unmeasured["n_seeds"] == 1).all()
            else "no lr where two seeds both finished near the optimum"
        )
        out.append(
            f"{len(unmeasured)} of {len(table)} cells: no measured seed noise ({why}), so their"
            " optima have no interval (run 3 or more seeds per point for one)."
        )
    edge = table[table["status"] == "edge"]
    if len(edge):
        sides = set(edge["edge_side"])
        towards = " and ".join(
            {"low": "smaller", "high": "larger"}[s] for s in ("low", "high") if s in sides
        )
        out.append(
            f"{len(edge)} of {len(table)} cells: optimum on the lr grid's edge"
            f" (widen the grid towards {towards} lrs; no transfer claim rests on them): "
            + _some_labels(edge)
        )
    if res.usable["width"].nunique() < 2:
        out.append(
            f"Transfer fit impossible: only one width ({int(res.usable['width'].iloc[0])}) in this"
            " store, so nothing can be said about transfer across width."
        )
    for opt, fam in sorted(headline(an.width_transfer).items()):
        mine = [f for f in an.width_transfer if f.optimizer == opt]
        if len(mine) > 1:
            ok = [f for f in mine if f.status == "ok"]
            if ok:
                slopes = np.array([f.slope for f in ok])
                tally = ", ".join(f"{sum(f.verdict == v for f in mine)} {v}" for v in VERDICTS)
                out.append(
                    f"{opt}: {len(mine)} width families ({tally}; median slope"
                    f" {np.median(slopes):+.2f} octaves per width doubling). Headline family below."
                )
        if res.usable["width"].nunique() >= 2 or fam.status == "ok":
            out.append(transfer_sentence(fam))
        pred = prediction_sentence(fam)
        if pred:
            out.append(pred)
    for f in an.depth_transfer:
        if len(f.sizes) > 1:
            out.append(transfer_sentence(f))
    if an.norm is not None:
        out.extend(norm_sentences(an.norm))
    no_law: dict[tuple[str, str, str], list[str]] = {}
    for law in an.scaling.lr_law:
        # A law through as many points as it has terms fits anything: not a finding.
        if law["status"] == "ok" and law.get("dof", 0) > 0:
            terms = law["terms"]
            parts = []
            if "a" in terms:
                parts.append(f"{terms['a']['value']:+.2f} {_fmt_ci(terms['a']['ci'])} log2 B")
            if "b" in terms:
                parts.append(f"{terms['b']['value']:+.2f} {_fmt_ci(terms['b']['ci'])} log2 D")
            if len(parts) and ("a" in terms or law["width"] == _widest(an, law["optimizer"])):
                out.append(
                    f"{law['label']} width {law['width']} depth {law['depth']}: log2 lr* = "
                    + " ".join(parts)
                    + f" {terms['c']['value']:+.2f}."
                )
        elif law["status"] == "exactly-determined" and (
            len(law["batch_sizes"]) > 1 or law["width"] == _widest(an, law["optimizer"])
        ):
            where = f"width {law['width']} depth {law['depth']}: no lr scaling law"
            no_law.setdefault((law["optimizer"], where, law["reason"]), []).append(law["label"])
    # Families that differ only in lr multipliers or hyperparameters would repeat one sentence:
    # said once, with their number.
    for (optimizer, where, reason), labels in no_law.items():
        if len(labels) == 1:
            out.append(f"{labels[0]} {where}: {reason}.")
        else:
            out.append(f"{optimizer} {where}: {reason} (the same for {len(labels)} families).")
    n_decayed = sum(law.get("n_decayed", 0) for law in an.scaling.lr_law)
    if n_decayed:
        out.append(
            f"Scaling laws: {n_decayed} (batch size, horizon) optima read mid-run after the lr"
            " schedule had begun to decay (warm-down, linear or cosine) were left out; only"
            " runs' own ends and readings before the decay enter the laws."
        )
    for law in an.scaling.batch_law:
        if law["status"] == "ok":
            t = law["terms"]
            out.append(
                f"{law['label']} width {law['width']} depth {law['depth']}: optimal batch"
                f" B*(D) = 2^{t['log2_k']['value']:.2f} D^{t['e']['value']:.2f}"
                f" (exponent CI {_fmt_ci(t['e']['ci'])})."
            )
        elif law["status"] == "exactly-determined":
            out.append(
                f"{law['label']} width {law['width']} depth {law['depth']}: no batch-size"
                f" law: {law['reason']}."
            )
    for rec in an.layer_lr:
        out.extend(layer_lr_sentences(rec))
    for rec in an.batch_sizes:
        out.extend(batch_size_sentences(rec))
    out.extend(coord_sentences(an.coord))
    return out


def _widest(an: Analysis, optimizer: str) -> int:
    u = an.results.usable
    return int(u[u["optimizer"] == optimizer]["width"].max())


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.bad td{color:#a33}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:.9em}ul.c li{margin:.3em 0}
"""


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _batch_loss(loss: float, status: str) -> str:
    if not np.isfinite(loss):
        return "diverged"
    return f"{loss:.4f}" + ("" if status == "ok" else " *")


def _table(
    headers: list[str], rows: list[list[str]], left: int = 1, bad: list[bool] | None = None
) -> str:
    head = "".join(
        f"<th class='l'>{html.escape(h)}</th>" if i < left else f"<th>{html.escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for k, r in enumerate(rows):
        cls = " class='bad'" if bad and bad[k] else ""
        cells = "".join(
            f"<td class='l'>{html.escape(c)}</td>" if i < left else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(r)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def optima_rows(an: Analysis) -> tuple[list[str], list[list[str]], list[bool]]:
    headers = [
        "cell",
        "lr grid (log2)",
        "seeds",
        "diverged",
        "log2 lr*",
        "95 % CI",
        "lr*",
        "loss*",
        "method",
        "status",
    ]
    rows, bad = [], []
    for _, r in an.optima.table.iterrows():
        rows.append(
            [
                str(r["label"]),
                f"{r['log2_lr_min']:g} .. {r['log2_lr_max']:g} ({r['n_lr']})",
                str(r["n_seeds"]),
                f"{r['n_diverged']}/{r['n_trials']}",
                _num(r["log2_lr_star"], "{:.2f}"),
                _fmt_ci([_f(r["ci_lo"]), _f(r["ci_hi"])], "{:.2f}")
                if r["noise"] == "seeds" or r["status"] != "ok"
                else "one seed: no interval",
                _num(r["lr_star"], "{:.3g}"),
                _num(r["loss_star"], "{:.4f}"),
                str(r["method"]),
                str(r["status"]).replace("_", " ")
                + (f" ({r['edge_side']})" if isinstance(r["edge_side"], str) else ""),
            ]
        )
        bad.append(r["status"] != "ok")
    return headers, rows, bad


def _f(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _short_reason(f: TransferFit) -> str:
    if len(f.sizes) == 1:
        return f"fit impossible: one {f.axis}"
    if all(s in ("all_diverged", "no_data") for s in f.size_status):
        return "fit impossible: all diverged"
    return "fit impossible: optimum on the grid edge / diverged"


def transfer_rows(
    fits: list[TransferFit], short: bool = False
) -> tuple[list[str], list[list[str]], list[bool]]:
    axis = fits[0].axis if fits else "width"
    headers = [
        "family",
        f"{axis}s (used)",
        "slope",
        "95 % CI",
        "drift (oct)",
        "penalty",
        "penalty 95 % CI",
        "wider better",
        "verdict",
    ]
    rows, bad = [], []
    for f in fits:
        sizes = ", ".join(f"{s}" + ("" if u else "*") for s, u in zip(f.sizes, f.used, strict=True))
        if f.status == "ok":
            verdict = f.verdict
        else:
            verdict = "inconclusive: " + (_short_reason(f) if short else (f.reason or "no fit"))
        pen_ci = "–"
        if f.penalty_rel_ci:
            lo, hi = f.penalty_rel_ci
            hi_txt = f"{100 * hi:.2f} %" if hi is not None and math.isfinite(hi) else "diverges"
            pen_ci = f"[{100 * lo:.2f} %, {hi_txt}]"
        rows.append(
            [
                f.label,
                sizes,
                _num(f.slope, "{:+.2f}"),
                _fmt_ci(f.slope_ci) if f.status == "ok" else "–",
                _num(f.drift, "{:+.2f}"),
                _num(None if f.penalty_rel is None else 100 * f.penalty_rel, "{:.2f} %")
                if f.penalty is not None
                else (f.penalty_note or "–"),
                pen_ci,
                "–" if f.wider_is_better is None else ("yes" if f.wider_is_better else "no"),
                verdict,
            ]
        )
        bad.append(f.status != "ok")
    return headers, rows, bad


def _header(an: Analysis) -> str:
    res = an.results
    u = res.usable if not res.usable.empty else res.trials
    c = res.status_counts()
    lr = u["log2_lr"]
    compared = [
        ("optimizers", ", ".join(sorted(u["optimizer"].unique()))),
        ("widths", ", ".join(map(str, sorted(u["width"].unique())))),
        ("depths", ", ".join(map(str, sorted(u["depth"].unique())))),
        ("batch sizes", ", ".join(map(str, sorted(u["batch_size"].unique())))),
        ("steps", ", ".join(map(str, sorted(u["steps"].unique())))),
        ("seeds", str(u["seed"].nunique())),
        ("lr grid (log2)", f"{lr.min():g} .. {lr.max():g}, {lr.nunique()} values"),
        ("figure of merit", METRIC_DESCRIPTIONS[res.metric]),
        ("sweeps", ", ".join(res.sweeps)),
    ]
    rows = [[k, v] for k, v in compared]
    shown = [s for s in STATUSES if s != "stopped" or c[s]]
    counts = [[s, str(c[s])] for s in ("total", *shown)]
    if c["no_metric"]:
        counts.append([f"completed without {res.metric}", str(c["no_metric"])])
    return (
        "<h2>What was compared</h2>"
        + _table(["", ""], rows, left=2)
        + "<h2>Trials</h2>"
        + _table(["status", "trials"], counts)
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in res.notes)
    )


def render_html(an: Analysis, images: dict[str, bytes | None], skipped: dict[str, str]) -> str:
    res = an.results
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Transfer report: {html.escape(', '.join(res.sweeps))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Hyperparameter-transfer report: {html.escape(', '.join(res.sweeps))}</h1>",
        f"<p class='note'>{html.escape(str(res.path))} · generated"
        f" {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · figure of merit: {res.metric}</p>",
        "<h2>Conclusions</h2><ul class='c'>",
        *(f"<li>{html.escape(s)}</li>" for s in conclusions(an)),
        "</ul>",
        _header(an),
    ]
    for name, png in images.items():
        if png is None:
            continue
        b64 = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(FIGURE_TITLES[name])}</h2>")
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{b64}'>")
    if skipped:
        parts.append("<h2>Figures not drawn</h2><ul>")
        parts += [
            f"<li>{html.escape(FIGURE_TITLES[k])}: needs {html.escape(v)}.</li>"
            for k, v in skipped.items()
        ]
        parts.append("</ul>")
    parts.append("<h2>Optimal learning rate per cell</h2>")
    parts.append(
        "<p class='note'>log2 lr*: an asymmetric fit (rounded V or exponential rise, steeper"
        f" on either side) to the finite points within {WINDOW:g} octaves of the argmin"
        " (3-point parabola or argmin where too few). 95 % CI: parametric bootstrap"
        f" ({an.n_bootstrap} draws) of the lr-by-seed noise measured from the seeds, widened"
        " by the fit's own error on this grid; none with one seed (no measured noise) and"
        " none for flagged optima. Red rows: optimum on the grid's edge, bounded by"
        " divergence, or none.</p>"
    )
    headers, rows, bad = optima_rows(an)
    parts.append(_table(headers, rows, bad=bad))
    for title, fits in (("across width", an.width_transfer), ("across depth", an.depth_transfer)):
        if not spans_sizes(fits):
            continue
        h, rows, bad = transfer_rows(fits)
        parts.append(f"<h2>Transfer {title}</h2>")
        parts.append(
            "<p class='note'>slope of log2 lr* against log2 size (octaves per doubling), 95 %"
            " CI from the cells' bootstrap draws (from the optima's scatter with one seed);"
            f" verdict: transfers when the CI lies within +-{an.tolerance:g}, drifts when it"
            " lies wholly outside it, else inconclusive;"
            " drift: lr* at the largest minus at the smallest size used; penalty: the largest"
            " size's loss at the smallest size's lr* above its best loss, relative. * = not used"
            " (optimum on the grid's edge, bounded by divergence, or none).</p>"
        )
        parts.append(_table(h, rows, bad=bad))
        preds = [p for p in (prediction_sentence(f) for f in fits) if p]
        if preds:
            parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in preds) + "</ul>")
    if an.norm is not None:
        parts.append("<h2>Optimal output norm (log2 rms→inf) per horizon</h2>")
        rows = [
            [
                f"{r['optimizer']} width={r['width']} depth={r['depth']}",
                f"{int(r['horizon']):,}",
                str(r["batch_size"]),
                _num(r["log2_norm_opt"], "{:.2f}"),
                _fmt_ci([_f(r["ci_lo"]), _f(r["ci_hi"])], "{:.2f}"),
                str(r["n_points"]),
                _num(r["norm_span"], "{:.2f}"),
                str(r["status"]),
            ]
            for _, r in an.norm.best.iterrows()
        ]
        parts.append(
            _table(
                [
                    "configuration",
                    "horizon (tokens)",
                    "best B",
                    "log2 norm*",
                    "95 % CI",
                    "points",
                    "norms spanned (octaves)",
                    "status",
                ],
                rows,
                bad=[r[-1] != "ok" for r in rows],
            )
        )
        if (an.norm.best["status"] == "norm_flat").any():
            parts.append(
                "<p>norm_flat: the lrs around the best loss moved the output norm by under"
                f" {MIN_NORM_SPAN:g} octave, so something other than the lr sets the norm there"
                " (a norm constraint, the initialisation, another optimizer's fixed lr) and the"
                " loss is no function of it: no optimal norm is located, and the fit enters no"
                " trend.</p>"
            )
    laws = [law for law in an.scaling.lr_law if law["status"] == "ok"]
    if laws:
        parts.append("<h2>Scaling of the optimal lr</h2>")
        rows = []
        for law in laws:
            t = law["terms"]
            rows.append(
                [
                    f"{law['label']} width={law['width']} depth={law['depth']}",
                    _num(t.get("a", {}).get("value"), "{:+.3f}")
                    + " "
                    + (_fmt_ci(t["a"]["ci"]) if "a" in t else ""),
                    _num(t.get("b", {}).get("value"), "{:+.3f}")
                    + " "
                    + (_fmt_ci(t["b"]["ci"]) if "b" in t else ""),
                    _num(t["c"]["value"], "{:+.2f}"),
                    str(law["n"]),
                ]
            )
        parts.append(_table(["configuration", "a (log2 B)", "b (log2 D)", "c", "points"], rows))
    blaws = [law for law in an.scaling.batch_law if law["status"] == "ok"]
    if blaws:
        parts.append("<h2>Optimal batch size B*(D) = k D^e</h2>")
        rows = [
            [
                f"{law['label']} width={law['width']} depth={law['depth']}",
                f"{law['terms']['e']['value']:.3f} {_fmt_ci(law['terms']['e']['ci'], '{:.3f}')}",
                f"{law['terms']['log2_k']['value']:.2f}",
                str(law["n"]),
            ]
            for law in blaws
        ]
        parts.append(_table(["configuration", "e", "log2 k", "horizons"], rows))
    if an.layer_lr:
        parts.append("<h2>Per-layer-group lr multipliers</h2>")
        parts.append(
            "<p class='note'>Each combination's best loss over the base lr, against the"
            " all-ones combination's (negative: better), with 95 % intervals that hold for all"
            " combinations at once (the cells' seed noise and the seeds' offsets); better / worse"
            " when the whole interval is below / above 0. Only ratios between groups matter once"
            " the base lr is swept.</p>"
        )
    for r in an.layer_lr:
        parts.append(
            f"<h3>{html.escape(r['optimizer'])} width={r['width']} depth={r['depth']}"
            f" B={r['batch_size']}</h3>"
        )
        parts.append("".join(f"<p>{html.escape(t)}</p>" for t in layer_lr_sentences(r)))
        rows = [
            [
                ratio(c),
                _num(c["log2_lr_star"], "{:.2f}")
                + ("" if c["lr_status"] == "ok" else f" ({c['lr_status']})"),
                _num(c["loss_star"], "{:.4f}"),
                _num(None if c["relative"] is None else 100 * c["relative"], "{:+.2f} %"),
                pct_ci(c["relative_ci"], prefix=""),
                c["verdict"],
            ]
            for c in r["combos"]
        ]
        parts.append(
            _table(["in:hid:out:vec", "log2 lr*", "loss*", "vs all 1", "95 % CI", "verdict"], rows)
        )
    if an.batch_sizes:
        parts.append("<h2>Best loss across batch sizes at a fixed token budget</h2>")
        parts.append(
            "<p class='note'>Each batch size's best loss over lr; the rise is the largest batch's"
            " against the smallest's, with a 95 % interval (the cells' seed noise and the"
            " seeds' offsets; see the sentences for the comparisons between families).</p>"
        )
    for rec in an.batch_sizes:
        sizes = sorted({b for f in rec["families"] for b in f["batch_sizes"]})
        parts.append(
            f"<h3>width={rec['width']} depth={rec['depth']}, {rec['tokens']:,} tokens</h3>"
        )
        parts.append("".join(f"<p>{html.escape(t)}</p>" for t in batch_size_sentences(rec)))
        rows = []
        for f in rec["families"]:
            at = {
                b: (loss, status)
                for b, loss, status in zip(
                    f["batch_sizes"], f["loss_star"], f["lr_status"], strict=True
                )
            }
            change = (
                "-"
                if f["rise"] is None
                else f"{100 * f['rise']:+.2f} % ({pct_ci(f['rise_ci'], prefix='')})"
            )
            rows.append(
                [f["label"]]
                + [_batch_loss(*at[b]) if b in at else "-" for b in sizes]
                + [change, rise_words(f["rise_verdict"])]
            )
        parts.append(
            _table(
                ["family", *[f"loss* B={b}" for b in sizes], "largest vs smallest B", "verdict"],
                rows,
            )
        )
        parts.append(
            "<p class='note'>* lr optimum on the lr grid's edge or bounded by divergence: the"
            " loss is an upper bound.</p>"
        )
    parts.append("<p class='note'>Every number above is in fits.json next to this file.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry points


def write_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    *,
    metric: str = "final_val",
    predict_width: int | None = None,
    horizons: list[int] | None = None,
    tolerance: float | None = None,
) -> Path | str:
    """Analyse the store at `results` and write report.html (self-contained), one PNG per
    figure and fits.json into `out_dir` (default `<results>/report`). Returns report.html: a
    Path, or a URI for a store on object storage (s3://...), where the report goes too.

    `horizons` are the token budgets at which norm transfer and the scaling laws read the
    runs (default: the planned budgets, plus 1/4 and 1/2 of the largest); `tolerance` is the
    verdicts' band in octaves per doubling (default: analysis/verdict.py's)."""
    an = analyze(
        results,
        metric=metric,
        predict_width=predict_width,
        horizons=horizons,
        tolerance=tolerance,
    )
    where = str(out_dir) if out_dir is not None else f"{str(results).rstrip('/')}/report"
    remote = "://" in where
    try:
        if remote:  # next to a store on object storage, through the same file systems as it
            fs, out = pafs.FileSystem.from_uri(where)
        else:
            fs, out = pafs.LocalFileSystem(), str(Path(where).expanduser().resolve())
    except (pa.ArrowException, RuntimeError) as err:  # unknown scheme, symlink loop
        raise OSError(f"{where}: {err}") from None
    fs.create_dir(out, recursive=True)

    def write(name: str, data: bytes) -> None:
        # Whole files or none: a full disk must not leave a figure or fits.json cut short
        # where an earlier report's whole one was.
        tmp = f"{out}/.{name}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(tmp) as stream:
                stream.write(data)
            fs.move(tmp, f"{out}/{name}")
        except OSError:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise

    images: dict[str, bytes | None] = {}
    files: dict[str, str | None] = {}
    skipped: dict[str, str] = {}
    for name, plot in PLOTS.items():
        fig = plot(an)
        if fig is None:
            images[name], files[name] = None, None
            skipped[name] = FIGURE_NEEDS[name]
            stale = f"{out}/{name}.png"
            if fs.get_file_info(stale).type == pafs.FileType.File:
                fs.delete_file(stale)  # a figure from an earlier report would now mislead
            continue
        png = figure_png(fig)
        write(f"{name}.png", png)
        images[name], files[name] = png, f"{name}.png"
    fits = build_fits(an, files)
    write("fits.json", (json.dumps(fits, indent=1, allow_nan=False) + "\n").encode())
    write("report.html", render_html(an, images, skipped).encode("utf-8"))
    return f"{where.rstrip('/')}/report.html" if remote else Path(out) / "report.html"


def print_summary(
    results: str | Path,
    *,
    metric: str = "final_val",
    predict_width: int | None = None,
    horizons: list[int] | None = None,
    tolerance: float | None = None,
    console: Console | None = None,
) -> None:
    """Print the optimum and transfer tables and the conclusions in the terminal."""
    an = analyze(
        results,
        metric=metric,
        predict_width=predict_width,
        horizons=horizons,
        tolerance=tolerance,
    )
    console = console or Console()
    c = an.results.status_counts()
    console.print(
        f"[bold]{', '.join(an.results.sweeps)}[/bold]: {_plural(c['total'], 'trial')},"
        f" {status_words(c)};"
        f" metric {an.results.metric}"
    )
    # The terminal gets the columns that decide things; the report has them all.
    headers, rows, bad = optima_rows(an)
    _print_table(
        console,
        "Optimal learning rate per cell",
        headers,
        rows,
        bad,
        keep=["cell", "seeds", "diverged", "log2 lr*", "95 % CI", "loss*", "status"],
    )
    for fits in (an.width_transfer, an.depth_transfer):
        if spans_sizes(fits):
            headers, rows, bad = transfer_rows(fits, short=True)
            _print_table(
                console,
                f"Transfer across {fits[0].axis}",
                headers,
                rows,
                bad,
                keep=[
                    headers[0],
                    headers[1],
                    "slope",
                    "95 % CI",
                    "drift (oct)",
                    "penalty",
                    "verdict",
                ],
            )
    for line in conclusions(an):
        console.print(f"• {line}", highlight=False, markup=False)


def _print_table(
    console: Console,
    title: str,
    headers: list[str],
    rows: list[list[str]],
    bad: list[bool],
    keep: list[str],
) -> None:
    idx = [headers.index(h) for h in keep]
    table = Table(title=title, title_justify="left")
    for j, i in enumerate(idx):
        last = j == len(idx) - 1
        table.add_column(
            headers[i],
            justify="left" if j == 0 or last else "right",
            overflow="fold",
            no_wrap=not last and j != 0,
        )
    for r, b in zip(rows, bad, strict=True):
        table.add_row(*(r[i] for i in idx), style="red" if b else None)
    console.print(table)
