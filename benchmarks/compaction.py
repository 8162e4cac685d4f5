"""Benchmark: a synthetic store of 2,000 trials x 200 log rows before and after `sweep compact`.

    .venv/bin/python benchmarks/compaction.py [--root /tmp/sweeper-bench] [--repeat 2]

Measures, on the store as a sweep leaves it (one file per trial and table) and on a compacted
copy: files and bytes per table, `sweep report` (the command, start-up included, and
`write_report` in-process), the load alone, `Store.read` of the columns the analysis reads,
`finished_ids` (what `sweep run` computes to resume), and `Store.prepare` (what it does before
starting trials); then the compaction itself, and that both stores give the same fits.json.
Building the store is untimed (and reused when the folder already holds every trial). Writes
benchmarks/results/compaction.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import machine
from synthetic_store import ensure_store

from analysis.load import _STEPS_READ, _TRIAL_READ, load_results
from analysis.report import write_report
from analysis.synthetic import (
    PlantedOptimizer,
    SyntheticConfig,
    synthetic_trials,
)
from sweeper.compact import compact
from sweeper.store import TABLES, Store

# 4 optimizers x 5 widths x 2 batch sizes x 25 lrs x 2 seeds = 2,000 trials; 2000 steps logged
# every 10 = 200 rows each (the 10k benchmark's trials, a fifth as many).
CONFIG = SyntheticConfig(
    name="bench2k",
    optimizers={
        "scion": PlantedOptimizer(0.0, -7.0),
        "muon": PlantedOptimizer(0.0, -8.0),
        "adamw": PlantedOptimizer(-1.0, -6.0),
        "adamw-mup": PlantedOptimizer(0.0, -9.0),
    },
    widths=(64, 128, 256, 512, 1024),
    batch_sizes=(16, 64),
    seeds=(0, 1),
    log2_lr=(-14.0, -2.0, 0.5),
    steps=2000,
    log_every=10,
    eval_every=100,
    batch_exponent=0.5,
    diverge_octaves=3.0,
    failed_every=97,  # a few failed trials, which keep their own files
)
SWEEP = Path(sys.executable).parent / "sweep"


def layout(path: Path) -> dict:
    out = {}
    for table in TABLES:
        files = [p for p in (path / table).glob("*.parquet")]
        out[table] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    out["total"] = {k: sum(out[t][k] for t in TABLES) for k in ("files", "bytes")}
    return out


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(path: Path, repeat: int, out: Path) -> dict:
    store = Store(path.parent, path.name)
    cli = [str(SWEEP), "report", str(path), "--out", str(out / "cli")]

    def run_cli() -> None:
        subprocess.run(cli, check=True, capture_output=True)

    def prepare() -> None:
        with store.lock():
            store.prepare()

    return {
        "layout": layout(path),
        "sweep_report_s": best_of(repeat, run_cli),
        "write_report_s": best_of(repeat, lambda: write_report(path, out / "api")),
        "load_s": best_of(repeat, lambda: load_results(path)),
        "store_read_trials_s": best_of(repeat, lambda: store.read("trials", list(_TRIAL_READ))),
        "store_read_steps_s": best_of(repeat, lambda: store.read("steps", list(_STEPS_READ))),
        "finished_ids_s": best_of(repeat, store.finished_ids),
        "prepare_s": best_of(repeat, prepare),
    }


def same_fits(a: Path, b: Path) -> bool:
    def fits(folder: Path) -> dict:
        data = json.loads((folder / "api" / "fits.json").read_text())
        for key in ("generated_at", "timings_s", "results"):
            data["meta"].pop(key)
        return data

    return fits(a) == fits(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/sweeper-bench")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the existing .json"
    )
    args = ap.parse_args()
    results_dir = Path(__file__).resolve().parent / "results"
    if args.markdown_only:
        record = json.loads((results_dir / "compaction.json").read_text())
        (results_dir / "compaction.md").write_text(markdown(record))
        return

    root = Path(args.root)
    source, build_s, reused = ensure_store(root / "per-trial", CONFIG)
    # A store as an older version left it is upgraded by the first `prepare`: done here, untimed,
    # so that both columns time the steady state.
    with Store(source.parent, source.name).lock():
        Store(source.parent, source.name).prepare()
    compacted = root / "compacted" / CONFIG.name
    if compacted.exists():
        shutil.rmtree(compacted)
    shutil.copytree(source, compacted)

    before = measure(source, args.repeat, root / "report-before")
    t = time.perf_counter()
    result = compact(compacted)
    compact_s = time.perf_counter() - t
    after = measure(compacted, args.repeat, root / "report-after")

    record = {
        "benchmark": "compaction",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "store": {
            "trials": len(synthetic_trials(CONFIG)),
            "steps_rows_per_trial": CONFIG.steps // CONFIG.log_every,
            "build_s": build_s,
            "reused": reused,
        },
        "repeat": args.repeat,
        "before": before,
        "compact_s": compact_s,
        "compaction": {
            "trials_merged": result.trials_merged,
            "parts_written": result.parts_written,
            "trials_left": result.trials_left,
        },
        "after": after,
        "same_fits_json": same_fits(root / "report-before", root / "report-after"),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "compaction.json").write_text(json.dumps(record, indent=1) + "\n")
    (results_dir / "compaction.md").write_text(markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    b, a, m = r["before"], r["after"], r["machine"]
    mb = 2**20

    def row(label: str, key: str) -> str:
        x, y = b[key], a[key]
        return f"| {label} | {x:.2f} | {y:.2f} | {x / y:.1f}x |"

    tables = "\n".join(
        f"| `{t}/` | {b['layout'][t]['files']:,} files, {b['layout'][t]['bytes'] / mb:.1f} MB "
        f"| {a['layout'][t]['files']:,} files, {a['layout'][t]['bytes'] / mb:.1f} MB |"
        for t in (*TABLES, "total")
    ).replace("`total/`", "total")
    c = r["compaction"]
    parts = f"{c['parts_written']} part{'s' if c['parts_written'] != 1 else ''} per table"
    return f"""# Benchmark: compaction of a 2,000-trial store

