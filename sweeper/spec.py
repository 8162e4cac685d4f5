"""The grid file: its pydantic schema, and its expansion into TrialSpecs.

A grid file names a study; `expand()` turns it into the cartesian product of its axes, one
`TrialSpec` per trial. A TrialSpec is flat and self-contained: the trainer needs nothing else,
and its `trial_id` is a stable hash of every field that changes the result.

Every value a grid file may hold has a range (the constants below, listed in README's "The grid
file"), checked when the file is loaded: a typo, an overflow or a runaway grid is one
`SpecError` naming the field, never a traceback or a trial that fails hours later. The limits
are generous: they refuse mistakes, not studies anyone runs on a proxy model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Bump when the meaning of a TrialSpec field or of the stored rows changes: old trial ids then
# no longer match, so a re-run never mixes results of two code versions.
SCHEMA_VERSION = 1

OPTIMIZERS = (
    "adamw",
    "adamw-mup",
    "adamw-rescaled",
    "muon",
    "scion",
    "uscion",
    "moga-row",
    "moga-col",
)

Scalar = bool | int | float | str
# Per-role multipliers of an optimizer's lr; every optimizer takes them.
ROLE_LRS = ("lr_input", "lr_hidden", "lr_output", "lr_vector")

# --------------------------------------------------------------------------- limits

# A grid file's size, checked with stat() before it is read. Grid files are a few KB (the
# largest under experiments/ is 3.2 KB); one that needs more holds a generated list that belongs
# in a log2 range. The cap bounds the time and memory of parsing whatever the file holds: a
# 64 KiB file of nothing but a list parses in under 0.1 s (1 MiB would take 2 s and 300 MB).
MAX_GRID_BYTES = 64 << 10
# Values in a grid file, an alias counted at each use: bounds the work of validating a file
# whose aliases repeat one long list many times. A grid under the trial cap holds far fewer.
MAX_VALUES = 100_000
# Trials per grid file, counted from the axes before any trial is built: the whole grid is held
# in memory (and printed by --dry-run), and 100k proxy trials are weeks of compute already.
MAX_TRIALS = 100_000
MAX_LOG2_POINTS = 1000  # steps in one {log2: [lo, hi, step]} range
MAX_LISTED_ERRORS = 10  # errors listed in one message; the rest are counted

# Learning rates lie in 2^-40 .. 2^20 (9.1e-13 .. 1.0e6), per-role multipliers (lr_input, ...,
# lr_vector) in 2^-20 .. 2^20. Tens of octaves around every lr in use (experiments/ spans
# 2^-14 .. 2^1): a value outside is a typo, and far enough out a float rounds to 0 or inf.
LOG2_LR_RANGE = (-40, 20)
LOG2_MULTIPLIER_RANGE = (-20, 20)
# A seed goes to torch.manual_seed, to numpy's PCG64 (data/batches.py) and to an int64 column
# of the store: 0 <= seed < 2^32 suits all three, and every other seeding API.
MAX_SEED = 2**32 - 1
# Shapes: far beyond any proxy model, and well inside int64 when multiplied together.
MAX_WIDTH = 65_536
MAX_DEPTH = 1_024
MAX_SEQ_LEN = 1_048_576
MAX_MLP_CONTEXT = 4_096
MAX_VOCAB_SIZE = 1_048_576
MAX_BATCH_SIZE = 1_048_576  # sequences per step
MAX_STEPS = 1_000_000_000
# Tokens of one trial (steps x batch_size x seq_len, an int64 column of the store): 10^15 is
# 50 times the largest language-model runs, and 9000 times below int64's limit.
MAX_TOKENS = 10**15
MAX_EVAL_BATCHES = 10_000
MAX_RETRIES = 100
MAX_BUNDLE = 256  # trials trained as one model (execution.bundle)
# `execution.bundle: auto`: bundles of this many, before the memory a trial may use caps them
# (train.members_that_fit).
AUTO_BUNDLE = 8
MAX_CPUS = 1_024  # per trial
MAX_GPUS = 1_024  # per trial
# Octaves compare with this slack: lo + i * step may overshoot hi by a rounding error.
_OCTAVE_SLACK = 1e-9


class SpecError(ValueError):
    """A grid file that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    # allow_inf_nan=False: .inf and .nan are refused wherever a float is accepted.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_or_no_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/true/false as booleans, which pydantic would take as 1 and 0
        # (`steps: yes` would train one step).
        if _takes_numbers(cls.model_fields[info.field_name].annotation):
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, bool):
                    raise ValueError(f"{str(v).lower()} is a yes/no, not a number")
        return value


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field's type holds ints or floats (bool aside), however nested."""
    if annotation is int or annotation is float:
        return True
    return any(_takes_numbers(a) for a in get_args(annotation))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


