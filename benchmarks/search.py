"""Benchmark: adaptive search vs the dense grid on the quickstart's cells (3 seeds).

Runs `experiments/quickstart.yaml` with `search: {method: optuna, trials_per_cell: N}` through
the real CLI (a fresh store each) and compares each cell's lr* with the dense grid's, the
committed reference store (tests/data/quickstart) analysed by the same code. Records trials
used, wall time and each cell's distance, with the machine, in benchmarks/results/search.md.

    .venv/bin/python benchmarks/search.py [--per-cell 3 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).parent / "sweep"
DENSE = ROOT / "tests" / "data" / "quickstart"
TARGET_OCTAVES, TARGET_FRACTION = 0.25, 0.40


def optima(store: Path) -> dict[str, dict]:
    from analysis import analyze

    an = analyze(store)
    table = an.optima.table
    return {
        row.label: {"lr_star": float(row.log2_lr_star), "status": row.status}
        for row in table.itertuples()
    }


def run_search(per_cell: int, work: Path) -> dict:
    grid = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    grid.update(results=str(work / "results"), name=f"search{per_cell}")
    grid["search"] = {"method": "optuna", "trials_per_cell": per_cell, "batch": 2}
    path = work / f"search{per_cell}.yaml"
    path.write_text(yaml.safe_dump(grid))
    t0 = time.perf_counter()
    out = subprocess.run([str(SWEEP), "run", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr)
    store = work / "results" / grid["name"]
    n = len(list((store / "trials").glob("*.parquet")))
    return {"per_cell": per_cell, "trials": n, "wall_s": round(wall, 1), "optima": optima(store)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-cell", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()
    dense = optima(DENSE)
    dense_trials = len(list((DENSE / "trials").glob("*.parquet")))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.per_cell:
            runs.append(run_search(n, Path(tmp)))
    result = {
        "machine": machine(),
        "dense": {"trials": dense_trials, "optima": dense},
        "runs": runs,
    }
    out = ROOT / "benchmarks" / "results"
    (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "search.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    dense = r["dense"]
    lines = [
        "# Adaptive search vs the dense grid (quickstart cells, 3 seeds)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']} "
        f"(load {m['loadavg_1_5_15']}).",
        f"Dense grid: {dense['trials']} trials (the committed reference store, 4 min 12 s).",
        f"Target (issue 11): every cell within {TARGET_OCTAVES} octave of the dense lr*, with at "
        f"most {TARGET_FRACTION:.0%} of its trials.",
        "",
        "| search | trials | share | wall | cells within 0.25 oct | worst distance (oct) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in r["runs"]:
        dist = {
            label: abs(o["lr_star"] - dense["optima"][label]["lr_star"])
            for label, o in run["optima"].items()
            if label in dense["optima"]
        }
        within = sum(d <= TARGET_OCTAVES for d in dist.values())
        lines.append(
            f"| optuna, {run['per_cell']} lrs per cell | {run['trials']} | "
            f"{run['trials'] / dense['trials']:.0%} | {run['wall_s']} s | "
            f"{within} of {len(dist)} | {max(dist.values()):.2f} |"
        )
    lines += ["", "Per cell, log2 lr* (dense / each search):", ""]
    header = "| cell | dense | " + " | ".join(f"{run['per_cell']} per cell" for run in r["runs"])
    lines += [header + " |", "| --- | --- |" + " --- |" * len(r["runs"])]
    for label, d in dense["optima"].items():
        cells = [run["optima"].get(label, {}) for run in r["runs"]]
        lines.append(
            f"| {label} | {d['lr_star']:.2f} | "
            + " | ".join(f"{c.get('lr_star', float('nan')):.2f} ({c.get('status')})" for c in cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
