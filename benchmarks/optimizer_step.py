"""Time one optimizer step of every optimizer on a GPT-like proxy at several widths.

    .venv/bin/python benchmarks/optimizer_step.py --device cpu --widths 128 256 512 1024

The proxy has the parameter shapes of a depth-2 GPT (no forward pass is run: gradients are
fixed random tensors): token embedding (256, w); per block 4 attention matrices (w, w), MLP
(4w, w) and (w, 4w), two norm gains; a final gain; an untied head (256, w).
Optimizers are timed in interleaved rounds (one step of each per round), so background noise
on a shared machine spreads evenly over them; the median over rounds is reported.

Writes benchmarks/results/optimizer_step-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model
from torch import nn

from sweeper.optim import OPTIMIZER_NAMES, build_optimizer

VOCAB = 256
# A learning rate per optimizer in its usual range: it does not change the cost of a step,
# but keeps parameters finite (and out of denormals) over the timed steps.
LRS = {
    "adamw": 1e-3,
    "adamw-mup": 1e-3,
    "adamw-rescaled": 1e-2,
    "muon": 0.02,
    "scion": 2**-6,
    "uscion": 2**-6,
    "moga-row": 1e-2,
    "moga-col": 1e-2,
}
TARGETS = (
    ("moga-row", "adamw", 1.5),  # MOGA row-norm step at most 1.5x AdamW's
    ("scion", "muon", 1.1),  # Scion within 1.1x of Muon's
)


class GPTProxy(nn.Module):
    def __init__(self, width: int, depth: int = 2) -> None:
        super().__init__()
        self.width = width
        self.tok = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            for name in ("q", "k", "v", "o"):
                setattr(block, name, nn.Linear(width, width, bias=False))
            block.fc = nn.Linear(width, 4 * width, bias=False)  # weight (4w, w)
            block.proj = nn.Linear(4 * width, width, bias=False)  # weight (w, 4w)
            block.norm1 = nn.Parameter(torch.ones(width))
            block.norm2 = nn.Parameter(torch.ones(width))
            self.blocks.append(block)
        self.norm = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, VOCAB, bias=False)

    def param_roles(self) -> dict[str, str]:
        roles = {}
        for name, p in self.named_parameters():
            roles[name] = "vector" if p.ndim == 1 else "hidden"
        roles["tok.weight"] = "input"
        roles["head.weight"] = "output"
        return roles


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_width(
    width: int,
    names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    rounds: int,
) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = GPTProxy(width).to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype)
    # All optimizers step the same parameters: values drift, shapes (and so costs) do not.
    opts = {name: build_optimizer(name, model, LRS[name]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name, opt in opts.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            if r >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def machine(device: torch.device, threads: int) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_report(result: dict, out: Path) -> None:
    names = result["optimizers"]
    rows = result["widths"]
    m = result["machine"]
    lines = [
        f"# Optimizer step time ({result['device']}, {result['dtype']})",
        "",
        "One `opt.step()` on a depth-2 GPT-like proxy (embedding (256, w); per block 4 x (w, w) "
        "attention, (4w, w) and (w, 4w) MLP, 2 norm gains; final gain; head (256, w)). "
        f"Median of {result['rounds']} interleaved rounds after {result['warmup']} warm-up "
        "rounds; ms per step, and in brackets the ratio to AdamW's.",
        "",
        "| width | " + " | ".join(names) + " |",
        "| ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for row in rows:
        cells = []
        for name in names:
            ms, ratio = row["ms"][name], row["ratio_to_adamw"][name]
            cells.append(f"{ms:.2f} ({ratio:.2f}x)" if ratio is not None else f"{ms:.2f}")
        lines.append(f"| {row['width']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    lines += ["| width | " + " | ".join(t["label"] for t in result["targets"]) + " |"]
    lines += ["| ---: | " + " | ".join(":---" for _ in result["targets"]) + " |"]
    for i, row in enumerate(rows):
        cells = []
        for t in result["targets"]:
            r = t["ratios"][i]
            cells.append(f"{r:.2f} {'met' if r <= t['limit'] else '**missed**'}")
        lines.append(f"| {row['width']} | " + " | ".join(cells) + " |")
    lines += [""]
    for t in result["targets"]:
        verdict = "met at every width" if t["met"] else "**missed** at some width"
        lines.append(f"- {t['label']}: {verdict}.")
    lines += [
        "",
        "Muon, Scion and uScion cost the same Newton-Schulz iterations on the hidden matrices "
        "(O(w^3) matmuls, run in float32 on a CPU), which dominate their step; AdamW and MOGA "
        "are a few elementwise passes over the weights (O(w^2)). Ratios to AdamW therefore grow "
        "with width here; on a GPU, where NS5 runs in bfloat16, they should be far smaller (not "
        "measured here).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; torch threads: {m['torch_threads']}",
    ]
    if "gpu" in m:
        lines.append(f"- GPU: {m['gpu']}")
    lines += [
        f"- torch {m['torch']}, Python {m['python']}",
        f"- date: {m['date']}",
        f"- 1-min load average: {result['load_before']} before, {result['load_after']} after "
        f"(this benchmark itself counts about 1). {result['load_note']}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    if "adamw" not in args.optimizers:
        parser.error("--optimizers must include adamw (the baseline of every ratio)")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    load_before = loadavg()
    rows = []
    for width in args.widths:
        samples = bench_width(width, args.optimizers, device, dtype, args.warmup, args.rounds)
        ms = {name: statistics.median(s) for name, s in samples.items()}
        rows.append(
            {
                "width": width,
                "ms": ms,
                "ratio_to_adamw": {n: ms[n] / ms["adamw"] for n in args.optimizers},
                "samples_ms": samples,
            }
        )
        print(f"width {width}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()), flush=True)
    load_after = loadavg()

    targets = []
    for name, base, limit in TARGETS:
        if name in args.optimizers and base in args.optimizers:
            ratios = [row["ms"][name] / row["ms"][base] for row in rows]
            targets.append(
                {
                    "label": f"{name} / {base} <= {limit}",
                    "limit": limit,
                    "ratios": ratios,
                    "met": all(r <= limit for r in ratios),
                }
            )
    busy = max(load_before or 0.0, load_after or 0.0) > args.threads + 0.5
    load_note = (
        "Other processes were running on this shared machine during the run, so absolute "
        "times are noisy; the interleaved rounds keep the ratios comparable."
        if busy
        else "No other significant load was seen."
    )
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "optimizers": args.optimizers,
        "widths": rows,
        "targets": targets,
        "machine": machine(device, args.threads),
        "load_before": load_before,
        "load_after": load_after,
        "load_note": load_note,
        "command": "benchmarks/optimizer_step.py "
        + " ".join(
            [f"--device {args.device}", "--widths " + " ".join(map(str, args.widths))]
            + [f"--dtype {args.dtype}", f"--threads {args.threads}"]
            + [f"--warmup {args.warmup}", f"--rounds {args.rounds}"]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"optimizer_step-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, stem.with_suffix(".md"))
    for t in targets:
        print(f"{t['label']}: " + ("met" if t["met"] else "MISSED") + f" {t['ratios']}")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
