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
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sweeper.data import Batch, Data, DataError, load_data, train_batches, val_batches
from sweeper.models import build_model
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
    # A fixed start: the estimate is a deterministic function of W, and the global RNG
    # (which seeds nothing after init, but still) is left alone.
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(*W.shape[:-2], n, block, generator=gen).to(W.device)
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
    """max over the matrices of sqrt(d_in/d_out) sigma_max, batching same-shaped ones."""
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for W in mats:
        by_shape.setdefault(tuple(W.shape), []).append(W)
    best = []
    for shape, group in by_shape.items():
        stack = torch.stack(group)
        if exact:
            best.append(rms_to_rms(stack).amax())
        else:
            d_out, d_in = shape[-2:]
            best.append(sigma_max(stack).amax() * math.sqrt(d_in / d_out))
    return torch.stack(best).amax()


class NormLogger:
    """Per-role operator norms of the weights and of the last update (see store.STEPS).

    `exact=True` takes hidden sigma_max from an SVD instead of `sigma_max`'s Krylov estimate
    (for checks and the benchmark); `enabled=False` logs None (to measure the overhead).
    """

    def __init__(self, model: nn.Module, enabled: bool = True, exact: bool = False):
        self.enabled, self.exact = enabled, exact
        self.params: dict[str, list[tuple[nn.Parameter, bool]]] = {
            "output": [],
            "hidden": [],
            "input": [],
        }
        for pr in param_roles(model):
            if pr.role in self.params and pr.param.ndim >= 2:
                self.params[pr.role].append((pr.param, pr.transposed))

    @staticmethod
    def _matrix(W: Tensor, transposed: bool) -> Tensor:
        # nn.Embedding stores (vocab, d); as a map from one-hot vectors it is the transpose.
        W = W.reshape(W.shape[0], -1) if W.ndim > 2 else W
        return W.mT if transposed else W

    def snapshot(self) -> list[Tensor] | None:
        if not self.enabled:
            return None
        return [p.detach().clone() for group in self.params.values() for p, _ in group]

    @torch.no_grad()
    def norms(self, before: list[Tensor] | None = None) -> Row:
        """The three norms of the weights and, given the snapshot before the step, of the update."""
        if not self.enabled:
            return dict.fromkeys(ALL_NORM_KEYS)
        values = self._role_norms(lambda i, p: p)
        if before is not None:
            values += self._role_norms(lambda i, p: p - before[i])
        else:
            values += [None] * 3
        return dict(zip(ALL_NORM_KEYS, values, strict=True))

    def _role_norms(self, fn: Callable[[int, Tensor], Tensor]) -> list[float | None]:
        mats: dict[str, list[Tensor]] = {}
        i = 0
        for role, group in self.params.items():
            mats[role] = []
            for p, transposed in group:
                mats[role].append(self._matrix(fn(i, p.detach()), transposed))
                i += 1
        every = [W for group in mats.values() for W in group]
        if not every:
            return [None, None, None]
        # Weights broken by the last update would make the SVD raise: report NaN instead (the
        # trainer then ends the trial as diverged). One sync for the check.
        if not torch.stack([torch.isfinite(W).all() for W in every]).all():
            return [math.nan] * 3
        found = {}
        if mats["output"]:
            found["output"] = torch.stack([rms_to_inf(W) for W in mats["output"]]).amax()
        if mats["hidden"]:
            found["hidden"] = _rms_to_rms_max(mats["hidden"], self.exact)
        if mats["input"]:
            found["input"] = torch.stack([l1_to_rms(W) for W in mats["input"]]).amax()
        # One device sync for all of them.
        vals = dict(zip(found, torch.stack(list(found.values())).tolist(), strict=True))
        return [vals.get(role) for role in ("output", "hidden", "input")]


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


# --------------------------------------------------------------------------- the trial


