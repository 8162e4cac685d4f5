"""Synthetic stores with a known answer, for tests and the benchmark.

Trials are built the way a real sweep builds them (`sweeper.spec.expand` on a grid) and stored
through `sweeper.store.Store.write_trial`, so the analysis reads exactly what a sweep writes.

The planted model, at every log row with t tokens seen:

    log2 lr*(t)  = centre + width_slope log2(w / ref_width) + depth_slope log2(d / ref_depth)
                   + batch_exponent log2(B / ref_batch) + tokens_exponent log2(t / ref_tokens)
    dx           = log2 lr - log2 lr*(t)
    log2 norm(t) = optimal_log2_norm + norm_width_slope log2(w / ref_width) + norm_lr_slope dx
                                                   (output layer rms->inf)
    loss(t)      = floor(w, t) + curvature dx^2 + batch_curvature (log2 B - log2 B*(t))^2
                   + multiplier_curvature (log2 lr_hidden - log2 best_lr_hidden)^2
                   + seed_offset[seed] + seed_cell_offset[seed, cell] + noise
    log2 B*(t)   = batch_law[0] + batch_law[1] log2 t      (only with batch_law; an optimizer
                                                   may have its own batch_curvature)

so the optimal lr moves with width by `width_slope` octaves per doubling, the loss-optimal norm
is `optimal_log2_norm` at every (B, t) and moves with width by `norm_width_slope` octaves per
doubling, and B*(D) = 2^batch_law[0] D^batch_law[1].
A trial with dx > diverge_octaves at its last step diverges part-way through.
`schedule` and `warmdown` only go into the trials' specs (the planted curves ignore them): they
let tests check which horizon readings the analysis trusts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sweeper.spec import TrialSpec, expand, parse_spec
from sweeper.store import Store, TrialResult


@dataclass(frozen=True)
class PlantedOptimizer:
    width_slope: float = 0.0  # d log2 lr* / d log2 width
    log2_lr_centre: float = -7.0  # log2 lr* at the reference width, depth, batch and tokens
    depth_slope: float = 0.0
    log2_lr: tuple[float, float, float] | None = None  # its own grid (default: the config's)
    batch_curvature: float | None = None  # its own (default: the config's)


def _default_optimizers() -> dict[str, PlantedOptimizer]:
    return {"scion": PlantedOptimizer(0.0), "adamw": PlantedOptimizer(-1.0)}


@dataclass(frozen=True)
class SyntheticConfig:
    name: str = "synthetic"
    optimizers: dict[str, PlantedOptimizer] = field(default_factory=_default_optimizers)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2,)
    batch_sizes: tuple[int, ...] = (32,)
    seeds: tuple[int, ...] = (0, 1, 2)
    log2_lr: tuple[float, float, float] = (-12.0, -2.0, 0.5)  # lo, hi, step
    steps: int | None = 200  # give steps or a token budget (then steps = tokens / (B T))
    tokens: int | None = None
    log_every: int = 10
    eval_every: int = 50
    seq_len: int = 64
    ref_width: int = 256
    ref_depth: int = 2
    ref_batch: int = 32
    ref_tokens: int = 409_600  # 200 steps x 32 x 64
    batch_exponent: float = 0.0
    tokens_exponent: float = 0.0
    curvature: float = 0.03  # nats per octave^2 away from the optimal lr
    seed_noise: float = 0.003  # nats, per-trial offset (the seed-to-seed spread)
    seed_offset: float = 0.0  # nats, one offset per seed shared by all its trials (its init, data)
    seed_cell_offset: float = 0.0  # nats, one per seed and cell, shared by the cell's lrs
    row_noise: float = 0.001  # nats, per log row
    diverge_octaves: float | None = 3.0
    optimal_log2_norm: float = 5.0
    norm_width_slope: float = 0.0  # d (loss-optimal log2 norm) / d log2 width
    norm_lr_slope: float = 1.0  # d log2 norm / d log2 lr: near 0 when the lr does not set it
    schedule: str = "constant"  # lr schedule of the specs: constant | linear | cosine
    warmdown: float = 0.0  # final fraction of steps with a linear warm-down, in the specs
    batch_law: tuple[float, float] | None = None  # (log2 k, e)
    batch_curvature: float = 0.02
    lr_hidden: tuple[float, ...] = (1.0,)
    best_lr_hidden: float = 1.0
    multiplier_curvature: float = 0.01
    coord_check: int = 0
    failed_every: int = 0  # every n-th trial fails (0: none)
    rng_seed: int = 0


def grid_spec(config: SyntheticConfig) -> dict:
    """The grid file (as a dict) whose expansion is the synthetic store's trials."""
    optimizers = {}
    for name, planted in config.optimizers.items():
        lo, hi, step = planted.log2_lr or config.log2_lr
        optimizers[name] = {"lr": {"log2": [lo, hi, step]}, "lr_hidden": list(config.lr_hidden)}
    train: dict = {
        "log_every": config.log_every,
        "eval_every": config.eval_every,
        "coord_check": config.coord_check,
    }
    # Only when set: a default grid file stays byte-for-byte what it was.
    if config.schedule != "constant":
        train["schedule"] = config.schedule
    if config.warmdown:
        train["warmdown"] = config.warmdown
    if config.tokens is not None:
        train["tokens"] = config.tokens
    else:
        train["steps"] = config.steps
    return {
        "name": config.name,
        "model": {"kind": "gpt", "depth": list(config.depths), "seq_len": config.seq_len},
        "train": train,
        "grid": {
            "width": list(config.widths),
            "batch_size": list(config.batch_sizes),
            "seed": list(config.seeds),
            "optimizer": optimizers,
        },
    }