T = TypeVar("T")
# An axis of the grid: one value or a non-empty list of them, stored as a list.
Axis = Annotated[list[T], BeforeValidator(_as_list), Field(min_length=1)]


def _octaves(what: str, lo: int, hi: int) -> AfterValidator:
    """A float > 0 whose log2 lies in [lo, hi]; the message names the value and the range."""

    def check(v: float) -> float:
        if v <= 0:
            raise ValueError(f"{what} must be positive, got {v:g}")
        if not lo - _OCTAVE_SLACK <= math.log2(v) <= hi + _OCTAVE_SLACK:
            raise ValueError(f"{what} {v:g} is outside {_octave_range(lo, hi)}")
        return v

    return AfterValidator(check)


def _octave_range(lo: int, hi: int) -> str:
    return f"2^{lo} .. 2^{hi} ({2.0**lo:.2g} .. {2.0**hi:.2g})"


LearningRate = Annotated[float, _octaves("lr", *LOG2_LR_RANGE)]
Multiplier = Annotated[float, _octaves("lr multiplier", *LOG2_MULTIPLIER_RANGE)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Depth = Annotated[int, Field(ge=1, le=MAX_DEPTH)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


# --------------------------------------------------------------------------- the grid file


class ModelConfig(_Strict):
    kind: Literal["gpt", "mlp"] = "gpt"
    depth: Axis[Depth] = [2]
    seq_len: Annotated[int, Field(ge=1, le=MAX_SEQ_LEN)] = 128
    # GPT only (see SweepSpec._heads_fit): even, and it divides every width above it.
    head_dim: Annotated[int, Field(ge=1, le=MAX_WIDTH)] = 64
    zero_init_out: bool = False
    # "auto": 1/d for adamw-mup (muP), 1/sqrt(d) for everything else.
    attn_scale: Literal["auto", "sqrt", "mup"] = "auto"
    # MLP proxy only: how many previous tokens it sees (one-hot, concatenated).
    mlp_context: Annotated[int, Field(ge=1, le=MAX_MLP_CONTEXT)] = 8


class DataConfig(_Strict):
    """Exactly one source: the embedded corpus, a text file, or token shards."""

    corpus: Literal["stdlib"] | None = None
    text: str | None = None
    shards: str | None = None  # a glob of .bin files (nanoGPT raw uint16 or modded-nanogpt)
    val_shards: str | None = None  # a glob; default: hold out the tail of the training tokens
    # default 256 for bytes, 50304 for shards
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB_SIZE)] | None = None
    val_fraction: float = Field(0.05, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in ("corpus", "text", "shards") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one data source: corpus: stdlib, text: PATH or shards: GLOB"
                f" (got {', '.join(given) or 'none'})"
            )
        if self.val_shards is not None and self.shards is None:
            raise ValueError("val_shards needs shards")
        return self

    @property
    def byte_level(self) -> bool:
        return self.shards is None

    @property
    def resolved_vocab_size(self) -> int:
        if self.vocab_size is not None:
            return self.vocab_size
        return 256 if self.byte_level else 50304

    def describe(self) -> str:
        """One canonical line, stored with every trial."""
        if self.corpus:
            return f"corpus:{self.corpus}"
        if self.text:
            return f"text:{self.text}"
        return f"shards:{self.shards}" + (f" val:{self.val_shards}" if self.val_shards else "")