def run_trial(
    spec: TrialSpec,
    sink: Callable[[Row], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Train one trial. Divergence ends it with status 'diverged', a yes from `should_stop`
    with 'stopped'; other errors propagate."""
    started_at = datetime.now(timezone.utc)
    wall0 = time.perf_counter()
    device = _device(spec.device)

    data = load_data(spec.data)
    if spec.data_fingerprint and spec.data_fingerprint != data.fingerprint:
        raise DataError(
            f"{data.source}: the data changed since the sweep was planned (fingerprint "
            f"{data.fingerprint}, the trial expects {spec.data_fingerprint})"
        )
    if data.vocab_size != spec.vocab_size:
        raise ValueError(f"trial vocab_size {spec.vocab_size} != the data's {data.vocab_size}")

    # The initial weights depend on the seed and the shapes (never on lr): the model's own init
    # is drawn on the CPU, so it is the same on every device; an optimizer's re-init (Scion's
    # orthogonal matrices, muP) runs where the model lives, because QR-ing every matrix of a
    # wide model on a CPU would cost a GPU trial seconds to minutes. manual_seed seeds both RNGs.
    torch.manual_seed(spec.seed)
    model = build_model(spec).to(device)
    hparams = dict(spec.hparams)
    for role in ("input", "hidden", "output", "vector"):
        hparams[f"lr_{role}"] = getattr(spec, f"lr_{role}")
    opt = build_optimizer(spec.optimizer, model, spec.lr, **hparams)
    if callable(getattr(opt, "init", None)):
        opt.init()
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # role multipliers are baked into each group's lr

    trainer = _Trainer(spec, model, opt, device, data, sink, should_stop=should_stop)
    status, error = trainer.run()

    rows = trainer.rows
    last = rows[-1]
    completed = status == "completed"
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    summary = {
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps_done": trainer.steps_done,
        "tokens_seen": trainer.steps_done * spec.batch_size * spec.seq_len,
        "initial_loss": rows[0]["train_loss"],
        "final_train_loss": last["train_loss"] if completed else None,
        "final_val_loss": last["val_loss"] if completed else None,
        "best_val_loss": min(vals) if vals else None,
        **{k: (last[k] if completed else None) for k in NORM_KEYS},
        "wall_time_s": time.perf_counter() - wall0,
        "train_time_s": trainer.clock.total,
        "device": _device_name(device),
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc),
        "error": error,
    }
    return TrialResult(
        status=status,
        summary=summary,
        steps=rows,
        coord=trainer.coord,
        provenance=provenance(device),
    )


class _Trainer:
    """The loop of one trial; state that the rows are computed from lives here."""

    def __init__(
        self,
        spec: TrialSpec,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        data: Data,
        sink: Callable[[Row], None] | None,
        log_norms: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.spec, self.model, self.opt, self.device, self.sink = spec, model, opt, device, sink
        self.should_stop = should_stop
        self.batches: Iterator[Batch] = train_batches(
            data, spec.batch_size, spec.seq_len, spec.seed
        )
        self.val = [
            (x.to(device), y.to(device))
            for x, y in val_batches(data, EVAL_BATCH_SIZE, spec.seq_len, spec.eval_batches)
        ]
        self.norms = NormLogger(model, enabled=log_norms)
        self.clock = _Clock(device)
        self.tokens_per_step = spec.batch_size * spec.seq_len
        self.n_warm = round(spec.warmup * spec.steps)
        self.sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else 1
        self.rows: list[Row] = []
        self.coord: list[Row] = []
        self.steps_done = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        # A fresh context each time: an autocast object keeps the state it restores on exit.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ measurements

    @torch.no_grad()
    def _loss(self, x: Tensor, y: Tensor) -> float:
        with self.autocast():
            return float(self.model.loss(x, y))

    def evaluate(self) -> float:
        return sum(self._loss(x, y) for x, y in self.val) / len(self.val)

    @torch.no_grad()
    def coord_check(self, step: int) -> None:
        """mean |output| of every coord layer on the first validation batch."""
        found: list[Tensor] = []
        layers = self.model.coord_layers()
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: found.append(out.float().abs().mean()))
            for _, m in layers
        ]
        try:
            with self.autocast():
                self.model(self.val[0][0])
        finally:
            for h in hooks:
                h.remove()
        for i, ((name, _), v) in enumerate(zip(layers, torch.stack(found).tolist(), strict=True)):
            self.coord.append({"step": step, "layer_index": i, "layer": name, "mean_abs": v})

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """The batch's mean loss; its gradient accumulated over `grad_accum` equal passes."""
        passes = self.spec.grad_accum
        total = torch.zeros((), device=self.device)
        for xs, ys in zip(x.chunk(passes), y.chunk(passes), strict=True):
            with self.autocast():
                loss = self.model.loss(xs, ys) / passes
            loss.backward()
            total += loss.detach()
        return total

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)

    def diverged_row(self, step: int, window: list[float]) -> None:
        """The last row of a diverged trial: what is known at the step where it went bad."""
        elapsed = self.clock.stop()
        self.steps_done = step
        mean = sum(window) / len(window)
        self.emit(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "train_loss": mean if math.isfinite(mean) else None,
                "val_loss": None,
                "lr": self.spec.lr * self.lr_at(step - 1),
                "elapsed_s": elapsed,
                "tokens_per_s": None,
                **dict.fromkeys(ALL_NORM_KEYS),
            }
        )

    def lr_at(self, step: int) -> float:
        s = self.spec
        return lr_multiplier(step, s.steps, s.schedule, s.warmup, s.warmdown)

    # ------------------------------------------------------------------ the loop

    def run(self) -> tuple[str, str | None]:
        spec, model, opt = self.spec, self.model, self.opt
        x, y = (t.to(self.device) for t in next(self.batches))

        # Step 0: the initial weights.
        if spec.coord_check:
            self.coord_check(0)
        initial = self._loss(x, y)
        self.emit(
            {
                "step": 0,
                "tokens": 0,
                "train_loss": initial,
                "val_loss": self.evaluate(),
                "lr": spec.lr * self.lr_at(0),
                "elapsed_s": 0.0,
                "tokens_per_s": None,
                **self.norms.norms(),
            }
        )
        if not math.isfinite(initial):
            return "diverged", f"non-finite loss at initialisation ({initial})"
        limit = DIVERGENCE_FACTOR * max(initial, math.log(spec.vocab_size))

        window: list[float] = []  # losses since the last row
        pending: list[tuple[int, Tensor]] = []  # losses not yet read back from the device
        last_row_step, last_row_time = 0, 0.0
        self.clock.start()
        for step in range(1, spec.steps + 1):
            if step > 1:
                x, y = (t.to(self.device, non_blocking=True) for t in next(self.batches))
            is_row = step % spec.log_every == 0 or step == spec.steps
            factor = self.lr_at(step - 1)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

            loss = self.forward_backward(x, y)
            if spec.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            before = None
            if is_row:  # the update's norm needs the weights before it; only on logged steps
                self.clock.stop()
                before = self.norms.snapshot()
                self.clock.start()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.steps_done = step
            pending.append((step, loss.detach()))

            if is_row or len(pending) >= self.sync_every:
                values = torch.stack([v for _, v in pending]).tolist()
                steps = [s for s, _ in pending]
                pending.clear()
                for s, v in zip(steps, values, strict=True):
                    window.append(v)
                    bad = not math.isfinite(v) or (s > self.n_warm and v > limit)
                    if bad:
                        self.diverged_row(s, window)
                        what = "non-finite loss" if not math.isfinite(v) else "loss"
                        return "diverged", (
                            f"diverged at step {s}: {what} {v:.4g} (limit {limit:.4g} = "
                            f"{DIVERGENCE_FACTOR} x max(initial loss, ln vocab))"
                        )

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
                val = self.evaluate() if evaluate else None
                norms = self.norms.norms(before)
                broken = [k for k, v in {"val_loss": val, **norms}.items() if _nonfinite(v)]
                if broken:  # the last update broke the weights (the loss was taken before it)
                    self.diverged_row(step, window)
                    return "diverged", f"diverged at step {step}: non-finite {', '.join(broken)}"
                tokens = (step - last_row_step) * self.tokens_per_step
                dt = elapsed - last_row_time
                self.emit(
                    {
                        "step": step,
                        "tokens": step * self.tokens_per_step,
                        "train_loss": sum(window) / len(window),
                        "val_loss": val,
                        "lr": spec.lr * factor,
                        "elapsed_s": elapsed,
                        "tokens_per_s": tokens / dt if dt > 0 else None,
                        **norms,
                    }
                )
                window.clear()
                last_row_step, last_row_time = step, elapsed
                if step < spec.steps and self.should_stop and self.should_stop():
                    return "stopped", f"stopped early at step {step}"
                self.clock.start()
        self.clock.stop()
        return "completed", None