def synthetic_trials(config: SyntheticConfig) -> list[TrialSpec]:
    return expand(parse_spec(grid_spec(config), "synthetic"), data_fingerprint="synthetic")


def planted_log2_lr(config: SyntheticConfig, spec: TrialSpec, tokens: np.ndarray) -> np.ndarray:
    """The planted log2 lr* of this trial's configuration after `tokens` tokens."""
    p = config.optimizers[spec.optimizer]
    return (
        p.log2_lr_centre
        + p.width_slope * math.log2(spec.width / config.ref_width)
        + p.depth_slope * math.log2(spec.depth / config.ref_depth)
        + config.batch_exponent * math.log2(spec.batch_size / config.ref_batch)
        + config.tokens_exponent * np.log2(np.asarray(tokens, float) / config.ref_tokens)
    )


def _trial_result(
    config: SyntheticConfig,
    spec: TrialSpec,
    rng: np.random.Generator,
    fail: bool,
    seed_offset: float = 0.0,
) -> TrialResult:
    if fail:
        return TrialResult("failed", {"error": "synthetic failure", "steps_done": 0})
    steps = np.arange(config.log_every, spec.steps + 1, config.log_every, dtype=np.int64)
    if len(steps) == 0 or steps[-1] != spec.steps:
        steps = np.append(steps, spec.steps)
    tokens = steps * spec.batch_size * spec.seq_len
    x = math.log2(spec.lr)
    dx = x - planted_log2_lr(config, spec, tokens)
    t_rel = tokens / config.ref_tokens
    loss = (
        1.6
        + 1.2 * (spec.width / 64) ** -0.5
        + 0.8 * t_rel**-0.3
        + config.curvature * dx**2
        + config.multiplier_curvature * math.log2(spec.lr_hidden / config.best_lr_hidden) ** 2
    )
    if config.batch_law is not None:
        log2_b_star = config.batch_law[0] + config.batch_law[1] * np.log2(tokens.astype(float))
        own = config.optimizers[spec.optimizer].batch_curvature
        curvature = config.batch_curvature if own is None else own
        loss = loss + curvature * (math.log2(spec.batch_size) - log2_b_star) ** 2
    offset = seed_offset + rng.normal(0.0, config.seed_noise)
    train_loss = loss + offset + rng.normal(0.0, config.row_noise, len(steps))
    log2_norm = (
        config.optimal_log2_norm
        + config.norm_width_slope * math.log2(spec.width / config.ref_width)
        + config.norm_lr_slope * dx
        + rng.normal(0.0, 0.01, len(steps))
    )

    status, error = "completed", None
    if config.diverge_octaves is not None and dx[-1] > config.diverge_octaves:
        # Diverges part-way: a few rows, the last one NaN (what a trainer records).
        keep = max(2, len(steps) // 3)
        steps, tokens, train_loss, log2_norm = (
            a[:keep] for a in (steps, tokens, train_loss, log2_norm)
        )
        train_loss = train_loss.copy()
        train_loss[-1] = np.nan
        status, error = "diverged", f"loss is nan at step {int(steps[-1])}"

    # Seconds per step grow with width and batch (and Adam-style optimizers are a bit cheaper).
    per_step = (
        2e-4
        * (spec.width / 64)
        * (spec.batch_size / 32)
        * (0.8 if "adam" in spec.optimizer else 1.0)
    )
    elapsed = steps * per_step
    val = np.where(steps % config.eval_every == 0, train_loss + 0.02, np.nan)
    norm = np.exp2(log2_norm)
    rows = [
        {
            "step": s,
            "tokens": t,
            "train_loss": tl,
            "val_loss": None if v != v else v,
            "lr": spec.lr,
            "elapsed_s": e,
            "tokens_per_s": spec.batch_size * spec.seq_len / per_step,
            "out_rms_to_inf": n,
            "hidden_rms_to_rms": n / 4,
            "in_l1_to_rms": 1.0,
        }
        for s, t, tl, v, e, n in zip(
            steps.tolist(),
            tokens.tolist(),
            train_loss.tolist(),
            val.tolist(),
            elapsed.tolist(),
            norm.tolist(),
            strict=True,
        )
    ]
    coord = []
    if spec.coord_check:
        # Width-consistent (flat) for optimizers whose lr transfers, growing with width otherwise.
        grows = abs(config.optimizers[spec.optimizer].width_slope) >= 0.5
        for step in range(1, spec.coord_check + 1):
            expo = 0.5 * step / spec.coord_check if grows else 0.0
            for li in range(spec.depth + 2):
                coord.append(
                    {
                        "step": step,
                        "layer_index": li,
                        "layer": "embed"
                        if li == 0
                        else ("head" if li == spec.depth + 1 else f"block{li - 1}"),
                        "mean_abs": (0.5 + 0.2 * li)
                        * (spec.width / 64) ** expo
                        * (1 + 0.05 * step),
                    }
                )
    finished = status == "completed"
    final_train = float(train_loss[-1]) if finished else None
    final_val = float(train_loss[-1] + 0.02 + rng.normal(0, config.row_noise)) if finished else None
    summary = {
        "n_params": 12 * spec.depth * spec.width**2 + 2 * spec.vocab_size * spec.width,
        "steps_done": int(steps[-1]),
        "tokens_seen": int(tokens[-1]),
        "initial_loss": math.log(spec.vocab_size),
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_val_loss": final_val,
        "out_rms_to_inf": float(norm[-1]),
        "hidden_rms_to_rms": float(norm[-1] / 4),
        "in_l1_to_rms": 1.0,
        "wall_time_s": float(elapsed[-1] + 1.0),
        "train_time_s": float(elapsed[-1]),
        "device": "cpu",
        "error": error,
    }
    return TrialResult(status, summary, rows, coord)


def write_synthetic_store(root: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Write the synthetic sweep `config.name` under `root`; returns the sweep's folder."""
    config = config or SyntheticConfig()
    store = Store(root, config.name)
    store.prepare()
    rng = np.random.default_rng(config.rng_seed)
    # Seed offsets from their own generator: planting them leaves every other draw as it was.
    offsets = np.random.default_rng([config.rng_seed, 1])
    shared: dict[int, float] = {}
    per_cell: dict[str, float] = {}
    for i, spec in enumerate(synthetic_trials(config)):
        fail = config.failed_every > 0 and i % config.failed_every == config.failed_every - 1
        if spec.seed not in shared:
            shared[spec.seed] = float(offsets.normal(0.0, config.seed_offset))
        cell_seed = spec.model_copy(update={"lr": 1.0}).trial_id
        if cell_seed not in per_cell:
            per_cell[cell_seed] = float(offsets.normal(0.0, config.seed_cell_offset))
        offset = shared[spec.seed] + per_cell[cell_seed]
        store.write_trial(spec, _trial_result(config, spec, rng, fail, offset))
    return Path(store.path)