class TrainConfig(_Strict):
    steps: Axis[Steps] | None = None
    tokens: Axis[Tokens] | None = None  # a budget; steps = tokens / (B * T)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0, lt=1)  # fraction of steps, linear from 0
    warmdown: float = Field(0.0, ge=0, le=1)  # fraction of steps at the end, linear to 0
    grad_clip: float = Field(0.0, ge=0)  # global norm; 0 = off
    # Sequences per forward/backward pass when a batch does not fit in memory: the gradient of
    # each batch is accumulated over batch_size / micro_batch passes. Default: the whole batch.
    micro_batch: BatchSize | None = None
    log_every: Steps = 10
    eval_every: Steps = 50
    eval_batches: Annotated[int, Field(ge=1, le=MAX_EVAL_BATCHES)] = 4
    # record mean |activation| per layer for this many steps
    coord_check: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> TrainConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of train.steps and train.tokens")
        if self.warmup + self.warmdown > 1:
            raise ValueError("train.warmup + train.warmdown must not exceed 1")
        return self

    @property
    def horizons(self) -> list[int]:
        """The steps or the tokens axis, whichever the file gives."""
        return self.steps if self.steps is not None else (self.tokens or [])


class Log2Range(_Strict):
    """`{log2: [lo, hi, step]}`: 2**lo, 2**(lo+step), ..., 2**hi (hi included)."""

    log2: tuple[float, float, float]

    @field_validator("log2")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        lo, hi, step = v
        if step <= 0 or hi < lo:
            raise ValueError("log2: [lo, hi, step] needs lo <= hi and step > 0")
        if (hi - lo) / step > MAX_LOG2_POINTS:
            raise ValueError(f"log2 range has more than {MAX_LOG2_POINTS} points")
        return v

    def values(self) -> list[float]:
        lo, hi, step = self.log2
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        return [2.0 ** (lo + i * step) for i in range(n)]


def _lr_values(value: Any) -> Any:
    """`lr` as a list of values: one value, a list, or a {log2: [lo, hi, step]} range."""
    if not isinstance(value, dict | Log2Range):
        return _as_list(value)
    try:
        rng = Log2Range.model_validate(value)
    except ValidationError as err:
        e = err.errors(include_url=False, include_input=False)[0]
        if e["type"] == "value_error":  # Log2Range's own check: its message says it all
            raise ValueError(e["msg"].removeprefix("Value error, ")) from None
        where = ".".join(str(p) for p in e["loc"])
        raise ValueError(
            f"a range is {{log2: [lo, hi, step]}}, three numbers; {where}: {e['msg']}"
        ) from None
    # The ends are checked here, in octaves: 2.0 ** -2000 is already 0.0 and 2.0 ** 1100 an
    # OverflowError, so the values themselves cannot say what was wrong.
    lo, hi, _ = rng.log2
    low, high = LOG2_LR_RANGE
    if lo < low - _OCTAVE_SLACK or hi > high + _OCTAVE_SLACK:
        bad = lo if lo < low else hi
        raise ValueError(
            f"log2 range [{lo:g}, {hi:g}, ...] reaches 2^{bad:g}; "
            f"an lr must lie in {_octave_range(low, high)}"
        )
    return rng.values()


