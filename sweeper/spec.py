"""The grid file: its pydantic schema, and its expansion into TrialSpecs.

A grid file names a study; `expand()` turns it into the cartesian product of its axes, one
`TrialSpec` per trial. A TrialSpec is flat and self-contained: the trainer needs nothing else,
and its `trial_id` is a stable hash of every field that changes the result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
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


class SpecError(ValueError):
    """A grid file that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


# --------------------------------------------------------------------------- the grid file


class ModelConfig(_Strict):
    kind: Literal["gpt", "mlp"] = "gpt"
    depth: PositiveInt | list[PositiveInt] = 2
    seq_len: PositiveInt = 128
    head_dim: PositiveInt = 64
    zero_init_out: bool = False
    # "auto": 1/d for adamw-mup (muP), 1/sqrt(d) for everything else.
    attn_scale: Literal["auto", "sqrt", "mup"] = "auto"
    # MLP proxy only: how many previous tokens it sees (one-hot, concatenated).
    mlp_context: PositiveInt = 8


class DataConfig(_Strict):
    """Exactly one source: the embedded corpus, a text file, or token shards."""

    corpus: Literal["stdlib"] | None = None
    text: str | None = None
    shards: str | None = None  # a glob of .bin files (nanoGPT raw uint16 or modded-nanogpt)
    val_shards: str | None = None  # a glob; default: hold out the tail of the training tokens
    vocab_size: PositiveInt | None = None  # default 256 for bytes, 50304 for shards
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
    steps: PositiveInt | list[PositiveInt] | None = None
    tokens: PositiveInt | list[PositiveInt] | None = None  # a budget; steps = tokens / (B * T)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0, lt=1)  # fraction of steps, linear from 0
    warmdown: float = Field(0.0, ge=0, le=1)  # fraction of steps at the end, linear to 0
    grad_clip: float = Field(0.0, ge=0)  # global norm; 0 = off
    # Sequences per forward/backward pass when a batch does not fit in memory: the gradient of
    # each batch is accumulated over batch_size / micro_batch passes. Default: the whole batch.
    micro_batch: PositiveInt | None = None
    log_every: PositiveInt = 10
    eval_every: PositiveInt = 50
    eval_batches: PositiveInt = 4
    coord_check: int = Field(0, ge=0)  # record mean |activation| per layer for this many steps
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> TrainConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of train.steps and train.tokens")
        if self.warmup + self.warmdown > 1:
            raise ValueError("train.warmup + train.warmdown must not exceed 1")
        return self


class Log2Range(_Strict):
    """`{log2: [lo, hi, step]}`: 2**lo, 2**(lo+step), ..., 2**hi (hi included)."""

    log2: tuple[float, float, float]

    @field_validator("log2")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        lo, hi, step = v
        if step <= 0 or hi < lo:
            raise ValueError("log2: [lo, hi, step] needs lo <= hi and step > 0")
        if (hi - lo) / step > 1000:
            raise ValueError("log2 range has more than 1000 points")
        return v

    def values(self) -> list[float]:
        lo, hi, step = self.log2
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        return [2.0 ** (lo + i * step) for i in range(n)]


PositiveFloat = Annotated[float, Field(gt=0)]


