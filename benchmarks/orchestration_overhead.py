"""How much of a sweep's wall time goes to anything but the trials themselves.

Runs the real `sweep run` on 16 CPU trials of about 20 s each (two at a time on a 2-core
machine), then compares the sweep's wall time with the time the trials report:

    overhead = 1 - (sum of the trials' time / concurrent slots) / wall time

once with their training-step time (train_time_s: everything else counts as overhead, the
trials' own evaluation and norm logging included) and once with their whole bodies
(wall_time_s: the overhead is then the orchestration's own: Ray start-up, worker start,
scheduling and shutdown). The target, at most 10% on 2 cores, is read on the second.

    .venv/bin/python benchmarks/orchestration_overhead.py [--executor ray|local] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).parent / "sweep"


def grid(results: Path, steps: int, slots: int) -> dict:
    return {
        "name": "overhead",
        "results": str(results),
        "model": {"kind": "gpt", "depth": 2, "seq_len": 64, "head_dim": 32},
        "train": {"steps": steps, "log_every": 20, "eval_every": steps, "eval_batches": 2},
        "grid": {
            "width": [128],
            "batch_size": [16],
            "seed": [0, 1],
            "optimizer": {"adamw": {"lr": {"log2": [-11, -4, 1]}}},  # 8 lrs x 2 seeds = 16
        },
        "resources": {"cpu": 1},
        "execution": {"max_concurrent": slots, "retries": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    parser.add_argument("--steps", type=int, default=500, help="steps per trial (~20 s at 500)")
    parser.add_argument("--slots", type=int, default=2, help="trials at a time (ray only)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    slots = args.slots if args.executor == "ray" else 1

    work = Path(tempfile.mkdtemp(prefix="sweeper-overhead-"))
    grid_file = work / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid(work / "results", args.steps, slots)))
    load_before = os.getloadavg()
    cmd = [str(SWEEP), "run", str(grid_file), "--executor", args.executor]
    if args.executor == "ray":
        cmd += ["--num-cpus", str(slots)]
    began = datetime.now(timezone.utc)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ended = datetime.now(timezone.utc)

    trials = pd.read_parquet(work / "results" / "overhead" / "trials")
    assert len(trials) == 16, f"expected 16 trials, stored {len(trials)}"
    train = trials.train_time_s.sum() / slots
    body = trials.wall_time_s.sum() / slots
    startup = (trials.started_at.min() - began).total_seconds()
    tail = (ended - trials.finished_at.max()).total_seconds()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "executor": args.executor,
        "slots": slots,
        "trials": len(trials),
        "steps_per_trial": args.steps,
        "mean_trial_train_s": round(trials.train_time_s.mean(), 2),
        "mean_trial_wall_s": round(trials.wall_time_s.mean(), 2),
        "sweep_wall_s": round(wall, 1),
        "overhead_outside_training_steps": round(1 - train / wall, 4),
        "overhead_outside_trial_bodies": round(1 - body / wall, 4),
        "startup_s": round(startup, 1),
        "tail_s": round(tail, 1),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_before": [round(x, 2) for x in load_before],
    }
    shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"orchestration_overhead-{args.executor}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    met = "met" if result["overhead_outside_trial_bodies"] <= 0.10 else "NOT met"
    stem.with_suffix(".md").write_text(
        f"# Orchestration overhead ({args.executor} executor)\n\n"
        f"`.venv/bin/python benchmarks/orchestration_overhead.py --executor {args.executor}`"
        f" on {result['date']}.\n\n"
        f"16 trials (GPT width 128, depth 2, batch 16 x 64 tokens, {args.steps} steps, "
        f"mean {result['mean_trial_train_s']} s of training each), {slots} at a time.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| sweep wall time | {result['sweep_wall_s']} s |\n"
        f"| training steps per slot | {train:.1f} s |\n"
        f"| trial bodies per slot (set-up, eval, writing included) | {body:.1f} s |\n"
        f"| outside training steps (includes each trial's evaluation and norm logging) | "
        f"{100 * result['overhead_outside_training_steps']:.1f}% |\n"
        f"| **outside trial bodies: Ray start-up, scheduling** | "
        f"**{100 * result['overhead_outside_trial_bodies']:.1f}%** (target at most 10%: {met}) |\n"
        f"| of which: command start to first trial | {result['startup_s']} s |\n"
        f"| of which: last trial stored to command exit | {result['tail_s']} s |\n\n"
        "The target is read on the orchestration's share: what the sweep spends outside the"
        " trials' own bodies (Ray start-up, worker start, scheduling between trials, shutdown)."
        " A trial body is `run_trial` plus writing its rows to the store (a few tens of ms); it"
        " includes the trial's own evaluation and norm logging, which a plain training loop"
        " would do too, so the first line overstates the orchestration's cost.\n\n"
        f"Machine: {result['machine']}. Load average before the run: "
        f"{', '.join(map(str, result['load_average_before']))} (the cores may be shared with"
        " other work).\n"
    )
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