class OptimizerAxis(_Strict):
    """One optimizer's block under grid.optimizer: its lr range and its settings.

    Any setting given as a list becomes an axis of the grid.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    lr: Annotated[list[LearningRate], BeforeValidator(_lr_values), Field(min_length=1)]
    lr_input: Axis[Multiplier] = [1.0]
    lr_hidden: Axis[Multiplier] = [1.0]
    lr_output: Axis[Multiplier] = [1.0]
    lr_vector: Axis[Multiplier] = [1.0]

    @model_validator(mode="after")
    def _scalar_settings(self) -> OptimizerAxis:
        # Settings are not typed here (each optimizer checks its own when the sweep is
        # planned); what is checked is what would break before that: shapes and overflow.
        for key, value in (self.model_extra or {}).items():
            values = _as_list(value)
            if not values:
                raise ValueError(f"setting {key!r} is an empty list; give at least one value")
            for v in values:
                if not isinstance(v, Scalar):
                    raise ValueError(f"setting {key!r} must be a number, string or bool, or a list")
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"setting {key!r} must be a finite number, got {v}")
                if isinstance(v, int) and not -(2**63) <= v < 2**63:
                    raise ValueError(f"setting {key!r}: {v} does not fit in 64 bits")
        return self

    def lrs(self) -> list[float]:
        return self.lr

    def settings(self) -> dict[str, list[Scalar]]:
        """Every setting other than lr as a list of values (an axis)."""
        out: dict[str, list[Scalar]] = {k: getattr(self, k) for k in ROLE_LRS}
        out.update({k: _as_list(v) for k, v in sorted((self.model_extra or {}).items())})
        return out

    def n_points(self) -> int:
        """How many (lr, settings) combinations this block adds to each cell."""
        return len(self.lr) * math.prod(len(v) for v in self.settings().values())


class Grid(_Strict):
    width: Axis[Width]
    batch_size: Axis[BatchSize] = [32]
    seed: Axis[Seed] = [0]
    optimizer: dict[str, OptimizerAxis] = Field(min_length=1)

    @field_validator("optimizer")
    @classmethod
    def _known(cls, v: dict[str, OptimizerAxis]) -> dict[str, OptimizerAxis]:
        unknown = [name for name in v if name not in OPTIMIZERS]
        if unknown:
            raise ValueError(
                f"unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        return v


class Resources(_Strict):
    cpu: float = Field(1, gt=0, le=MAX_CPUS)
    gpu: float = Field(0, ge=0, le=MAX_GPUS)

    @field_validator("gpu")
    @classmethod
    def _packs(cls, v: float) -> float:
        # Ray miscounts fractions that do not divide 1 (ray-project/ray#5902).
        if 0 < v < 1 and abs(round(1 / v) - 1 / v) > 1e-9:
            raise ValueError(f"a GPU fraction must divide 1 exactly (1/2, 1/4, ...), got {v}")
        if v > 1 and v != int(v):
            raise ValueError(f"more than one GPU must be a whole number, got {v}")
        return v


class Asha(_Strict):
    """Tune's ASHA on validation loss, comparing the lrs of one cell at one seed."""

    grace: Annotated[float, Field(gt=0, lt=1)] = 0.25  # share of the steps before any stop
    reduction_factor: Annotated[int, Field(ge=2, le=16)] = 3  # 1 in this many goes on per rung


def _bundle_size(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_BUNDLE):
        return v
    raise ValueError(f"{v!r}: give a number of trials from 1 to {MAX_BUNDLE}, or auto")


class Execution(_Strict):
    # default: as many as the resources allow
    max_concurrent: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = None
    retries: int = Field(1, ge=0, le=MAX_RETRIES)
    # Early stopping, off by default: a transfer study wants whole loss-vs-lr curves.
    scheduler: Literal["none", "asha"] = "none"
    asha: Asha = Asha()
    # Learning-rate bundles: up to this many trials of one cell (differing in lr and seed)
    # train together as one model with members (train.run_bundle); auto: as many as pay here.
    # A GPU feature: on CPUs, where batching costs more than it saves (benchmarks/results/
    # bundles-cpu.md), trials train one by one unless bundle_on_cpu asks for bundles anyway.
    bundle: Annotated[int | Literal["auto"], BeforeValidator(_bundle_size)] = 1
    bundle_on_cpu: bool = False

    @model_validator(mode="after")
    def _asha_settings_need_asha(self) -> Execution:
        if "asha" in self.model_fields_set and self.scheduler != "asha":
            raise ValueError("asha: settings of scheduler asha, but the scheduler is not asha")
        return self

    @model_validator(mode="after")
    def _bundle_on_cpu_needs_bundles(self) -> Execution:
        if self.bundle_on_cpu and self.bundle == 1:
            raise ValueError("bundle_on_cpu: a setting of bundles, but bundle is 1")
        return self

    @model_validator(mode="after")
    def _asha_stops_single_trials(self) -> Execution:
        if self.scheduler == "asha" and self.bundle not in (1, "auto"):
            raise ValueError(
                f"bundle {self.bundle} with scheduler asha: ASHA stops trials one at a time, a "
                "bundle trains several as one model; use one or the other"
            )
        return self


