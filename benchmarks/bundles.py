"""Learning-rate bundles: trials per hour bundled vs unbundled, through the real CLI.

For each width (32, 64, 128, 256) the same two cells (AdamW and uScion, 2-layer GPTs, 8 lrs
each an octave apart from 2^-11, seed 0: the high ones may diverge, as in a real lr sweep) run
as a sweep four times, each in a fresh store: unbundled (`execution.bundle: 1`), `bundle: 8`
(one bundle per cell; on a CPU the sweep trains them one by one, as it does by default there),
`bundle: 8` batched whatever the device (`bundle_on_cpu: true`: what batching itself costs or
saves on a CPU) and `bundle: auto`. Trials per hour = 16 / the sweep's wall time (Ray start-up
included); a ratio is over the unbundled run's. Every sweep gets the same resources (one CPU
per trial or bundle, or a GPU fraction) and as many at a time as they allow. The batched
members' final validation losses are compared with their unbundled trials'.

    .venv/bin/python benchmarks/bundles.py [--device cpu|cuda] [--widths 32 64 ...] [--k 8]
        [--steps N] [--seeds N] [--gpu-share 0.125]

Writes benchmarks/results/bundles-<device>.json and .md, with the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from machine import machine

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).parent / "sweep"


MODES = {  # name -> execution settings
    "unbundled": {"bundle": 1},
    "bundle": {"bundle": 8},
    "batched": {"bundle": 8, "bundle_on_cpu": True},
    "auto": {"bundle": "auto"},
}


def grid(results: Path, width: int, mode: str, args: argparse.Namespace) -> dict:
    lrs = {"log2": [-11, -11 + args.k - 1, 1]}  # K lrs, an octave apart
    gpu = args.device == "cuda"
    return {
        "name": f"w{width}-{mode}",
        "results": str(results),
        "model": {"kind": "gpt", "depth": 2, "seq_len": 64, "head_dim": 32},
        "train": {
            "steps": args.steps,
            "log_every": 20,
            "eval_every": args.steps,
            "eval_batches": 2,
            "device": args.device,
        },
        "grid": {
            "width": [width],
            "batch_size": [16],
            "seed": list(range(args.seeds)),
            "optimizer": {"adamw": {"lr": lrs}, "uscion": {"lr": lrs}},
        },
        "resources": {"cpu": 1, "gpu": args.gpu_share if gpu else 0},
        "execution": {"retries": 0, **MODES[mode]},
    }


def run(work: Path, width: int, mode: str, args: argparse.Namespace) -> dict:
    config = grid(work, width, mode, args)
    path = work / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    out = subprocess.run([str(SWEEP), "run", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{path}: {out.stderr[-2000:]}")
    trials = pd.read_parquet(work / config["name"] / "trials")
    return {
        "width": width,
        "mode": mode,
        "trials": len(trials),
        "wall_s": round(wall, 2),
        "trials_per_hour": round(len(trials) / wall * 3600),
        "statuses": trials.status.value_counts().to_dict(),
        "final_val_loss": dict(zip(trials.trial_id, trials.final_val_loss, strict=True)),
    }


def largest_gap(a: dict, b: dict) -> float:
    """The largest relative difference between two runs' final losses, trial by trial."""
    gaps = [
        abs(b["final_val_loss"][t] - v) / abs(v)
        for t, v in a["final_val_loss"].items()
        if v == v and b["final_val_loss"].get(t) == b["final_val_loss"].get(t)  # not NaN
    ]
    return max(gaps, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--k", type=int, default=8, help="lrs per cell = members of a bundle")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per lr (a GPU needs more cells to fill)"
    )
    parser.add_argument("--gpu-share", type=float, default=0.125, help="GPU per trial (cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            runs = {mode: run(Path(tmp), width, mode, args) for mode in MODES}
            plain = runs["unbundled"]["trials_per_hour"]
            ratios = {f"{m}_ratio": round(r["trials_per_hour"] / plain, 2) for m, r in runs.items()}
            rows.append(
                {
                    "width": width,
                    **runs,
                    **ratios,
                    "largest_loss_gap": largest_gap(runs["unbundled"], runs["batched"]),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}))
    result = {"machine": machine(), "device": args.device, "k": args.k, "steps": args.steps,
              "seeds": args.seeds, "rows": rows}  # fmt: skip
    for r in rows:
        for mode in MODES:
            del r[mode]["final_val_loss"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bundles-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Learning-rate bundles vs single trials ({r['device']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']} "
        f"(load {m['loadavg_1_5_15']}).",
        f"Per width: AdamW and uScion, 2-layer GPTs, batch 16 x 64 tokens, {r['steps']} steps, "
        f"{r['k']} lrs an octave apart from 2^-11, {r.get('seeds', 1)} seed(s): "
        f"{2 * r['k'] * r.get('seeds', 1)} trials. Each run is a "
        "fresh `sweep run` through Ray, one CPU per trial or bundle, as many at a time as the "
        "machine allows; trials per hour include Ray's start-up. `bundle` is `execution.bundle: "
        f"{r['k']}` as the sweep runs it on this device (on a CPU: one by one); `batched` adds "
        "`bundle_on_cpu: true`, so that the members train as one model whatever the device.",
        "",
        "| width | unbundled (trials/h) | bundle | batched | auto "
        "| largest gap in final val loss, batched vs unbundled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        cells = [
            f"{row[mode]['trials_per_hour']:,} ({row[f'{mode}_ratio']}x)"
            for mode in ("bundle", "batched", "auto")
        ]
        lines.append(
            f"| {row['width']} | {row['unbundled']['trials_per_hour']:,} "
            f"({row['unbundled']['wall_s']} s) | "
            + " | ".join(cells)
            + f" | {row['largest_loss_gap']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
