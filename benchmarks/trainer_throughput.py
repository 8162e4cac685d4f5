"""Trainer throughput of the GPT proxy by width, and the cost of operator-norm logging.

    .venv/bin/python benchmarks/trainer_throughput.py --device cpu --widths 64 128 256 512 1024

For each width: a GPT proxy (depth 2, seq 128, batch 16, byte-level stdlib corpus, AdamW in
the trainer's own step: forward, backward, optimizer step) is warmed up, then timed over a few
steps -> ms/step and tokens/s. Then the norm logging of one logged step is timed as the trainer
does it (snapshot of the weights before the step, per-role norms of weights and update after
it), with the hidden layers' sigma_max from the trainer's Krylov estimate and, for comparison,
from an exact SVD. Overhead at log_every = L is (norm time) / (L * step time).

Writes benchmarks/results/trainer_throughput-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine import cpu_model

from sweeper.data import load_data, train_batches
from sweeper.models import build_model
from sweeper.optim import build_optimizer
from sweeper.spec import DataConfig, TrialSpec
from sweeper.train import NormLogger

RESULTS = Path(__file__).parent / "results"


def make_spec(width: int, args: argparse.Namespace, data_cfg: DataConfig, fp: str) -> TrialSpec:
    return TrialSpec(
        sweep="bench",
        model="gpt",
        width=width,
        depth=args.depth,
        seq_len=args.seq_len,
        head_dim=64,
        zero_init_out=False,
        attn_scale="sqrt",
        mlp_context=8,
        data=data_cfg,
        data_fingerprint=fp,
        vocab_size=256,
        batch_size=args.batch_size,
        steps=1000,
        schedule="constant",
        warmup=0.0,
        warmdown=0.0,
        grad_clip=0.0,
        log_every=args.log_every,
        eval_every=1000,
        eval_batches=1,
        coord_check=0,
        seed=0,
        optimizer=args.optimizer,
        lr=2**-8,
        device=args.device,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_width(width: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    data_cfg = DataConfig(corpus="stdlib")
    data = load_data(data_cfg)
    spec = make_spec(width, args, data_cfg, data.fingerprint)
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    opt = build_optimizer(spec.optimizer, model, spec.lr)
    if callable(getattr(opt, "init", None)):
        opt.init()
    batches = train_batches(data, spec.batch_size, spec.seq_len, seed=0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step() -> torch.Tensor:
        x, y = (t.to(device) for t in next(batches))
        with autocast:
            loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    # Time whole steps until both a minimum count and a minimum duration are reached.
    times = []
    while len(times) < args.steps or (sum(times) < args.min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    def norm_event(logger: NormLogger) -> float:
        """Seconds of the logging work of one logged step (the step itself not counted)."""
        t0 = time.perf_counter()
        before = logger.snapshot()
        sync(device)
        t_snap = time.perf_counter() - t0
        step()
        sync(device)
        t1 = time.perf_counter()
        logger.norms(before)
        sync(device)
        return t_snap + time.perf_counter() - t1

    fast, exact = NormLogger(model), NormLogger(model, exact=True)
    norm_s = statistics.median(norm_event(fast) for _ in range(args.norm_repeats))
    exact_s = statistics.median(norm_event(exact) for _ in range(args.norm_repeats))
    # How far the estimate is from the SVD on these (trained a few steps) weights.
    est, ref = fast.norms()[0]["hidden_rms_to_rms"], exact.norms()[0]["hidden_rms_to_rms"]

    tokens = spec.batch_size * spec.seq_len
    L = args.log_every
    return {
        "width": width,
        "n_params": sum(p.numel() for p in model.parameters()),
        "step_ms": step_s * 1e3,
        "step_ms_with_norms": (step_s + norm_s / L) * 1e3,
        "tokens_per_s": tokens / step_s,
        "timed_steps": len(times),
        "norm_ms": norm_s * 1e3,
        "norm_svd_ms": exact_s * 1e3,
        "overhead_pct": 100 * norm_s / (L * step_s),
        "overhead_svd_pct": 100 * exact_s / (L * step_s),
        "hidden_rms_to_rms_rel_err": abs(est - ref) / ref,
    }


def machine(args: argparse.Namespace) -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(results: list[dict], info: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"trainer_throughput-{args.device}"
    config = {k: getattr(args, k) for k in ("depth", "seq_len", "batch_size", "log_every")}
    config["optimizer"] = args.optimizer
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "config": config, "results": results}, indent=2) + "\n"
    )
    lines = [
        f"# Trainer throughput ({args.device})",
        "",
        f"GPT proxy, depth {args.depth}, seq {args.seq_len}, batch {args.batch_size}, "
        f"{args.optimizer}, byte-level stdlib corpus. Median of timed steps after "
        f"{args.warmup} warm-up steps. Norm logging at log_every = {args.log_every}: snapshot "
        "before the step + per-role norms of weights and update after it, hidden sigma_max "
        "by the trainer's block-Krylov estimate or an exact SVD. The logging work is timed "
        "directly (median of a few logged steps) rather than as the difference of two "
        "end-to-end runs, which on a shared CPU is noisier than the few-percent effect; "
        "ms/step with norms = ms/step + norm ms / log_every.",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} with "
        f"{info['torch_threads']} thread(s), Python {info['python']}, {info['platform']}",
        f"- load average at start: {info['load_avg_1min_at_start']}"
        + (f" ({args.note})" if args.note else ""),
        "",
        f"| width | params | tokens/s | ms/step, no norms | ms/step, norms every {args.log_every} "
        "| norm ms per log | overhead | SVD norm ms per log | SVD overhead | Krylov rel. err |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['width']} | {r['n_params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} "
            f"| {r['step_ms']:.1f} | {r['step_ms_with_norms']:.1f} "
            f"| {r['norm_ms']:.1f} | {r['overhead_pct']:.1f}% "
            f"| {r['norm_svd_ms']:.1f} | {r['overhead_svd_pct']:.1f}% "
            f"| {r['hidden_rms_to_rms_rel_err']:.1e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="at least this many timed steps")
    p.add_argument("--min-seconds", type=float, default=3.0, help="and at least this long")
    p.add_argument("--norm-repeats", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--note", default="", help="free text for the report (e.g. other load)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine(args)
    results = []
    for width in args.widths:
        r = bench_width(width, args)
        print(
            f"width {width}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
            f"norms {r['norm_ms']:.1f} ms ({r['overhead_pct']:.1f}%), "
            f"svd {r['norm_svd_ms']:.1f} ms ({r['overhead_svd_pct']:.1f}%)",
            flush=True,
        )
        results.append(r)
    write(results, info, args)


if __name__ == "__main__":
    main()