class OptimizerAxis(_Strict):
    """One optimizer's block under grid.optimizer: its lr range and its settings.

    Any setting given as a list becomes an axis of the grid.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    lr: PositiveFloat | list[PositiveFloat] | Log2Range
    lr_input: PositiveFloat | list[PositiveFloat] = 1.0
    lr_hidden: PositiveFloat | list[PositiveFloat] = 1.0
    lr_output: PositiveFloat | list[PositiveFloat] = 1.0
    lr_vector: PositiveFloat | list[PositiveFloat] = 1.0

    @model_validator(mode="after")
    def _scalar_settings(self) -> OptimizerAxis:
        for key, value in (self.model_extra or {}).items():
            for v in _as_list(value):
                if not isinstance(v, Scalar):
                    raise ValueError(f"setting {key!r} must be a number, string or bool, or a list")
        return self

    def lrs(self) -> list[float]:
        return self.lr.values() if isinstance(self.lr, Log2Range) else _as_list(self.lr)

    def settings(self) -> dict[str, list[Scalar]]:
        """Every setting other than lr as a list of values (an axis)."""
        out = {
            k: _as_list(getattr(self, k))
            for k in ("lr_input", "lr_hidden", "lr_output", "lr_vector")
        }
        out.update({k: _as_list(v) for k, v in sorted((self.model_extra or {}).items())})
        return out


class Grid(_Strict):
    width: list[PositiveInt] = Field(min_length=1)
    batch_size: list[PositiveInt] = Field(default=[32], min_length=1)
    seed: list[int] = Field(default=[0], min_length=1)
    optimizer: dict[str, OptimizerAxis] = Field(min_length=1)

    @field_validator("width", "batch_size", "seed", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return _as_list(v)

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
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _packs(cls, v: float) -> float:
        # Ray miscounts fractions that do not divide 1 (ray-project/ray#5902).
        if 0 < v < 1 and abs(round(1 / v) - 1 / v) > 1e-9:
            raise ValueError(f"a GPU fraction must divide 1 exactly (1/2, 1/4, ...), got {v}")
        if v > 1 and v != int(v):
            raise ValueError(f"more than one GPU must be a whole number, got {v}")
        return v


class Execution(_Strict):
    max_concurrent: PositiveInt | None = None  # default: as many as the resources allow
    retries: int = Field(1, ge=0)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    results: str = "results"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(corpus="stdlib")
    train: TrainConfig
    grid: Grid
    resources: Resources = Resources()
    execution: Execution = Execution()

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

    @property
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


# --------------------------------------------------------------------------- loading


def _error_message(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid grid file"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "grid") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a grid file is a YAML mapping (name:, train:, grid:, ...)")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_error_message(err, source)) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a grid file. Raises SpecError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such grid file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file") from None
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


def _optimizer_points(axis: OptimizerAxis) -> Iterator[dict[str, Any]]:
    settings = axis.settings()
    keys = list(settings)
    for lr in axis.lrs():
        for combo in itertools.product(*(settings[k] for k in keys)):
            point = dict(zip(keys, combo, strict=True))
            point["lr"] = lr
            yield point


def _steps_for(train: TrainConfig, batch_size: int, seq_len: int) -> list[int]:
    if train.steps is not None:
        return _as_list(train.steps)
    return [max(1, round(t / (batch_size * seq_len))) for t in _as_list(train.tokens)]


def expand(spec: SweepSpec, data_fingerprint: str) -> list[TrialSpec]:
    """The cartesian product of the grid's axes, in a stable order, without duplicates."""
    m, t = spec.model, spec.train
    trials: dict[str, TrialSpec] = {}
    for opt_name, axis in spec.grid.optimizer.items():
        for depth, width, batch, seed, point in itertools.product(
            _as_list(m.depth),
            spec.grid.width,
            spec.grid.batch_size,
            spec.grid.seed,
            list(_optimizer_points(axis)),
        ):
            point = dict(point)  # the same point recurs across widths, seeds, ...
            role_lrs = {
                k: point.pop(k) for k in ("lr_input", "lr_hidden", "lr_output", "lr_vector")
            }
            lr = point.pop("lr")
            attn = m.attn_scale
            if attn == "auto":
                attn = "mup" if opt_name == "adamw-mup" else "sqrt"
            for steps in _steps_for(t, batch, m.seq_len):
                trial = TrialSpec(
                    sweep=spec.name,
                    model=m.kind,
                    width=width,
                    depth=depth,
                    seq_len=m.seq_len,
                    head_dim=m.head_dim,
                    zero_init_out=m.zero_init_out,
                    attn_scale=attn,
                    mlp_context=m.mlp_context,
                    data=spec.data,
                    data_fingerprint=data_fingerprint,
                    vocab_size=spec.data.resolved_vocab_size,
                    batch_size=batch,
                    steps=steps,
                    schedule=t.schedule,
                    warmup=t.warmup,
                    warmdown=t.warmdown,
                    grad_clip=t.grad_clip,
                    grad_accum=max(1, batch // t.micro_batch) if t.micro_batch else 1,
                    log_every=t.log_every,
                    eval_every=t.eval_every,
                    eval_batches=t.eval_batches,
                    coord_check=t.coord_check,
                    seed=seed,
                    optimizer=opt_name,
                    lr=lr,
                    hparams=dict(point),
                    device=t.device,
                    **role_lrs,
                )
                trials.setdefault(trial.trial_id, trial)
    return list(trials.values())
