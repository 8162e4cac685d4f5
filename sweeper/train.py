"""One trial: a TrialSpec in, a TrialResult (summary, step rows, coord rows) out. No Ray here.

    result = run_trial(spec, sink=print)   # sink(row) is called for every row as it is logged

What a trial logs (the STEPS table of store.py): a row at step 0 (the initial weights: train loss
of the first batch before any update, validation loss, operator norms at init), a row every
`log_every` steps, and a row at the last step. Each row carries the per-role operator norms of
the weights after the update and of that step's update (W_after - W_before). The validation
loss is computed at step 0, at the first row at or after each multiple of `eval_every`, and at
the end, on a fixed held-out set: `eval_batches` batches of EVAL_BATCH_SIZE sequences, the same
for every trial of a sweep whatever its batch size, so that losses compare across batch sizes.

Early stopping: `should_stop()`, asked after each logged row but the last, ends the trial with
status `stopped` and the rows logged so far when it says yes (the controller's ASHA).

Divergence (a non-finite loss, or a loss above DIVERGENCE_FACTOR * max(initial loss, ln vocab)
after warm-up) ends the trial with status `diverged`. Its rows so far are kept, plus a last
row at the step where the loss went bad: its train_loss is the mean since the previous row when
finite and None otherwise; its val_loss, throughput and norms are None.

A row's `lr` is the scheduled base lr (spec.lr times the schedule's factor) of the update that
led to it; the step-0 row has the lr of the first update. With `coord_check = n`, mean
|activation| per coord layer is recorded on the first validation batch at steps 0, 1, ..., n
(the initial weights, then after each of the first n updates).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sweeper.data import Batch, Data, DataError, load_data, train_batches, val_batches
from sweeper.models import build_bundle, build_model
from sweeper.optim import build_optimizer, l1_to_rms, param_roles, rms_to_inf, rms_to_rms
from sweeper.spec import TrialSpec
from sweeper.store import TrialResult

EVAL_BATCH_SIZE = 32  # sequences per validation batch, independent of the training batch size
DIVERGENCE_FACTOR = 1.5
CUDA_SYNC_EVERY = 8  # on CUDA, read losses back every this many steps (not every step)

Row = dict[str, Any]
NORM_KEYS = ("out_rms_to_inf", "hidden_rms_to_rms", "in_l1_to_rms")
ALL_NORM_KEYS = NORM_KEYS + tuple("upd_" + k for k in NORM_KEYS)


# --------------------------------------------------------------------------- schedule


def lr_multiplier(step: int, steps: int, schedule: str, warmup: float, warmdown: float) -> float:
    """The factor on every group's lr for update number `step` (0-based) of `steps`.

    Linear warm-up from 0 over the first `warmup` fraction of steps; then the schedule
    (constant; linear or cosine decay towards 0 over the steps after warm-up); times a linear
    warm-down towards 0 over the last `warmdown` fraction. No update is taken at lr 0: the last
    one runs at a small positive factor and 0 is reached one step past the end.
    """
    n_warm = round(warmup * steps)
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    if schedule == "constant":
        factor = 1.0
    elif schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, linear or cosine")
    n_down = round(warmdown * steps)
    if n_down and step >= steps - n_down:
        factor *= (steps - step) / n_down
    return factor


# --------------------------------------------------------------------------- operator norms


def sigma_max(W: Tensor, block: int = 8, iters: int = 8) -> Tensor:
    """Largest singular value of each matrix in W (..., m, n), float32, by block Krylov.

    An SVD of every hidden matrix at every log step costs more than the 5%-of-a-step budget at
    width >= 512 on a CPU. A Krylov subspace of block * (iters + 1) = 72 vectors of W^T W, with
    the exact top singular value of W restricted to it (Rayleigh-Ritz), is within 0.3% of the
    SVD's on Gaussian matrices at width 1024 (the worst case: no gap at the top of the
    spectrum) and exact to float precision on trained weights, whose top singular value stands
    apart. Matrices whose smaller side fits in the subspace are done exactly.
    """
    W = W.detach().float()
    if W.shape[-2] < W.shape[-1]:
        W = W.mT  # work on the Gram matrix of the smaller side
    n = W.shape[-1]
    if n <= block * (iters + 1):
        return torch.linalg.matrix_norm(W, ord=2)
    # A fixed start, the same for every matrix of the batch: the estimate of each is a
    # deterministic function of that matrix alone (whatever else is batched with it, as in a
    # learning-rate bundle), and the global RNG is left alone.
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(n, block, generator=gen).to(W.device).expand(*W.shape[:-2], n, block)
    Q, _ = torch.linalg.qr(Q)
    basis = [Q]
    for _ in range(iters):
        Y = W.mT @ (W @ Q)
        K = torch.cat(basis, dim=-1)
        for _ in range(2):  # twice is enough (Kahan): keeps the basis orthogonal in float32
            Y = Y - K @ (K.mT @ Y)
        Q, _ = torch.linalg.qr(Y)
        basis.append(Q)
    K = torch.cat(basis, dim=-1)
    return torch.linalg.matrix_norm(W @ K, ord=2)


def _rms_to_rms_max(mats: list[Tensor], exact: bool = False) -> Tensor:
    """max over the matrices (each (members, d_out, d_in)) of sqrt(d_in/d_out) sigma_max, per
    member, batching same-shaped ones."""
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for W in mats:
        by_shape.setdefault(tuple(W.shape), []).append(W)
    best = []
    for shape, group in by_shape.items():
        stack = torch.stack(group)
        if exact:
            best.append(rms_to_rms(stack).amax(0))
        else:
            d_out, d_in = shape[-2:]
            best.append(sigma_max(stack).amax(0) * math.sqrt(d_in / d_out))
    return torch.stack(best).amax(0)


class NormLogger:
    """Per-role operator norms of the weights and of the last update (see store.STEPS), for
    each member of a model with members (one row for a plain model).

    `exact=True` takes hidden sigma_max from an SVD instead of `sigma_max`'s Krylov estimate
    (for checks and the benchmark); `enabled=False` logs None (to measure the overhead).
    """

    def __init__(self, model: nn.Module, enabled: bool = True, exact: bool = False):
        self.enabled, self.exact = enabled, exact
        self.stacked = getattr(model, "members", None) is not None
        self.params: dict[str, list[tuple[nn.Parameter, bool]]] = {
            "output": [],
            "hidden": [],
            "input": [],
        }
        for pr in param_roles(model):
            if pr.role in self.params and pr.param.ndim - self.stacked >= 2:
                self.params[pr.role].append((pr.param, pr.transposed))

    def _matrix(self, W: Tensor, transposed: bool) -> Tensor:
        """(members, d_out, d_in): a plain model's weight is one member."""
        if not self.stacked:
            W = (W.reshape(W.shape[0], -1) if W.ndim > 2 else W).unsqueeze(0)
        # nn.Embedding stores (vocab, d); as a map from one-hot vectors it is the transpose.
        return W.mT if transposed else W

    def snapshot(self) -> list[Tensor] | None:
        if not self.enabled:
            return None
        return [p.detach().clone() for group in self.params.values() for p, _ in group]

    @torch.no_grad()
    def norms(self, before: list[Tensor] | None = None) -> list[Row]:
        """Per member, the three norms of the weights and, given the snapshot before the step,
        of the update."""
        if not self.enabled:
            return [dict.fromkeys(ALL_NORM_KEYS)] * self._members()
        weights = self._role_norms(lambda i, p: p)
        if before is not None:
            updates = self._role_norms(lambda i, p: p - before[i])
        else:
            updates = [[None] * 3 for _ in weights]
        return [
            dict(zip(ALL_NORM_KEYS, w + u, strict=True))
            for w, u in zip(weights, updates, strict=True)
        ]

    def _members(self) -> int:
        first = next((p for group in self.params.values() for p, _ in group), None)
        return first.shape[0] if self.stacked and first is not None else 1

    def _role_norms(self, fn: Callable[[int, Tensor], Tensor]) -> list[list[float | None]]:
        mats: dict[str, list[Tensor]] = {}
        i = 0
        for role, group in self.params.items():
            mats[role] = []
            for p, transposed in group:
                mats[role].append(self._matrix(fn(i, p.detach()), transposed))
                i += 1
        every = [W for group in mats.values() for W in group]
        if not every:
            return [[None, None, None] for _ in range(self._members())]
        # Weights broken by the last update would make the SVD raise: such a member reports NaN
        # (the trainer then ends it as diverged) and is measured as zeros. One sync for it.
        finite = torch.stack([torch.isfinite(W).flatten(1).all(1) for W in every]).all(0)
        broken = (~finite).tolist()
        if any(broken):
            keep = finite.view(-1, 1, 1)
            mats = {r: [torch.where(keep, W, 0.0) for W in group] for r, group in mats.items()}
        found = {}
        if mats["output"]:
            found["output"] = torch.stack([rms_to_inf(W) for W in mats["output"]]).amax(0)
        if mats["hidden"]:
            found["hidden"] = _rms_to_rms_max(mats["hidden"], self.exact)
        if mats["input"]:
            found["input"] = torch.stack([l1_to_rms(W) for W in mats["input"]]).amax(0)
        # One device sync for all of them: (roles, members).
        vals = dict(zip(found, torch.stack(list(found.values())).tolist(), strict=True))
        return [
            [math.nan] * 3 if bad else [vals[r][k] if r in vals else None for r in _ROLE_ORDER]
            for k, bad in enumerate(broken)
        ]