class Search(_Strict):
    """How the lrs of each cell are chosen: every lr of the grid, or an adaptive search.

    A cell is everything but lr and seed. A search chooses among the grid's own lrs (the grid's
    trials, with their ids): the grid says which lrs a cell may take and, by its step, how
    finely its optimum can be located. A cell may hold at most `trials_per_cell` lrs' worth of
    trials, `trials_per_cell` x its seeds.

    `optuna`: each cell gets its own Optuna study over its grid lrs, `trials_per_cell` lrs at
    every seed, `batch` of them per round.

    `transfer`: the cells that differ only in `axis` (width, say) are searched in order of it.
    The smallest is scanned over its grid range at one seed, about two octaves apart; each
    larger one starts around the lr* the smaller ones predict. Around a cell's best lr it runs
    the lrs the analysis' fit uses (two octaves either side): every seed next to the best lr,
    fewer further out; it follows the best lr when it moves, and adds seeds and lrs there until
    the 95 % interval of the cell's lr* is within +-`target_ci` octave or the window holds the
    whole grid at every seed.
    """

    method: Literal["grid", "optuna", "transfer"] = "grid"
    # the most trials per cell, in lrs at every seed: trials_per_cell x seeds
    trials_per_cell: Annotated[int, Field(ge=3, le=1000)] = 8
    sampler: Literal["tpe", "random"] = "tpe"
    batch: Annotated[int, Field(ge=1, le=64)] = 2  # lrs proposed per cell per round
    axis: Literal["width", "depth", "batch_size"] = "width"  # transfer: the axis it follows
    target_ci: Annotated[float, Field(gt=0, le=8)] = 0.25  # transfer: interval half-width

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> Search:
        given = self.model_fields_set
        wrong = {
            "grid": given - {"method"},
            "optuna": given & {"axis", "target_ci"},
            "transfer": given & {"sampler", "batch"},
        }[self.method]
        if wrong:
            raise ValueError(f"{', '.join(sorted(wrong))}: not a setting of method {self.method}")
        return self


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    results: str = Field("results", min_length=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(corpus="stdlib")
    train: TrainConfig
    grid: Grid
    resources: Resources = Resources()
    execution: Execution = Execution()
    search: Search = Search()

    @property
    def bundle_size(self) -> int:
        """How many trials of one cell train together: execution.bundle (`auto`: AUTO_BUNDLE)
        on GPUs, and on CPUs only with execution.bundle_on_cpu; never a bundle with ASHA, which
        stops trials one by one."""
        ex = self.execution
        on_gpu = self.train.device == "cuda" or self.resources.gpu > 0
        if ex.scheduler == "asha" or not (on_gpu or ex.bundle_on_cpu):
            return 1
        return AUTO_BUNDLE if ex.bundle == "auto" else ex.bundle

    @model_validator(mode="after")
    def _asha_without_transfer(self) -> SweepSpec:
        if self.execution.scheduler == "asha" and self.search.method == "transfer":
            raise ValueError(
                "execution.scheduler asha with search.method transfer: the transfer search "
                "places each lr from the fits of whole curves, which a stopped trial does not "
                "have; use one or the other"
            )
        return self

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> SweepSpec:
        micro = self.train.micro_batch
        uneven = [b for b in self.grid.batch_size if micro and b > micro and b % micro]
        if uneven:
            raise ValueError(
                f"train.micro_batch {micro} must divide every batch size; {uneven[0]} is not "
                "a multiple of it"
            )
        return self

    @model_validator(mode="after")
    def _heads_fit(self) -> SweepSpec:
        # The GPT (models/gpt.py) splits a width into width // head_dim heads of head_dim each,
        # or, below head_dim, into one head of the whole width; rotary position embeddings
        # rotate pairs of coordinates, so a head's size must be even. Left unchecked, width 24
        # with head_dim 16 silently trains a 16-wide attention. The MLP has no heads.
        m = self.model
        if m.kind != "gpt":
            return self
        if m.head_dim % 2:
            raise ValueError(
                f"model.head_dim {m.head_dim} must be even: the GPT's rotary position "
                "embeddings rotate pairs of coordinates"
            )
        uneven = [w for w in self.grid.width if w > m.head_dim and w % m.head_dim]
        if uneven:
            raise ValueError(
                f"model.head_dim {m.head_dim} must divide every width above it (the GPT splits "
                f"a width into heads of head_dim); grid.width {_few(uneven)} is not a "
                f"multiple of {m.head_dim}"
            )
        odd = [w for w in self.grid.width if w < m.head_dim and w % 2]
        if odd:
            raise ValueError(
                f"grid.width {_few(odd)} is below model.head_dim {m.head_dim}, so the GPT "
                "gives it one head of the whole width, which rotary position embeddings need "
                "even"
            )
        return self

    @model_validator(mode="after")
    def _tokens_fit(self) -> SweepSpec:
        # With train.tokens, steps x batch x seq_len is about the budget, which is bounded.
        if self.train.steps is None:
            return self
        steps, batch, seq_len = max(self.train.steps), max(self.grid.batch_size), self.model.seq_len
        if steps * batch * seq_len > MAX_TOKENS:
            raise ValueError(
                f"train.steps {steps} x grid.batch_size {batch} x model.seq_len {seq_len} = "
                f"{steps * batch * seq_len:.3g} tokens in one trial, over the limit of "
                f"{MAX_TOKENS:.0e}"
            )
        return self

    @model_validator(mode="after")
    def _not_too_many_trials(self) -> SweepSpec:
        check_trial_count(self, error=ValueError)
        return self


def _few(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")


# --------------------------------------------------------------------------- trial count


def trial_count(spec: SweepSpec) -> int:
    """How many trials the grid expands to, from the lengths of its axes alone (nothing is
    built). An upper bound: expand() drops duplicates, e.g. two token budgets that round to the
    same steps."""
    g = spec.grid
    points = sum(axis.n_points() for axis in g.optimizer.values())
    cells = len(spec.model.depth) * len(g.width) * len(g.batch_size) * len(g.seed)
    return cells * len(spec.train.horizons) * points


def check_trial_count(spec: SweepSpec, error: type[Exception] = SpecError) -> None:
    """Refuse a grid of more than MAX_TRIALS trials, before anything is built."""
    n = trial_count(spec)
    if n <= MAX_TRIALS:
        return
    g = spec.grid
    horizon = "steps" if spec.train.steps is not None else "tokens"
    points = ", ".join(f"{name} {axis.n_points():,}" for name, axis in g.optimizer.items())
    raise error(
        f"the grid has {n:,} trials, over the limit of {MAX_TRIALS:,} per grid file: "
        f"depth {len(spec.model.depth)} x width {len(g.width)} x batch_size "
        f"{len(g.batch_size)} x seed {len(g.seed)} x {horizon} {len(spec.train.horizons)} x "
        f"lr and settings ({points}). Split it into several grid files (by optimizer or by "
        "width, say) with the same results root, and report them together with "
        "`sweep report RESULTS_ROOT`"
    )


# --------------------------------------------------------------------------- one trial


class TrialSpec(_Strict):
    """Everything one trial needs. Flat, so that each field is a column of the store."""

    sweep: str
    model: Literal["gpt", "mlp"]
    width: int
    depth: int
    seq_len: int
    head_dim: int
    zero_init_out: bool
    attn_scale: Literal["sqrt", "mup"]
    mlp_context: int
    data: DataConfig
    data_fingerprint: str
    vocab_size: int
    batch_size: int
    steps: int
    schedule: str
    warmup: float
    warmdown: float
    grad_clip: float
    grad_accum: int = 1  # forward/backward passes per step (batch_size / micro_batch)
    log_every: int
    eval_every: int
    eval_batches: int
    coord_check: int
    seed: int
    optimizer: str
    lr: float
    lr_input: float = 1.0
    lr_hidden: float = 1.0
    lr_output: float = 1.0
    lr_vector: float = 1.0
    hparams: dict[str, Scalar] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where it runs; not part of the id

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    # Cached: planning asks each trial for its id several times (dedup, store lookup, dry-run
    # table), and hashing is most of the cost of a big grid. The fields are frozen, and
    # model_copy below forgets the cache, so it cannot go stale.
    @cached_property
    def trial_id(self) -> str:
        fields = self.model_dump(mode="json", exclude={"sweep", "device"})
        if self.grad_accum == 1:  # the default: ids from before the field existed still hold
            del fields["grad_accum"]
        # The data's identity is its fingerprint, not where it lies on one machine.
        for key in ("text", "shards", "val_shards"):
            fields["data"][key] = fields["data"][key] is not None
        fields["schema_version"] = SCHEMA_VERSION
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def cell(self) -> str:
        """Everything that defines the trial's cell, as a key: all but lr and seed (and the
        sweep's name and where it runs). A search plans per cell; a bundle is one cell's."""
        fields = self.model_dump(mode="json", exclude={"lr", "seed", "sweep", "device"})
        return json.dumps(fields, sort_keys=True)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> TrialSpec:
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("trial_id", None)  # the copy's fields may differ: hash it afresh
        return copy


# --------------------------------------------------------------------------- loading


class _DuplicateKeyError(yaml.MarkedYAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__()
        self.key, self.line, self.first_line = key, line, first_line


class _GridLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml's safe loader (libyaml's when installed: faster, and it limits nesting depth) that
    refuses a key given twice in one mapping, where YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, line, seen[key])
            except TypeError:  # unhashable: the base class refuses it with its own message
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _error_message(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid grid file"]
    errors = err.errors(include_url=False, include_input=False)
    for e in errors[:MAX_LISTED_ERRORS]:
        path = ".".join(_short(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "too_short" and e["loc"][-1:] == ("optimizer",):
            msg = "empty; name at least one optimizer"
        elif e["type"] == "too_short":
            msg = "an empty list; give at least one value"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS:,} more errors")
    return "\n".join(lines)


def _short(part: Any, limit: int = 60) -> str:
    """A path element as printed: a pasted-in key of a megabyte would drown the message."""
    s = str(part)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _check_size(data: Any, source: str) -> None:
    """Refuse data of more than MAX_VALUES values before validation walks it.

    Each use of a YAML alias is counted (validation walks it each time), and the walk stops at
    the limit, so it is fast even on a file whose aliases nest or refer to themselves.
    """
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise SpecError(
                f"{source}: more than {MAX_VALUES:,} values (a YAML alias counts at each use); "
                "a grid file holds at most a few thousand"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def parse_spec(data: Any, source: str = "grid") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a grid file is a YAML mapping (name:, train:, grid:, ...)")
    _check_size(data, source)
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_error_message(err, source)) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a grid file. Raises SpecError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such grid file")
    too_big = (
        f"{path}: a grid file may hold at most {MAX_GRID_BYTES:,} bytes; grid files are a few "
        "KB (write a long list of lrs as a log2 range, split a big grid into several files)"
    )
    if path.stat().st_size > MAX_GRID_BYTES:
        raise SpecError(too_big)
    with path.open("rb") as f:
        raw = f.read(MAX_GRID_BYTES + 1)  # never more, even if the file grew since stat()
    if len(raw) > MAX_GRID_BYTES:
        raise SpecError(too_big)
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_GridLoader)  # a safe loader
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file") from None
    except _DuplicateKeyError as err:
        raise SpecError(
            f"{path}: line {err.line}: key {_short(err.key)!r} is given twice (first on line "
            f"{err.first_line}); YAML would keep only the last, so remove one"
        ) from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:  # pure-Python PyYAML on deep nesting (libyaml refuses it itself)
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None
    return _absolute_paths(parse_spec(data, str(path)))


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Relative paths mean relative to where `sweep` runs; trials run in other folders."""

    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        return str(Path.cwd() / p)

    d = spec.data
    data = d.model_copy(
        update={k: absolute(getattr(d, k)) for k in ("text", "shards", "val_shards")}
    )
    return spec.model_copy(update={"data": data, "results": absolute(spec.results)})


# --------------------------------------------------------------------------- expansion


def _optimizer_points(axis: OptimizerAxis) -> Iterator[tuple[float, dict, dict]]:
    """(lr, role multipliers, other settings) for every combination of the block's axes."""
    settings = axis.settings()
    keys = list(settings)
    for lr in axis.lrs():
        for combo in itertools.product(*(settings[k] for k in keys)):
            point = dict(zip(keys, combo, strict=True))
            roles = {k: point.pop(k) for k in ROLE_LRS}
            yield lr, roles, point


def _steps_for(train: TrainConfig, batch_size: int, seq_len: int) -> list[int]:
    if train.steps is not None:
        return train.steps
    return [max(1, round(t / (batch_size * seq_len))) for t in train.tokens or []]


def expand(spec: SweepSpec, data_fingerprint: str) -> list[TrialSpec]:
    """The cartesian product of the grid's axes, in a stable order, without duplicates.

    Raises SpecError, before building anything, for a grid over MAX_TRIALS (a SweepSpec
    refuses one already; this covers specs made with model_copy or model_construct).
    """
    check_trial_count(spec)
    m, t, g = spec.model, spec.train, spec.grid
    # What every trial shares.
    shared = dict(
        sweep=spec.name,
        model=m.kind,
        seq_len=m.seq_len,
        head_dim=m.head_dim,
        zero_init_out=m.zero_init_out,
        mlp_context=m.mlp_context,
        data=spec.data,
        data_fingerprint=data_fingerprint,
        vocab_size=spec.data.resolved_vocab_size,
        schedule=t.schedule,
        warmup=t.warmup,
        warmdown=t.warmdown,
        grad_clip=t.grad_clip,
        log_every=t.log_every,
        eval_every=t.eval_every,
        eval_batches=t.eval_batches,
        coord_check=t.coord_check,
        device=t.device,
    )
    trials: dict[str, TrialSpec] = {}
    for opt_name, axis in g.optimizer.items():
        attn = m.attn_scale
        if attn == "auto":
            attn = "mup" if opt_name == "adamw-mup" else "sqrt"
        points = list(_optimizer_points(axis))
        for depth, width, batch, seed, (lr, roles, hparams) in itertools.product(
            m.depth, g.width, g.batch_size, g.seed, points
        ):
            grad_accum = max(1, batch // t.micro_batch) if t.micro_batch else 1
            for steps in _steps_for(t, batch, m.seq_len):
                trial = TrialSpec(
                    **shared,
                    width=width,
                    depth=depth,
                    attn_scale=attn,
                    batch_size=batch,
                    steps=steps,
                    grad_accum=grad_accum,
                    seed=seed,
                    optimizer=opt_name,
                    lr=lr,
                    hparams=hparams,  # validation copies it: no two trials share one dict
                    **roles,
                )
                trials.setdefault(trial.trial_id, trial)
    return list(trials.values())
