"""Benchmark: load + analyse + full report on a synthetic store of 10,000 trials x 200 log rows.

    .venv/bin/python benchmarks/analysis_report.py [--root /tmp/sweeper-bench] [--repeat 1]

Building the store is untimed (and reused when the folder already holds every trial). Writes
benchmarks/results/analysis_report.md and .json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import machine
from synthetic_store import ensure_store

from analysis.load import _STEPS_READ, _TRIAL_READ, load_results
from analysis.pipeline import analyze
from analysis.plots import PLOTS, figure_png
from analysis.report import build_fits, render_html, write_report
from analysis.synthetic import (
    PlantedOptimizer,
    SyntheticConfig,
)
from sweeper.store import Store

TARGET_S = 30.0

# 4 optimizers x 5 widths x 2 depths x 5 batch sizes x 2 seeds x 25 lrs = 10,000 trials;
# 2000 steps logged every 10 = 200 rows each.
CONFIG = SyntheticConfig(
    name="bench10k",
    optimizers={
        "scion": PlantedOptimizer(0.0, -7.0),
        "muon": PlantedOptimizer(0.0, -8.0),
        "adamw": PlantedOptimizer(-1.0, -6.0),
        "adamw-mup": PlantedOptimizer(0.0, -9.0),
    },
    widths=(64, 128, 256, 512, 1024),
    depths=(2, 4),
    batch_sizes=(8, 16, 32, 64, 128),
    seeds=(0, 1),
    log2_lr=(-14.0, -2.0, 0.5),
    steps=2000,
    log_every=10,
    eval_every=100,
    batch_exponent=0.5,
    diverge_octaves=3.0,
)


def raw_reads(path: Path) -> dict:
    """`Store.read` alone, with the columns the analysis asks for: the store layout's share."""
    store = Store(path.parent, path.name)
    out = {}
    for table, columns in (("trials", _TRIAL_READ), ("steps", _STEPS_READ)):
        t = time.perf_counter()
        store.read(table, list(columns))
        out[f"store_read_{table}_s"] = time.perf_counter() - t
    return out


def timed_breakdown(path: Path, out: Path) -> dict:
    """The stages of write_report, timed one by one."""
    t0 = time.perf_counter()
    results = load_results(path)
    t1 = time.perf_counter()
    an = analyze(results)
    t2 = time.perf_counter()
    images = {}
    for name, plot in PLOTS.items():
        fig = plot(an)
        images[name] = None if fig is None else figure_png(fig)
    t3 = time.perf_counter()
    fits = build_fits(an)
    json.dumps(fits, allow_nan=False)
    render_html(an, images, {})
    t4 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "analysis_s": t2 - t1,
        "analysis_parts_s": {k: v for k, v in an.timings.items() if k != "load_s"},
        "figures_s": t3 - t2,
        "fits_and_html_s": t4 - t3,
        "trials": len(results.trials),
        "steps_rows": len(results.steps),
        "cells": len(an.optima.table),
        "figures_drawn": [k for k, v in images.items() if v is not None],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/sweeper-bench")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the existing .json"
    )
    args = ap.parse_args()
    results_dir = Path(__file__).resolve().parent / "results"
    if args.markdown_only:
        record = json.loads((results_dir / "analysis_report.json").read_text())
        (results_dir / "analysis_report.md").write_text(markdown(record))
        return
    root = Path(args.root)
    path, build_s, reused = ensure_store(root, CONFIG)
    out = root / "report"

    totals = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        write_report(path, out)
        totals.append(time.perf_counter() - t)
    breakdown = timed_breakdown(path, out)
    breakdown.update(raw_reads(path))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        write_report(path, out)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
        print(s.getvalue())

    best = min(totals)
    record = {
        "benchmark": "analysis_report",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "store": {
            "path": str(path),
            "trials": breakdown["trials"],
            "steps_rows": breakdown["steps_rows"],
            "cells": breakdown["cells"],
            "parquet_files": sum(1 for _ in path.rglob("*.parquet")),
            "build_s": build_s,
            "reused": reused,
        },
        "write_report_s": totals,
        "write_report_best_s": best,
        "target_s": TARGET_S,
        "passes": best < TARGET_S,
        "breakdown": breakdown,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "analysis_report.json").write_text(json.dumps(record, indent=1) + "\n")
    (results_dir / "analysis_report.md").write_text(markdown(record))
    print(json.dumps(record, indent=1))


def markdown(r: dict) -> str:
    b = r["breakdown"]
    m = r["machine"]
    parts = "\n".join(
        f"| - {k.removesuffix('_s')} | {v:.2f} |" for k, v in b["analysis_parts_s"].items()
    )
    build = r["store"]["build_s"]
    built = f"built in {build:.0f} s, untimed" if build else "build untimed"
    if r["store"]["reused"]:
        built += "; reused from an earlier run"
    reads = b["store_read_trials_s"] + b["store_read_steps_s"]
    best = r["write_report_best_s"]
    runs = ", ".join(f"{v:.1f}" for v in r["write_report_s"])
    return f"""# Benchmark: analysis report on 10,000 trials

`{" ".join([".venv/bin/python", "benchmarks/analysis_report.py"])}` on {r["date"]}.

**`write_report` (load + analysis + figures + fits.json + report.html): {best:.1f} s**
(target < {r["target_s"]:.0f} s: {"met" if r["passes"] else "NOT met"}; runs: {runs} s).

Store: {r["store"]["trials"]:,} trials, {r["store"]["steps_rows"]:,} steps rows,
{r["store"]["parquet_files"]:,} Parquet files, {r["store"]["cells"]} cells
(4 optimizers x 5 widths x 2 depths x 5 batch sizes x 25 lrs x 2 seeds); {built}.

| stage (separate run) | seconds |
| --- | --- |
| load (pyarrow -> pandas, figure of merit) | {b["load_s"]:.2f} |
| - of which `Store.read` of trials (7 columns of 10,000 files) | {b["store_read_trials_s"]:.2f} |
| - of which `Store.read` of steps (6 columns of 10,000 files) | {b["store_read_steps_s"]:.2f} |
| analysis (optima, bootstrap, transfer, horizons, norm, scaling) | {b["analysis_s"]:.2f} |
{parts}
| figures ({len(b["figures_drawn"])} drawn) | {b["figures_s"]:.2f} |
| fits.json + report.html | {b["fits_and_html_s"]:.2f} |

Where the time goes: `Store.read` alone (timed in its own run) took {reads:.1f} s against
{b["load_s"]:.1f} s for the whole load, so reading the files is nearly all of it. The store
keeps one Parquet file per trial per table (20,000 files here), and pyarrow pays ~0.3-0.6 ms
per file whatever the read path (dataset scan with or without a schema, `ParquetFile`, a thread
pool of `read_table`: all measured within 20 % of each other) and almost whatever the columns:
the trials files carry a 16.7 KB footer each (52 column chunks and the Arrow schema with every
field's doc), and reading 1 column of them costs about what 7 do. Reading the config from the
one `spec` JSON column instead of ~30 typed columns cut the trials read by about a quarter
(~9.4 s to ~7 s under similar load); the rest is the layout's floor, which only fewer, larger
files (e.g. compacting each table into one file after a sweep) would lower.

Machine: {m["cpu"]}, {m["cores"]} cores, Python {m["python"]}, {m["platform"]}.
Load average at the end (1/5/15 min): {", ".join(map(str, m["loadavg_1_5_15"]))}: the 2 cores are
shared with other agents working in the same checkout, so timings carry their noise.
"""


if __name__ == "__main__":
    main()