_ROLE_ORDER = ("output", "hidden", "input")


# --------------------------------------------------------------------------- helpers


def _device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("the trial asks for device cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


# --------------------------------------------------------------------------- provenance

GIT_TIMEOUT_S = 2.0  # a git that hangs (a network file system, a lock) must not hold up a trial


def provenance(device: torch.device) -> dict[str, Any]:
    """What ran a trial (store.PROVENANCE_COLUMNS): package versions, Python, CPU, GPU, and the
    git commit of the sweeper code. None where unknown. Nothing here enters the trial id."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {**_process_provenance(), "gpu_name": gpu}


@functools.cache
def _process_provenance() -> dict[str, Any]:
    # Once per process: a worker trains many trials, and git costs tens of milliseconds.
    return {
        # The running code's own version: an older sweeper installed beside a checkout that
        # runs (PYTHONPATH) would make the distribution's metadata say the wrong one.
        "sweeper_version": _sweeper_version(),
        "torch_version": _version("torch"),
        "ray_version": _version("ray"),  # what is installed: the trainer never imports Ray
        "python_version": platform.python_version(),
        "cpu_model": _cpu_model(),
        **_git_state(Path(__file__).resolve().parent),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sweeper_version() -> str:
    from sweeper import __version__

    return __version__


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):  # x86; ARM kernels often have no such line
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or None


def _git_state(package: Path) -> dict[str, Any]:
    """{git_commit, git_dirty} of the checkout `package` (sweeper/) is part of, or nulls.

    Nulls too when `package` is not tracked by the repository around it: an installed copy
    in a virtual environment inside some other checkout is not that checkout's code.
    "Dirty" looks at the package's own folder only (tracked changes and new files): the code
    that trained the trial, not the notebooks beside it.
    """
    unknown = {"git_commit": None, "git_dirty": None}
    if not _git(package, "ls-files", "--", "__init__.py"):
        return unknown
    commit = _git(package, "rev-parse", "HEAD")
    status = _git(package, "--no-optional-locks", "status", "--porcelain", "--", ".")
    if not commit or status is None:
        return unknown
    return {"git_commit": commit.strip(), "git_dirty": bool(status.strip())}


def _git(cwd: Path, *args: str) -> str | None:
    """git's output, or None when git is missing, fails, or takes too long."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _nonfinite(x: float | None) -> bool:
    return x is not None and not math.isfinite(x)


class _Clock:
    """Training time, paused while measuring (eval, norms, coord check)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = 0.0
        self._since: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> float:
        """Pause; returns the training seconds so far."""
        if self._since is not None:
            self._sync()
            self.total += time.perf_counter() - self._since
            self._since = None
        return self.total


# --------------------------------------------------------------------------- bundle memory

# Activations kept for the backward pass, in floats per token: per unit of width per layer
# (the GPT's block keeps about 22: its norms, q, k, v, attention output, projections, the 4x
# MLP before and after its activation) and per vocabulary entry (the logits, their float32
# copy, the loss' gradient).
ACTIVATION_FLOATS_PER_WIDTH = 24
ACTIVATION_FLOATS_PER_VOCAB = 4
# A bundle may use this share of the memory its trial is given.
MEMORY_SHARE = 0.8


def member_bytes(spec: TrialSpec) -> int:
    """An estimate of the memory one member of a bundle takes: its parameters five times over
    (weights, gradients, up to two optimizer moments, the snapshot for the update's norms) and
    the activations of one forward/backward pass (a micro-batch when grad_accum > 1)."""
    with torch.device("meta"):  # shapes only, nothing allocated
        n_params = sum(p.numel() for p in build_model(spec).parameters())
    tokens = spec.batch_size // spec.grad_accum * spec.seq_len
    per_token = (
        ACTIVATION_FLOATS_PER_WIDTH * spec.width * spec.depth
        + ACTIVATION_FLOATS_PER_VOCAB * spec.vocab_size
    )
    return 4 * (5 * n_params + tokens * per_token)


def device_memory(spec: TrialSpec, share: float) -> int:
    """The memory a trial given `share` of its device may use: a share of the GPU it runs on,
    or of the machine's RAM."""
    device = _device(spec.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * min(share, 1.0) * MEMORY_SHARE)


def members_that_fit(spec: TrialSpec, wanted: int, share: float = 1.0) -> int:
    """How many of `wanted` members of `spec`'s cell train at once within the memory
    (`device_memory`), at least one."""
    return max(1, min(wanted, device_memory(spec, share) // member_bytes(spec)))


# --------------------------------------------------------------------------- the trial


def run_trial(
    spec: TrialSpec,
    sink: Callable[[Row], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Train one trial. Divergence ends it with status 'diverged', a yes from `should_stop`
    with 'stopped'; other errors propagate."""
    return run_bundle([spec], [sink], [should_stop])[0]


def run_bundle(
    specs: list[TrialSpec],
    sinks: list[Callable[[Row], None] | None] | None = None,
    should_stop: list[Callable[[], bool] | None] | None = None,
) -> list[TrialResult]:
    """Train trials that differ only in lr and seed together, as one model with members (a
    learning-rate bundle; models/base.py), and return each one's result as `run_trial` would.

    Member k is trial specs[k]: it starts from that trial's own initial weights (its seed, its
    optimizer's init), reads that trial's batches (members of one seed share them: common
    random numbers), and steps with its own lr, so it computes what `run_trial(specs[k])`
    computes up to float rounding (batched kernels add in another order). A member that
    diverges or is stopped leaves the bundle at once, its rows kept, and the others go on; the
    bundle ends when every member has. A bundle of one trial is a plain trial.
    """
    if not specs:
        raise ValueError("a bundle needs at least one trial")
    first = specs[0]
    if any(s.cell != first.cell for s in specs):
        raise ValueError("the trials of a bundle must differ in lr and seed only")
    started_at = datetime.now(timezone.utc)
    wall0 = time.perf_counter()
    device = _device(first.device)
    # Subnormal floats (below 1.2e-38) cost x86 CPUs tens of times a normal operation, and some
    # runs make them: constrained Scion at lr 2^-3 took 135 s for 1,024 steps, 19 s with them
    # flushed to zero, as they are on GPUs. No value the training or its logs use is that small.
    torch.set_flush_denormal(True)

    data = load_data(first.data)
    if first.data_fingerprint and first.data_fingerprint != data.fingerprint:
        raise DataError(
            f"{data.source}: the data changed since the sweep was planned (fingerprint "
            f"{data.fingerprint}, the trial expects {first.data_fingerprint})"
        )
    if data.vocab_size != first.vocab_size:
        raise ValueError(f"trial vocab_size {first.vocab_size} != the data's {data.vocab_size}")

    built = [_initialised(spec, device) for spec in specs]
    if len(built) == 1:
        model, opt = built[0]
    else:  # one model of members; its optimizer steps member k with specs[k].lr
        model = build_bundle(first, [m for m, _ in built]).to(device)
        del built
        lrs = torch.tensor([s.lr for s in specs], dtype=torch.float32, device=device)
        opt = build_optimizer(first.optimizer, model, lrs, **_optimizer_settings(first))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # role multipliers are baked into each group's lr

    trainer = _Trainer(specs, sinks, should_stop, model, opt, device, data)
    trainer.run()
    n_params = sum(p.numel() for p in model.parameters()) // (model.members or 1)
    results = []
    for m in trainer.members:
        rows = m.rows
        last = rows[-1]
        completed = m.status == "completed"
        vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
        summary = {
            "n_params": n_params,
            "steps_done": m.steps_done,
            "tokens_seen": m.steps_done * m.spec.batch_size * m.spec.seq_len,
            "initial_loss": rows[0]["train_loss"],
            "final_train_loss": last["train_loss"] if completed else None,
            "final_val_loss": last["val_loss"] if completed else None,
            "best_val_loss": min(vals) if vals else None,
            **{k: (last[k] if completed else None) for k in NORM_KEYS},
            # In a bundle, the bundle's time until the member left it.
            "wall_time_s": m.left - wall0,
            "train_time_s": m.train_time,
            "device": _device_name(device),
            "started_at": started_at,
            "finished_at": m.finished_at,
            "error": m.error,
        }
        results.append(
            TrialResult(
                status=m.status,
                summary=summary,
                steps=rows,
                coord=m.coord,
                provenance=provenance(device),
            )
        )
    return results


def _optimizer_settings(spec: TrialSpec) -> dict[str, Any]:
    """The trial's optimizer settings and per-role lr multipliers, for build_optimizer."""
    settings = dict(spec.hparams)
    for role in ("input", "hidden", "output", "vector"):
        settings[f"lr_{role}"] = getattr(spec, f"lr_{role}")
    return settings


def _initialised(spec: TrialSpec, device: torch.device) -> tuple[nn.Module, Any]:
    """The trial's model and optimizer, its weights where its training starts."""
    # The initial weights depend on the seed and the shapes (never on lr): the model's own init
    # is drawn on the CPU, so it is the same on every device; an optimizer's re-init (Scion's
    # orthogonal matrices, muP) runs where the model lives, because QR-ing every matrix of a
    # wide model on a CPU would cost a GPU trial seconds to minutes. manual_seed seeds both RNGs.
    torch.manual_seed(spec.seed)
    model = build_model(spec).to(device)
    opt = build_optimizer(spec.optimizer, model, spec.lr, **_optimizer_settings(spec))
    if callable(getattr(opt, "init", None)):
        opt.init()
    return model, opt


@dataclass(eq=False)
class _Member:
    """One trial of a bundle: what its rows are computed from, and how it ended."""

    spec: TrialSpec
    sink: Callable[[Row], None] | None
    should_stop: Callable[[], bool] | None
    rows: list[Row] = field(default_factory=list)
    coord: list[Row] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # train losses since the last row
    limit: float = math.inf  # a loss above this after warm-up is divergence
    steps_done: int = 0
    status: str = "completed"
    error: str | None = None
    left: float | None = None  # perf_counter when it left the bundle (or the bundle ended)
    train_time: float = 0.0
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.left is not None

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)


class _Trainer:
    """The loop of one bundle (of one trial, or several as members of one model); the state
    that the rows are computed from lives here."""

    def __init__(
        self,
        specs: list[TrialSpec],
        sinks: list[Callable[[Row], None] | None] | None,
        stops: list[Callable[[], bool] | None] | None,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        data: Data,
        log_norms: bool = True,
    ):
        spec = specs[0]  # what the members share
        self.spec, self.model, self.opt, self.device = spec, model, opt, device
        self.members = [
            _Member(s, (sinks or [None] * len(specs))[k], (stops or [None] * len(specs))[k])
            for k, s in enumerate(specs)
        ]
        self.live = list(range(len(specs)))  # the members still in the model, in its order
        self.stacked = getattr(model, "members", None) is not None
        # One stream of batches per seed: members of one seed read the same batches.
        self.batches: dict[int, Iterator[Batch]] = {
            seed: train_batches(data, spec.batch_size, spec.seq_len, seed)
            for seed in dict.fromkeys(s.seed for s in specs)
        }
        self.val = [
            (x.to(device), y.to(device))
            for x, y in val_batches(data, EVAL_BATCH_SIZE, spec.seq_len, spec.eval_batches)
        ]
        self.norms = NormLogger(model, enabled=log_norms)
        self.clock = _Clock(device)
        self.tokens_per_step = spec.batch_size * spec.seq_len
        self.n_warm = round(spec.warmup * spec.steps)
        self.sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else 1

    def autocast(self) -> contextlib.AbstractContextManager:
        # A fresh context each time: an autocast object keeps the state it restores on exit.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def live_members(self) -> list[_Member]:
        return [self.members[k] for k in self.live]

    # ------------------------------------------------------------------ batches

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next training batch of every live member: (B, T), or (members, B, T)."""
        live = self.live_members()
        seeds = dict.fromkeys(m.spec.seed for m in live)
        drawn = {seed: next(self.batches[seed]) for seed in seeds}
        if self.stacked:
            x = torch.stack([drawn[m.spec.seed][0] for m in live])
            y = torch.stack([drawn[m.spec.seed][1] for m in live])
        else:
            x, y = drawn[live[0].spec.seed]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def for_members(self, t: Tensor) -> Tensor:
        """A batch every member sees (a validation batch) in the model's input layout."""
        return t.expand(len(self.live), *t.shape) if self.stacked else t

    # ------------------------------------------------------------------ measurements

    @torch.no_grad()
    def losses(self, x: Tensor, y: Tensor) -> list[float]:
        """Each live member's mean loss on its batch (x, y)."""
        with self.autocast():
            return self.model.loss(x, y).float().reshape(-1).tolist()

    def evaluate(self) -> list[float]:
        """Each live member's validation loss."""
        per_batch = [self.losses(self.for_members(x), self.for_members(y)) for x, y in self.val]
        return [sum(col) / len(per_batch) for col in zip(*per_batch, strict=True)]

    @torch.no_grad()
    def coord_check(self, step: int) -> None:
        """mean |output| of every coord layer on the first validation batch, per member."""
        found: list[Tensor] = []
        n = len(self.live)
        layers = self.model.coord_layers()
        hooks = [
            m.register_forward_hook(
                lambda _m, _i, out: found.append(out.float().abs().reshape(n, -1).mean(1))
            )
            for _, m in layers
        ]
        try:
            with self.autocast():
                self.model(self.for_members(self.val[0][0]))
        finally:
            for h in hooks:
                h.remove()
        per_layer = torch.stack(found).tolist()
        for j, member in enumerate(self.live_members()):
            if member.done:
                continue
            for i, ((name, _), v) in enumerate(zip(layers, per_layer, strict=True)):
                member.coord.append(
                    {"step": step, "layer_index": i, "layer": name, "mean_abs": v[j]}
                )

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Each live member's mean loss on its batch, its gradient accumulated over
        `grad_accum` equal passes (a scalar for a plain model)."""
        passes = self.spec.grad_accum
        total = torch.zeros((), device=self.device)
        for xs, ys in zip(x.chunk(passes, dim=-2), y.chunk(passes, dim=-2), strict=True):
            with self.autocast():
                loss = self.model.loss(xs, ys) / passes
            loss.sum().backward()  # members are independent: each gets its own gradient
            total = total + loss.detach()
        return total

    def clip_gradients(self) -> None:
        """Each member's gradient scaled to global norm at most grad_clip."""
        clip = self.spec.grad_clip
        if self.stacked:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            n = len(self.live)
            norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in grads]).norm(dim=0)
            coef = (clip / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_, per member
            for g in grads:
                g.mul_(coef.view(n, *[1] * (g.ndim - 1)))
        else:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)

    def lr_at(self, step: int) -> float:
        s = self.spec
        return lr_multiplier(step, s.steps, s.schedule, s.warmup, s.warmdown)

    # ------------------------------------------------------------------ members leaving

    def end(self, member: _Member, status: str, error: str | None) -> None:
        member.status, member.error = status, error
        member.left = time.perf_counter()
        member.train_time = self.clock.total
        member.finished_at = datetime.now(timezone.utc)

    def diverged_row(self, member: _Member, step: int, elapsed: float) -> None:
        """The last row of a diverged trial: what is known at the step where it went bad."""
        member.steps_done = step
        mean = sum(member.window) / len(member.window)
        member.emit(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "train_loss": mean if math.isfinite(mean) else None,
                "val_loss": None,
                "lr": member.spec.lr * self.lr_at(step - 1),
                "elapsed_s": elapsed,
                "tokens_per_s": None,
                **dict.fromkeys(ALL_NORM_KEYS),
            }
        )

    @torch.no_grad()
    def drop_ended(self) -> None:
        """Take the members that ended out of the model and its optimizer state, so that the
        rest train as a smaller bundle (a plain model just stops)."""
        keep = [j for j, k in enumerate(self.live) if not self.members[k].done]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[j] for j in keep]
        if not self.stacked or not keep:
            return
        index = torch.tensor(keep, device=self.device)
        for p in self.model.parameters():
            state = self.opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    state[key] = value.index_select(0, index)
            p.data = p.data.index_select(0, index)
        for group in self.opt.param_groups:
            if torch.is_tensor(group["initial_lr"]):
                group["initial_lr"] = group["initial_lr"].index_select(0, index)
        self.model.members = len(keep)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        spec, opt = self.spec, self.opt
        x, y = self.next_batch()

        # Step 0: the initial weights.
        if spec.coord_check:
            self.coord_check(0)
        initial = self.losses(x, y)
        vals, norms = self.evaluate(), self.norms.norms()
        for j, member in enumerate(self.live_members()):
            member.emit(
                {
                    "step": 0,
                    "tokens": 0,
                    "train_loss": initial[j],
                    "val_loss": vals[j],
                    "lr": member.spec.lr * self.lr_at(0),
                    "elapsed_s": 0.0,
                    "tokens_per_s": None,
                    **norms[j],
                }
            )
            if not math.isfinite(initial[j]):
                self.end(member, "diverged", f"non-finite loss at initialisation ({initial[j]})")
            member.limit = DIVERGENCE_FACTOR * max(initial[j], math.log(spec.vocab_size))
        self.drop_ended()

        pending: list[tuple[int, Tensor]] = []  # losses not yet read back from the device
        last_row_step, last_row_time = 0, 0.0
        self.clock.start()
        for step in range(1, spec.steps + 1):
            if not self.live:  # every member diverged or was stopped
                break
            if step > 1:
                x, y = self.next_batch()
            is_row = step % spec.log_every == 0 or step == spec.steps
            factor = self.lr_at(step - 1)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

            loss = self.forward_backward(x, y)
            if spec.grad_clip > 0:
                self.clip_gradients()
            before = None
            if is_row:  # the update's norm needs the weights before it; only on logged steps
                self.clock.stop()
                before = self.norms.snapshot()
                self.clock.start()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for member in self.live_members():
                member.steps_done = step
            pending.append((step, loss.detach().reshape(-1)))

            if is_row or len(pending) >= self.sync_every:
                self.check_losses(pending)
                pending.clear()
            if all(m.done for m in self.live_members()):
                break  # all that were left went bad at this step: nothing more to measure
            if spec.coord_check and step <= spec.coord_check:
                self.clock.stop()
                self.coord_check(step)
                self.clock.start()

            if is_row:
                elapsed = self.clock.stop()
                # Rows only at log steps: an evaluation falls on the first row at or after each
                # multiple of eval_every (the same steps when eval_every is a multiple of
                # log_every), so its loss is always that of the weights of its row.
                evaluate = step == spec.steps or (
                    step // spec.eval_every > last_row_step // spec.eval_every
                )
                vals = self.evaluate() if evaluate else [None] * len(self.live)
                norms = self.norms.norms(before)
                tokens = (step - last_row_step) * self.tokens_per_step
                dt = elapsed - last_row_time
                for j, member in enumerate(self.live_members()):
                    if member.done:  # diverged at this step: its last row is written
                        continue
                    row_values = {"val_loss": vals[j], **norms[j]}
                    broken = [k for k, v in row_values.items() if _nonfinite(v)]
                    if broken:  # the last update broke the weights (the loss came before it)
                        self.diverged_row(member, step, elapsed)
                        self.end(
                            member, "diverged", f"diverged at step {step}: non-finite "
                            f"{', '.join(broken)}"
                        )  # fmt: skip
                        continue
                    member.emit(
                        {
                            "step": step,
                            "tokens": step * self.tokens_per_step,
                            "train_loss": sum(member.window) / len(member.window),
                            "val_loss": vals[j],
                            "lr": member.spec.lr * factor,
                            "elapsed_s": elapsed,
                            "tokens_per_s": tokens / dt if dt > 0 else None,
                            **norms[j],
                        }
                    )
                    member.window.clear()
                    if step < spec.steps and member.should_stop and member.should_stop():
                        self.end(member, "stopped", f"stopped early at step {step}")
                last_row_step, last_row_time = step, elapsed
                self.clock.start()
            # Members that left at this step leave the model now (after its row, whose norms
            # were measured on the whole stack).
            self.drop_ended()
        self.clock.stop()
        for member in self.live_members():
            if not member.done:
                self.end(member, "completed", None)

    def check_losses(self, pending: list[tuple[int, Tensor]]) -> None:
        """Read the pending losses back; a live member whose loss went bad (non-finite, or
        above its limit after warm-up) ends diverged, with its last row at that step."""
        values = torch.stack([v for _, v in pending]).tolist()
        elapsed = None
        for (s, _), losses in zip(pending, values, strict=True):
            for j, member in enumerate(self.live_members()):
                if member.done:
                    continue
                v = losses[j]
                member.window.append(v)
                if not math.isfinite(v) or (s > self.n_warm and v > member.limit):
                    if elapsed is None:
                        elapsed = self.clock.stop()
                        self.clock.start()
                    self.diverged_row(member, s, elapsed)
                    what = "non-finite loss" if not math.isfinite(v) else "loss"
                    self.end(
                        member,
                        "diverged",
                        f"diverged at step {s}: {what} {v:.4g} (limit {member.limit:.4g} = "
                        f"{DIVERGENCE_FACTOR} x max(initial loss, ln vocab))",
                    )