`.venv/bin/python benchmarks/compaction.py` on {r["date"]}; each time is the best of
{r["repeat"]} runs.

Store: {r["store"]["trials"]:,} synthetic trials x {r["store"]["steps_rows_per_trial"]} steps \
rows (4 optimizers x 5 widths x 2 batch sizes x 25 lrs x 2 seeds; a few failed).
`sweep compact` took **{r["compact_s"]:.1f} s**: {c["trials_merged"]:,} finished trials merged \
into {parts}, {c["trials_left"]} failed trials left in their own files.

| table | one file per trial | compacted |
| --- | --- | --- |
{tables}

| seconds | one file per trial | compacted | speed-up |
| --- | --- | --- | --- |
{row("`sweep report` (the command, start-up included)", "sweep_report_s")}
{row("`write_report` in-process", "write_report_s")}
{row("- of which the load (`load_results`)", "load_s")}
{row("`Store.read` of trials (7 columns)", "store_read_trials_s")}
{row("`Store.read` of steps (6 columns)", "store_read_steps_s")}
{row("`finished_ids` (what `sweep run` resumes from)", "finished_ids_s")}
{row("`Store.prepare` (before a sweep starts trials)", "prepare_s")}

fits.json is the same from both stores: {"yes" if r["same_fits_json"] else "NO"}.

Where the time goes: every read pays per file (a footer of ~17 KB per trials file, whatever
the columns), so the load falls with the file count; the analysis and the figures after it do
not depend on the layout, and are what remains of `sweep report`. `Store.prepare` reads each
file's footer to find files of older versions to upgrade, which compaction also makes cheap.

Machine: {m["cpu"]}, {m["cores"]} cores, Python {m["python"]}, {m["platform"]}.
Load average at the end (1/5/15 min): {", ".join(map(str, m["loadavg_1_5_15"]))}; the cores
are shared with other work, so timings carry its noise.
"""


if __name__ == "__main__":
    main()
