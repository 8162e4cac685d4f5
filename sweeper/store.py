"""The Parquet store: the one contract between the sweep and the analysis.

Layout of one sweep, under `<results>/<name>/`:

    grid.yaml                the grid file of the latest run (earlier ones in grid-history/)
    trials/<trial_id>.parquet    one row per trial (TRIALS below)
    steps/<trial_id>.parquet     one row per trial and log step (STEPS below)
    coord/<trial_id>.parquet     coord-check rows, only for trials that asked for them (COORD)
    <table>/part-<id>.parquet    many finished trials' rows, merged by `sweep compact`

Every file is written under a temporary name in `.incoming/` and renamed into place, steps and
coord before trials: a trial exists when, and only when, its row in `trials/` does, and then all
of its rows do. A glob such as `trials/*.parquet` (pandas, pyarrow, DuckDB, polars) sees whole
files only. One controller at a time runs a sweep or a compaction: it holds the lock `.lock`
(see `Store.lock`).

A trial's rows live in one place: its own files (`<table>/<trial_id>.parquet`), or one compacted
group (`<table>/part-<id>.parquet`, the same id in every table). Only finished trials (completed,
diverged or stopped) are compacted, and a sweep never writes a finished trial again, so a trial is
in a part or in its own files, never both. Should it be in both anyway (someone called `write_trial`
for a compacted trial), its own file is the newer write and wins in every read of this module, and
the next compaction drops the older copy from the part. A compaction is one transaction, journalled
in `.incoming/compact-<id>/` (see `Store.replace_with_part`): a crash at any point leaves every
trial readable exactly once through this module (a plain glob may miss some, never see one twice),
and the next `prepare` or `compact` finishes it.

A file that cannot be read (cut short, overwritten) is skipped with a warning naming it
(`DamagedFileWarning`); its trials count as not stored, so the next run trains them again (a
damaged compacted group is first set aside in `damaged/`, so that the re-run duplicates nothing).

Versions: STORE_HISTORY says what each version added. Files of an older version lack the columns
added since; `Store.read` fills them with nulls, and `prepare` and `compact` rewrite such files
in place with the new columns added as nulls (every stored value kept), so that a store a sweep
has touched holds files of one schema and any Parquet reader sees every column.

This module needs pyarrow only (no torch, no Ray), so `analysis` can use it on a laptop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

STORE_VERSION = 2

# What each version of the store added. Files keep the version that wrote them in their footer
# (`sweeper_store_version`) and in the trials column `store_version`; every reader in this
# package handles every version below. The README's "Store versions" list is this one.
STORE_HISTORY: dict[int, str] = {
    1: "tables trials, steps and coord, one file per trial and table",
    2: (
        "trials: grad_accum (also written, already, by the last code that called itself "
        "version 1: a version-1 file may or may not have it) and the provenance columns "
        "sweeper_version, torch_version, ray_version, python_version, cpu_model, gpu_name, "
        "git_commit, git_dirty; compacted files <table>/part-<id>.parquet (`sweep compact`), "
        "which versions before 2 do not understand"
    ),
}

# What the trainer's process records about itself (sweeper.train.provenance).
PROVENANCE_COLUMNS = (
    "sweeper_version",
    "torch_version",
    "ray_version",
    "python_version",
    "cpu_model",
    "gpu_name",
    "git_commit",
    "git_dirty",
)
# The columns each version added, per table: a file of an older version lacks them.
ADDED_COLUMNS: dict[int, dict[str, tuple[str, ...]]] = {
    2: {"trials": ("grad_accum", *PROVENANCE_COLUMNS)},
}

# (column, arrow type, meaning and unit). The README's schema section is this table.
TRIALS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("trial_id", pa.string(), "stable hash of every setting that changes the result"),
    ("sweep", pa.string(), "the grid file's name"),
    ("store_version", pa.int32(), "version of this schema"),
    ("status", pa.string(), "completed | diverged | stopped (early, by ASHA) | failed"),
    ("model", pa.string(), "proxy model: gpt | mlp"),
    ("width", pa.int64(), "model width (embedding dimension / hidden units)"),
    ("depth", pa.int64(), "transformer blocks / hidden layers"),
    ("seq_len", pa.int64(), "tokens per sequence"),
    ("head_dim", pa.int64(), "attention head dimension"),
    ("zero_init_out", pa.bool_(), "output projections of blocks initialised to zero"),
    ("attn_scale", pa.string(), "attention logit scale: sqrt (1/sqrt(d)) | mup (1/d)"),
    ("mlp_context", pa.int64(), "MLP proxy: previous tokens seen"),
    ("data", pa.string(), "data source (corpus:stdlib, text:PATH, shards:GLOB)"),
    ("data_fingerprint", pa.string(), "hash of the data's bytes"),
    ("vocab_size", pa.int64(), "vocabulary size"),
    ("batch_size", pa.int64(), "sequences per step"),
    ("steps", pa.int64(), "planned optimizer steps"),
    ("tokens", pa.int64(), "planned training tokens = steps * batch_size * seq_len"),
    ("schedule", pa.string(), "lr schedule: constant | linear | cosine"),
    ("warmup", pa.float64(), "warm-up, fraction of steps"),
    ("warmdown", pa.float64(), "linear decay to 0 over this final fraction of steps"),
    ("grad_clip", pa.float64(), "global gradient-norm clip (0 = off)"),
    ("grad_accum", pa.int64(), "forward/backward passes per step (batch_size / micro_batch)"),
    ("log_every", pa.int64(), "steps between rows of the steps table"),
    ("eval_every", pa.int64(), "steps between validation losses"),
    ("eval_batches", pa.int64(), "batches per validation loss"),
    ("coord_check", pa.int64(), "steps of coord-check data recorded (0 = none)"),
    ("seed", pa.int64(), "seed of initialisation and batch order"),
    ("optimizer", pa.string(), "optimizer name (sweeper.optim registry)"),
    ("lr", pa.float64(), "base learning rate"),
    ("lr_input", pa.float64(), "lr multiplier of the input layer"),
    ("lr_hidden", pa.float64(), "lr multiplier of hidden matrices"),
    ("lr_output", pa.float64(), "lr multiplier of the output layer"),
    ("lr_vector", pa.float64(), "lr multiplier of vectors (gains, biases)"),
    ("hparams", pa.string(), "other optimizer settings, JSON with sorted keys"),
    ("n_params", pa.int64(), "parameters of the model"),
    ("steps_done", pa.int64(), "steps actually taken (fewer if diverged or failed)"),
    ("tokens_seen", pa.int64(), "training tokens actually consumed"),
    ("initial_loss", pa.float64(), "train loss at step 0, nats/token"),
    (
        "final_train_loss",
        pa.float64(),
        "train loss at the last step, nats/token (null if diverged)",
    ),
    ("final_val_loss", pa.float64(), "validation loss after the last step, nats/token"),
    ("best_val_loss", pa.float64(), "lowest validation loss seen, nats/token"),
    ("out_rms_to_inf", pa.float64(), "output layer rms->inf norm after the last step"),
    ("hidden_rms_to_rms", pa.float64(), "largest hidden-layer rms->rms norm after the last step"),
    ("in_l1_to_rms", pa.float64(), "input layer l1->rms norm after the last step"),
    ("wall_time_s", pa.float64(), "seconds the trial ran, set-up included"),
    ("train_time_s", pa.float64(), "seconds spent in training steps"),
    ("device", pa.string(), "where it ran, e.g. cpu or cuda:NVIDIA H100"),
    ("host", pa.string(), "machine name"),
    ("sweeper_version", pa.string(), "version of sweeper that trained the trial"),
    ("torch_version", pa.string(), "version of torch that trained the trial"),
    ("ray_version", pa.string(), "version of Ray installed beside it (null: none)"),
    ("python_version", pa.string(), "version of Python that ran the trial"),
    ("cpu_model", pa.string(), "the machine's CPU model"),
    ("gpu_name", pa.string(), "the GPU the trial ran on (null on CPU)"),
    (
        "git_commit",
        pa.string(),
        "git commit of the sweeper checkout that ran (null: not a git checkout)",
    ),
    ("git_dirty", pa.bool_(), "that checkout's sweeper/ folder had uncommitted changes"),
    ("started_at", pa.timestamp("us", tz="UTC"), "start time"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "end time"),
    ("error", pa.string(), "why it failed or diverged (null when completed)"),
    ("spec", pa.string(), "the whole TrialSpec as JSON"),
]

STEPS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("trial_id", pa.string(), "the trial (trials.trial_id)"),
    ("step", pa.int64(), "optimizer steps taken"),
    ("tokens", pa.int64(), "training tokens consumed"),
    ("train_loss", pa.float64(), "mean train loss over the steps since the last row, nats/token"),
    ("val_loss", pa.float64(), "validation loss at this step, nats/token (null if not evaluated)"),
    ("lr", pa.float64(), "scheduled base lr at this step"),
    ("elapsed_s", pa.float64(), "seconds of training so far (evaluation excluded)"),
    ("tokens_per_s", pa.float64(), "training throughput since the last row"),
    ("out_rms_to_inf", pa.float64(), "output layer rms->inf norm of the weights"),
    ("hidden_rms_to_rms", pa.float64(), "largest hidden rms->rms norm of the weights"),
    ("in_l1_to_rms", pa.float64(), "input layer l1->rms norm of the weights"),
    ("upd_out_rms_to_inf", pa.float64(), "same norm of the output layer's last update"),
    ("upd_hidden_rms_to_rms", pa.float64(), "largest hidden rms->rms norm of the last update"),
    ("upd_in_l1_to_rms", pa.float64(), "input layer l1->rms norm of the last update"),
]

COORD_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("trial_id", pa.string(), "the trial (trials.trial_id)"),
    ("step", pa.int64(), "optimizer steps taken before the measurement"),
    ("layer_index", pa.int64(), "position of the layer from input to output"),
    ("layer", pa.string(), "layer name"),
    ("mean_abs", pa.float64(), "mean |activation| of the layer's output on the fixed batch"),
]


def _schema(columns: list[tuple[str, pa.DataType, str]]) -> pa.Schema:
    # The docs stay here, not in every file: a per-field doc in each footer makes reading
    # thousands of small files measurably slower.
    return pa.schema(
        [pa.field(name, typ) for name, typ, _ in columns],
        metadata={"sweeper_store_version": str(STORE_VERSION)},
    )


TRIALS_SCHEMA = _schema(TRIALS_COLUMNS)
STEPS_SCHEMA = _schema(STEPS_COLUMNS)
COORD_SCHEMA = _schema(COORD_COLUMNS)
TABLES = {"trials": TRIALS_SCHEMA, "steps": STEPS_SCHEMA, "coord": COORD_SCHEMA}
COLUMN_DOCS = {"trials": TRIALS_COLUMNS, "steps": STEPS_COLUMNS, "coord": COORD_COLUMNS}


def version_schema(table: str, version: int) -> pa.Schema:
    """The schema a file of `table` written by store version `version` has (at most)."""
    if not 1 <= version <= STORE_VERSION:
        raise ValueError(f"store versions are 1..{STORE_VERSION}, got {version}")
    later = {c for v, added in ADDED_COLUMNS.items() if v > version for c in added.get(table, ())}
    schema = TABLES[table]
    fields = [f for f in schema if f.name not in later]
    return pa.schema(fields, metadata={"sweeper_store_version": str(version)})


# In the order a summary lists them. A finished trial is any but failed: it is not run again.
STATUSES = ("completed", "diverged", "stopped", "failed")
FINISHED = ("completed", "diverged", "stopped")


def status_words(counts: Mapping[str, int]) -> str:
    """'12 completed, 3 diverged, 0 failed': every status, `stopped` only when there are any
    (only a sweep with early stopping has them)."""
    return ", ".join(
        f"{counts.get(s, 0)} {s}" for s in STATUSES if s != "stopped" or counts.get(s, 0)
    )


# The only names the store writes in its table folders: a trial's file, a compacted part, and
# (before version 2) a temporary file.
_TRIAL_FILE = re.compile(r"[0-9a-f]{16}\.parquet")
_PART_FILE = re.compile(r"part-[0-9a-f]{32}\.parquet")
_TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{32}\.parquet")
# A request from the controller that a running trial stop early (`request_stop`).
_STOP_FILE = re.compile(r"stop-[0-9a-f]{16}")
# A compaction's journal: .incoming/compact-<id>/ holds the new part of each table and, once
# committed, COMMIT.json (what the part replaces).
_GROUP_DIR = re.compile(r"compact-([0-9a-f]{32})")
_COMMIT = "COMMIT.json"
_COMMIT_TMP = ".COMMIT.tmp"
_INCOMING = ".incoming"
_DAMAGED = "damaged"
_LOCK = ".lock"
# The steps and coord parts are written before the trials part (a trial exists when its trials
# row does, and then all its rows do).
_MOVE_ORDER = ("steps", "coord", "trials")
# A part's row groups: large enough for fast scans, small enough to skip by trial_id statistics.
_PART_ROW_GROUP = 128 * 1024
# Reads retried when a file vanished under them (a compaction finishing in another process).
_READ_ATTEMPTS = 3


class StoreError(OSError):
    """The store cannot be written (full disk, read-only, not a folder); the message says where."""


class StoreLocked(RuntimeError):
    """Another controller is running a sweep on this store; the message names it."""

    def __init__(self, store_path: str, holder: str):
        super().__init__(
            f"another `sweep run` is running this sweep ({holder}); wait for it to finish or "
            f"stop it, then run again. Lock: {store_path}/{_LOCK}"
        )


class DamagedFileWarning(UserWarning):
    """Stored files that cannot be read were skipped."""


@dataclass
class TrialResult:
    """What one trial hands to the store: a summary and its rows."""

    status: str
    summary: dict[str, Any] = field(default_factory=dict)  # TRIALS columns beyond the spec's
    steps: list[dict[str, Any]] = field(default_factory=list)  # STEPS rows without trial_id
    coord: list[dict[str, Any]] = field(default_factory=list)  # COORD rows without trial_id
    # PROVENANCE_COLUMNS: what ran the trial (sweeper.train.provenance); empty -> nulls
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Maintenance:
    """What `Store.maintain` did."""

    compactions_finished: int = 0  # interrupted compactions completed (or undone if uncommitted)
    set_aside: tuple[str, ...] = ()  # damaged compacted files moved to damaged/
    upgraded: int = 0  # files of older versions rewritten with the current schema


def _now() -> datetime:
    return datetime.now(timezone.utc)


def trial_row(spec: Any, result: TrialResult) -> dict[str, Any]:
    """Flatten a TrialSpec and its result into one TRIALS row."""
    cfg = spec.model_dump(mode="json")
    row: dict[str, Any] = {name: None for name, _, _ in TRIALS_COLUMNS}
    for name in row:
        if name in cfg:
            row[name] = cfg[name]
    row.update(
        trial_id=spec.trial_id,
        store_version=STORE_VERSION,
        status=result.status,
        data=spec.data.describe(),
        tokens=spec.tokens,
        hparams=json.dumps(spec.hparams, sort_keys=True),
        host=socket.gethostname(),
        spec=spec.model_dump_json(),
    )
    unknown = set(result.summary) - set(row)
    if unknown:
        raise ValueError(f"summary has fields the store does not know: {sorted(unknown)}")
    unknown = set(result.provenance) - set(PROVENANCE_COLUMNS)
    if unknown:
        raise ValueError(f"provenance has fields the store does not know: {sorted(unknown)}")
    row.update(result.summary)
    row.update(result.provenance)
    if result.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {result.status!r}")
    for key in ("started_at", "finished_at"):
        if row[key] is None:
            row[key] = _now()
    return row


@dataclass
class _Group:
    """A committed compaction, finished or not: its part replaces the files in `replaces`."""

    folder: str  # .incoming/compact-<id>, where its parts wait until moved into place
    part: str  # part-<id>: the parts' name (without .parquet) in every table folder
    tables: tuple[str, ...]  # the tables it has a part in
    replaces: tuple[str, ...]  # paths relative to the store, trials files first


@dataclass
class _View:
    """Which files hold the store's rows at one moment.

    own: table -> {file name less .parquet: path} for files other than parts, that is, trials'
        own files (named by trial id) and anything else found there (read as it is).
    parts: table -> {part name: path}; the path is in `.incoming/compact-<id>/` for a committed
        compaction that has not moved it into place yet.
    """

    own: dict[str, dict[str, str]]
    parts: dict[str, dict[str, str]]
    sizes: dict[str, int]  # bytes of each listed file


class NoStore(LookupError):
    """A path that holds no sweep; the message says what was expected."""


def find_stores(path: str | Path) -> list[Store]:
    """The sweeps at `path`, a local path or a URI (s3://..., file://...): a sweep's folder
    (holding `trials/`), or a results root holding such folders. Raises NoStore."""
    text = str(path)
    try:
        if "://" in text:
            fs, base = pafs.FileSystem.from_uri(text)
            root = text.rstrip("/")
        else:
            fs, base = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            root = base
    except (pa.ArrowException, RuntimeError, OSError) as err:  # unknown scheme, symlink loop
        raise NoStore(f"{text}: {err}") from None

    def is_dir(p: str) -> bool:
        return fs.get_file_info(p).type == pafs.FileType.Directory

    base = base.rstrip("/")
    try:
        fs.get_file_info(base)
    except OSError as err:  # an object store that does not answer
        raise NoStore(f"{text}: cannot reach it: {err}") from None
    if not is_dir(base):
        kind = (
            "not a folder"
            if fs.get_file_info(base).type == pafs.FileType.File
            else "no such folder"
        )
        raise NoStore(f"{text}: {kind} (give a sweep's folder or a results root)")
    if is_dir(f"{base}/trials"):
        parent, name = root.rsplit("/", 1)
        return [Store(parent or "/", name)]
    names = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(base))
        if info.type == pafs.FileType.Directory and is_dir(f"{info.path}/trials")
    )
    if not names:
        raise NoStore(
            f"{text}: no trials stored (expected {text}/trials/ or {text}/<sweep>/trials/)"
        )
    return [Store(root, name) for name in names]


class Store:
    """One sweep's folder of Parquet tables. `root` is a local path or a pyarrow URI (s3://...)."""

    def __init__(self, root: str | Path, name: str):
        root = str(root)
        try:
            if "://" in root:
                self.fs, base = pafs.FileSystem.from_uri(root)
            else:
                # absolute, so that workers running in other folders write to the same place
                root = base = str(Path(root).resolve())
                self.fs = pafs.LocalFileSystem()
        except (pa.ArrowException, RuntimeError, OSError) as err:  # unknown scheme, symlink loop
            raise StoreError(f"{root}: cannot be a store: {err}") from None
        self.root = root  # what a worker passes to Store() to reach the same folder
        self.name = name
        self.path = f"{base.rstrip('/')}/{name}"

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    @property
    def location(self) -> str:
        """The sweep's folder as the user names it: a local path or a URI (s3://bucket/x/name)."""
        return f"{self.root.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        """On a local (or mounted) file system: the only kind with a lock, hence compaction."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _dir(self, table: str) -> str:
        return f"{self.path}/{table}"

    def _rel(self, path: str) -> str:
        return path.removeprefix(f"{self.path}/")

    # Every change of a name in the store goes through these three, so that tests can stop a
    # compaction between any two of them (as a crash would).
    def _move(self, src: str, dst: str) -> None:
        self.fs.move(src, dst)

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def _remove_folder(self, path: str) -> None:
        self.fs.delete_dir(path)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _sync(self, path: str) -> None:
        """Make `path` (a file, or a folder's entries) durable before a later step relies on
        it: a power cut after a compaction deleted trials' own files must find their part."""
        if not self.is_local:
            return  # object stores make a write durable before they acknowledge it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_atomic(self, table: str, file_name: str, tbl: pa.Table) -> None:
        directory, incoming = self._dir(table), f"{self.path}/{_INCOMING}"
        tmp = f"{incoming}/.tmp-{uuid.uuid4().hex}.parquet"
        try:
            self.fs.create_dir(directory, recursive=True)
            self.fs.create_dir(incoming, recursive=True)
            pq.write_table(tbl, tmp, filesystem=self.fs)
            self._move(tmp, f"{directory}/{file_name}")
        except OSError as err:  # pyarrow's errors are OSErrors too
            with contextlib.suppress(OSError):  # a torn temporary file only takes space
                self.fs.delete_file(tmp)
            raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err

    # ----------------------------------------------------------------------- writing

    def check_usable(self) -> None:
        """Raise StoreError, writing nothing, when the store's folder cannot be made or written:
        a file where a folder should be, a folder this user cannot write, an object store that
        does not answer or has no such bucket."""
        if not self.is_local:
            bucket = self.path.split("/", 1)[0]
            try:
                found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
                self.fs.get_file_info(self.path)
            except OSError as err:
                raise StoreError(f"cannot reach the store {self.location}: {err}") from None
            if not found:
                raise StoreError(f"{self.location}: there is no bucket {bucket!r}; create it first")
            return
        path = Path(self.path)
        nearest = next(p for p in [path, *path.parents] if p.exists())
        for folder in [nearest, *(path / t for t in (*TABLES, _INCOMING) if (path / t).exists())]:
            if not folder.is_dir():
                raise StoreError(f"cannot use {self.path} as a store: {folder} is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StoreError(f"cannot write to {folder}: it is read-only for this user")

    def prepare(self, grid_text: str | None = None) -> None:
        """Create the folder, put the store in order (`maintain`), keep the grid file.

        Call while holding `lock()`, before starting trials.
        """
        self.maintain()
        if grid_text is None:
            return
        digest = hashlib.sha256(grid_text.encode()).hexdigest()[:12]
        try:  # the history first: grid.yaml is replaced only once its old text is kept
            self.fs.create_dir(f"{self.path}/grid-history", recursive=True)
            for target in (f"{self.path}/grid-history/{digest}.yaml", f"{self.path}/grid.yaml"):
                with self.fs.open_output_stream(target) as out:
                    out.write(grid_text.encode())
        except OSError as err:
            raise StoreError(
                f"cannot write the grid file into {self.location}: {_reason(err)}"
            ) from err

    def maintain(self, upgrade: bool = True) -> Maintenance:
        """Put the store in order, in this order; call while holding `lock()`.

        1. Finish a compaction that a crash interrupted (or undo one that had not committed).
        2. Drop what an interrupted run left half-written: temporary files, and the steps and
           coord files of trials whose own `trials/` file never came. Only names the store
           itself writes are removed, so a file someone else put here is never touched.
        3. Move compacted groups whose trials or steps part cannot be read to `damaged/`: their
           trials count as not stored (`finished_ids`), and the re-run must not find the
           readable half of the group beside its new rows.
        4. Rewrite files of older store versions with the current schema (`upgrade`; left
           to the caller with `upgrade=False`: a compaction rewrites most of them anyway).
        """
        try:
            self.fs.create_dir(self.path, recursive=True)
            finished = self._finish_compactions()
            self._drop_leftovers()
            set_aside = self._set_aside_damaged_parts()
            upgraded = self.upgrade() if upgrade else 0
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err
        return Maintenance(finished, set_aside, upgraded)

    def _drop_leftovers(self) -> None:
        own_trials = {
            f.base_name for f in self._files("trials") if _TRIAL_FILE.fullmatch(f.base_name)
        }
        for table in TABLES:
            for info in self._files(table, include_hidden=True):
                name = info.base_name
                if _TEMP_FILE.fullmatch(name) or (
                    table != "trials" and _TRIAL_FILE.fullmatch(name) and name not in own_trials
                ):
                    self._delete(info.path)
        incoming = pafs.FileSelector(f"{self.path}/{_INCOMING}", allow_not_found=True)
        for info in self.fs.get_file_info(incoming):
            if _TEMP_FILE.fullmatch(info.base_name) or _STOP_FILE.fullmatch(info.base_name):
                self._delete(info.path)

    def upgrade(self) -> int:
        """Rewrite every file of an older version with the current schema, in place and
        atomically: every value kept (`store_version` included: it says which code wrote the
        row), the columns added since as nulls. Returns how many files were rewritten.

        Call while holding `lock()`. Only the tables that gained columns are looked at (one
        footer read per file), and only files the store names (a trial's, a part): a user's
        own file, a damaged file, or one of a newer version (more columns) is left as it is.
        """
        rewritten = 0
        for table in sorted({t for added in ADDED_COLUMNS.values() for t in added}):
            schema = TABLES[table]
            for info in self._files(table):
                name = info.base_name
                if not (_TRIAL_FILE.fullmatch(name) or _PART_FILE.fullmatch(name)):
                    continue
                try:
                    if not _needs_upgrade(pq.read_schema(info.path, filesystem=self.fs), schema):
                        continue
                    tbl = pq.read_table(info.path, filesystem=self.fs)
                except (OSError, pa.ArrowException):
                    continue  # damaged: the readers name it
                self._write_atomic(table, name, _conform(tbl, schema))
                rewritten += 1
        return rewritten

    def holder(self) -> str | None:
        """Who holds `lock()` now, in words, or None. Writes nothing."""
        if not self.is_local:
            return None
        import fcntl

        try:
            fd = os.open(f"{self.path}/{_LOCK}", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        finally:
            os.close(fd)  # closing releases a lock taken here

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Be the one controller of this sweep while the block runs.

        Raises StoreLocked naming the controller that holds it. The lock is an advisory
        `flock` on `<store>/.lock`, so the kernel releases it when its holder dies, even by
        SIGKILL: a killed controller's lock is simply taken over. The file itself stays (empty
        between runs) and says who holds it. Stores on object storage have no lock.
        """
        if not self.is_local:
            yield
            return
        import fcntl

        path = f"{self.path}/{_LOCK}"
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                raise StoreLocked(self.path, holder) from None
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": _now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except OSError as err:  # a full disk: the lock is held, only its note is missing
                raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # before the unlock: an empty file means "nobody"
        finally:
            os.close(fd)

    def write_trial(self, spec: Any, result: TrialResult) -> None:
        """Store one trial atomically; a trial stored before under the same id is replaced.

        A sweep only ever writes trials that are not finished, which are never in a compacted
        part. Should a compacted trial be written again anyway, its new files win in every
        read of this module and the next compaction drops the part's copy; plain Parquet
        readers see both copies until then.
        """
        tid = spec.trial_id
        row = trial_row(spec, result)
        steps = [{"trial_id": tid, **r} for r in result.steps]
        coord = [{"trial_id": tid, **r} for r in result.coord]
        self._write_atomic("steps", f"{tid}.parquet", pa.Table.from_pylist(steps, STEPS_SCHEMA))
        if coord:
            self._write_atomic("coord", f"{tid}.parquet", pa.Table.from_pylist(coord, COORD_SCHEMA))
        self._write_atomic("trials", f"{tid}.parquet", pa.Table.from_pylist([row], TRIALS_SCHEMA))
        if result.status == "stopped":
            with contextlib.suppress(OSError):  # a stale request is dropped by `prepare` anyway
                self._delete(self._stop_file(tid))

    # ----------------------------------------------------------------------- early stopping

    def _stop_file(self, trial_id: str) -> str:
        return f"{self.path}/{_INCOMING}/stop-{trial_id}"

    def request_stop(self, trial_id: str) -> None:
        """Ask a running trial to stop early (ASHA's decision): the trial sees it at its next
        log row, stores its rows with status `stopped`, and ends. The store is the one place
        the controller and every worker reach, on one machine or a cluster."""
        self.fs.create_dir(f"{self.path}/{_INCOMING}", recursive=True)
        with self.fs.open_output_stream(self._stop_file(trial_id)):
            pass

    def stop_requested(self, trial_id: str) -> bool:
        return self._exists(self._stop_file(trial_id))

    # ----------------------------------------------------------------------- compaction

    def replace_with_part(self, tables: dict[str, pa.Table], replaces: list[str]) -> str | None:
        """One transaction: write `tables` as a compacted group (`<table>/part-<id>.parquet`,
        one id for all) and delete the files `replaces` (paths relative to the store). Returns
        the part's name, or None when `tables` is empty (then it only deletes). Call while
        holding `lock()`; `sweeper.compact` decides what goes in.

        1. The parts are written to `.incoming/compact-<id>/` and synced; nothing visible
           changed yet, and a crash here leaves only that folder, which `maintain` removes.
        2. COMMIT.json (what the group replaces) is written under a temporary name and renamed:
           the commit point. From here the readers of this module see the group in place of
           what it replaces, and `maintain` finishes it after a crash.
        3. The replaced files are deleted (trials files first), then the parts are moved into
           the table folders (steps and coord before trials), then the journal goes.

        Step 3 deletes before it moves on purpose. A reader that globs `trials/*.parquet`
        meanwhile sees fewer trials than are stored, as it would in the middle of a sweep;
        moving first would show it the same trials twice, which no reader can tell from
        data, and which would bias every count and mean taken across trials.
        """
        gid = uuid.uuid4().hex
        part = f"part-{gid}"
        incoming = f"{self.path}/{_INCOMING}"
        folder = f"{incoming}/compact-{gid}"
        order = {"trials": 0, "steps": 1, "coord": 2}
        replaces = sorted(replaces, key=lambda rel: (order.get(rel.split("/", 1)[0], 3), rel))
        try:
            self.fs.create_dir(folder, recursive=True)
            for table, tbl in tables.items():
                staged, tmp = (
                    f"{folder}/{table}.parquet",
                    f"{folder}/.tmp-{uuid.uuid4().hex}.parquet",
                )
                pq.write_table(
                    _conform(tbl, TABLES[table]),
                    tmp,
                    filesystem=self.fs,
                    row_group_size=_PART_ROW_GROUP,
                )
                self._move(tmp, staged)
                self._sync(staged)
                written = pq.read_metadata(staged, filesystem=self.fs).num_rows
                if written != tbl.num_rows:  # never delete what the part would not hold
                    raise OSError(f"{table} part holds {written} rows, expected {tbl.num_rows}")
            journal = {
                "store_version": STORE_VERSION,
                "part": part,
                "tables": [t for t in _MOVE_ORDER if t in tables],
                "replaces": replaces,
            }
            with self.fs.open_output_stream(f"{folder}/{_COMMIT_TMP}") as out:
                out.write(json.dumps(journal, indent=0).encode())
            self._sync(f"{folder}/{_COMMIT_TMP}")
            self._move(f"{folder}/{_COMMIT_TMP}", f"{folder}/{_COMMIT}")  # the commit point
            self._sync(folder)
            self._sync(incoming)
        except OSError as err:
            # Nothing outside the folder has changed, even if the commit rename went through.
            with contextlib.suppress(OSError):
                self._discard_staging(folder)
            raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err
        group = _Group(folder, part, tuple(journal["tables"]), tuple(replaces))
        try:
            self._roll_forward(group)
        except OSError as err:
            raise StoreError(
                f"a compaction of {self.path} stopped half-way ({_reason(err)}); nothing is "
                "lost: the next `sweep compact` or `sweep run` finishes it"
            ) from err
        return part if tables else None

    def _groups(self, strict: bool) -> list[_Group]:
        """The committed compactions still in `.incoming/` (normally none).

        A journal that cannot be read is an error when `strict` (maintenance must not guess
        whether its deletes began) and is ignored with a warning otherwise (readers).
        """
        selector = pafs.FileSelector(f"{self.path}/{_INCOMING}", allow_not_found=True)
        groups = []
        for info in self.fs.get_file_info(selector):
            match = _GROUP_DIR.fullmatch(info.base_name)
            if info.type != pafs.FileType.Directory or not match:
                continue
            path = f"{info.path}/{_COMMIT}"
            try:
                with self.fs.open_input_stream(path) as src:
                    journal = json.loads(src.read())
                tables = tuple(journal["tables"])
                replaces = tuple(journal["replaces"])
            except FileNotFoundError:
                continue  # not committed: invisible
            except (OSError, ValueError, KeyError, TypeError) as err:
                message = f"cannot read the compaction journal {self._rel(path)}: {err}"
                if strict:
                    raise StoreError(f"{message}; move it away by hand to go on") from err
                warnings.warn(message, DamagedFileWarning, stacklevel=3)
                continue
            groups.append(_Group(info.path, f"part-{match.group(1)}", tables, replaces))
        return groups

    def _finish_compactions(self) -> int:
        """Finish each committed compaction left in `.incoming/`; remove uncommitted ones."""
        selector = pafs.FileSelector(f"{self.path}/{_INCOMING}", allow_not_found=True)
        staged = [
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory and _GROUP_DIR.fullmatch(info.base_name)
        ]
        committed = {g.folder: g for g in self._groups(strict=True)}
        for folder in staged:
            if folder in committed:
                self._roll_forward(committed[folder])
            else:
                self._discard_staging(folder)
        return len(staged)

    def _roll_forward(self, group: _Group) -> None:
        """Step 3 of `replace_with_part`; every step can be repeated, so a crash anywhere in it
        is finished by running it again."""
        for rel in group.replaces:
            self._delete(f"{self.path}/{rel}")
        for table in _MOVE_ORDER:
            staged = f"{group.folder}/{table}.parquet"
            if table in group.tables and self._exists(staged):
                self.fs.create_dir(self._dir(table), recursive=True)
                self._move(staged, f"{self._dir(table)}/{group.part}.parquet")
        for table in _MOVE_ORDER:  # the moves durable before the journal goes
            if self._exists(self._dir(table)):
                self._sync(self._dir(table))
        self._delete(f"{group.folder}/{_COMMIT}")
        self._remove_folder(group.folder)

    def _discard_staging(self, folder: str) -> None:
        """Remove an uncommitted compaction's folder: only names a compaction writes there."""
        mine = {f"{t}.parquet" for t in TABLES} | {_COMMIT_TMP}
        selector = pafs.FileSelector(folder, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.base_name in mine or _TEMP_FILE.fullmatch(info.base_name):
                self._delete(info.path)
        if not self.fs.get_file_info(selector):
            self._remove_folder(folder)

    def _set_aside_damaged_parts(self) -> tuple[str, ...]:
        """Move each compacted group whose trials or steps part is missing or unreadable to
        `damaged/<part>/` (see `maintain`); returns the files moved, relative to the store."""
        names = {
            f.base_name.removesuffix(".parquet")
            for table in TABLES
            for f in self._files(table)
            if _PART_FILE.fullmatch(f.base_name)
        }
        moved: list[str] = []
        for part in sorted(names):
            trials = f"{self._dir('trials')}/{part}.parquet"
            steps = f"{self._dir('steps')}/{part}.parquet"
            if self._rows_readable(trials) and self._footer_readable(steps):
                continue
            self.fs.create_dir(f"{self.path}/{_DAMAGED}/{part}", recursive=True)
            for table in TABLES:
                path = f"{self._dir(table)}/{part}.parquet"
                if self._exists(path):
                    self._move(path, f"{self.path}/{_DAMAGED}/{part}/{table}.parquet")
                    moved.append(f"{table}/{part}.parquet")
        if moved:
            warnings.warn(
                _damaged_message(moved) + f"; set aside in {self.path}/{_DAMAGED}/, their "
                "trials will run again",
                DamagedFileWarning,
                stacklevel=3,
            )
        return tuple(moved)

    def _rows_readable(self, path: str) -> bool:
        """The trials columns that `finished_ids` reads can be read from `path`."""
        try:
            self._scan([path], TRIALS_SCHEMA, ["trial_id", "status"])
            return True
        except (OSError, pa.ArrowException):
            return False

    def _footer_readable(self, path: str | None, table: str = "steps") -> bool:
        """Whether the file's footer reads and its schema is the table's (columns of an
        older version may be missing; none may have another type, trial_id must be there)."""
        if path is None:
            return False
        try:
            have = pq.read_schema(path, filesystem=self.fs)
        except (OSError, pa.ArrowException):
            return False
        return _fits(have, TABLES[table])

    # ----------------------------------------------------------------------- reading

    def _files(self, table: str, include_hidden: bool = False) -> list[pafs.FileInfo]:
        """The table's files the store wrote (a trial's, a part): any other file in the folder
        is someone else's and never read. With include_hidden, temporary files too."""
        selector = pafs.FileSelector(self._dir(table), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as err:  # a file where the folder should be
            raise StoreError(f"cannot read the store {self.location}: {err}") from None
        return [
            f
            for f in infos
            if f.type == pafs.FileType.File
            and (
                _TRIAL_FILE.fullmatch(f.base_name)
                or _PART_FILE.fullmatch(f.base_name)
                or (include_hidden and f.base_name.startswith("."))
            )
        ]

    def _view(self) -> _View:
        """The files holding the store's rows now (see `_View`).

        The journals are listed before the table folders: a compaction that finishes in
        between then shows its parts in the folders (and its replaced files are gone, or
        left out by the journal), never neither. What moved after the listing makes a read
        fail with "not found", and `_read` then starts again.
        """
        groups = self._groups(strict=False)
        replaced = {f"{self.path}/{rel}" for g in groups for rel in g.replaces}
        view = _View({}, {}, {})
        for table in TABLES:
            own, parts = view.own.setdefault(table, {}), view.parts.setdefault(table, {})
            for info in self._files(table):
                if info.path in replaced:
                    continue
                name = info.base_name.removesuffix(".parquet")
                (parts if _PART_FILE.fullmatch(info.base_name) else own)[name] = info.path
                view.sizes[info.path] = info.size
            for g in groups:
                if table in g.tables and g.part not in parts:
                    parts[g.part] = f"{g.folder}/{table}.parquet"
        return view

    def _part_ids(self, view: _View) -> set[str]:
        """Trial ids held by the trials parts (damaged ones left out)."""
        if not view.parts["trials"]:
            return set()
        tbl, _, _ = self._scan_files(list(view.parts["trials"].values()), "trials", ["trial_id"])
        return set(tbl["trial_id"].to_pylist())

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """A whole table (empty, with the right columns, when nothing is stored yet).

        Every column of the current version, whatever version wrote each file (the columns
        it lacks are null). Each trial's rows once, wherever they are (own files or a part).
        Files that cannot be read are left out with one DamagedFileWarning naming them.
        """
        tbl, damaged = self._read(table, columns)
        if damaged:
            warnings.warn(_damaged_message(damaged), DamagedFileWarning, stacklevel=2)
        return tbl

    def _read(self, table: str, columns: list[str] | None) -> tuple[pa.Table, list[str]]:
        for _ in range(_READ_ATTEMPTS):
            tbl, damaged, vanished = self._read_view(self._view(), table, columns)
            if not vanished:
                break
        return tbl, damaged

    def _read_view(
        self, view: _View, table: str, columns: list[str] | None, source: bool = False
    ) -> tuple[pa.Table, list[str], bool]:
        """(rows, damaged files, whether a file vanished meanwhile). With `source`, a last
        column `__filename` says which file each row came from."""
        want = list(columns) if columns is not None else TABLES[table].names
        extra = ["__filename"] if source else []
        own_ids = set(view.own["trials"])
        own = view.own[table]
        parts = list(view.parts[table].values())
        if parts and table != "trials" and any(name not in own_ids for name in own):
            # Steps or coord files of a trial with no trials file of its own: a crashed write
            # (kept, as before compaction existed), or a stale copy of a compacted trial,
            # whose rows the part holds: left out.
            compacted = self._part_ids(view)
            own = {n: p for n, p in own.items() if n in own_ids or n not in compacted}
        pieces, damaged, vanished = [], [], False
        if own:
            tbl, bad, gone = self._scan_files(list(own.values()), table, want + extra)
            pieces.append(tbl)
            damaged += bad
            vanished |= gone
        if parts:
            # A trial with files of its own is newer than its copy in a part (see write_trial):
            # the part's rows of it are left out.
            cols = want + extra + ([] if "trial_id" in want or not own_ids else ["trial_id"])
            tbl, bad, gone = self._scan_files(parts, table, cols)
            if own_ids and tbl.num_rows:
                newer = pc.is_in(tbl["trial_id"], pa.array(sorted(own_ids), pa.string()))
                tbl = tbl.filter(pc.invert(newer))
            pieces.append(tbl.select(want + extra))
            damaged += bad
            vanished |= gone
        if not pieces:
            return _empty(TABLES[table], want + extra), damaged, vanished
        return pa.concat_tables(pieces), damaged, vanished

    def _scan_files(
        self, files: list[str], table: str, columns: list[str]
    ) -> tuple[pa.Table, list[str], bool]:
        """Read `files`; (rows, damaged files, whether a file vanished meanwhile)."""
        schema = TABLES[table]
        try:  # the usual case, all files whole and of this table: one dataset scan
            scan = columns if "trial_id" in columns else [*columns, "trial_id"]
            tbl = self._scan(files, schema, scan)
            if tbl["trial_id"].null_count == 0:  # a file of another schema reads as nulls
                return tbl.select(columns), [], False
        except (OSError, pa.ArrowException):
            pass
        good, damaged, vanished = [], [], False
        for path in files:
            try:
                if not _fits(pq.read_schema(path, filesystem=self.fs), schema):
                    raise pa.ArrowInvalid("not this table's schema")
                good.append(self._scan([path], schema, columns))
            except (OSError, pa.ArrowException):
                if self._exists(path):
                    damaged.append(self._rel(path))
                else:
                    vanished = True
        if not good:
            return _empty(schema, columns), damaged, vanished
        return pa.concat_tables(good), damaged, vanished

    def _scan(self, files: list[str], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
        dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=columns)

    def trial_ids(self) -> set[str]:
        """Every stored trial, whatever its status (names only: no file is read but parts)."""
        view = self._view()
        return set(view.own["trials"]) | self._part_ids(view)

    def finished_ids(self) -> set[str]:
        """Trials that need not run again: completed, diverged or stopped (failed ones are
        retried).

        A trial whose trials or steps file is damaged is not finished: it runs again and its
        files are replaced (a damaged compacted group is set aside first, see `maintain`).
        """
        for _ in range(_READ_ATTEMPTS):
            finished, damaged, vanished = self._finished(self._view())
            if not vanished:
                break
        if damaged:
            warnings.warn(
                _damaged_message(damaged) + "; their trials will run again",
                DamagedFileWarning,
                stacklevel=2,
            )
        return finished

    def _finished(self, view: _View) -> tuple[set[str], list[str], bool]:
        tbl, damaged, vanished = self._read_view(
            view, "trials", ["trial_id", "status"], source=True
        )
        part_of = {path: name for name, path in view.parts["trials"].items()}
        # the steps file each finished trial needs: its own, or its group's part
        need: dict[str, tuple[str | None, str]] = {}
        for tid, status, src in zip(*(tbl[c].to_pylist() for c in tbl.column_names), strict=True):
            if status == "failed":
                continue
            part = part_of.get(src)
            if part is None:
                need[tid] = (view.own["steps"].get(tid), f"steps/{tid}.parquet")
            else:
                need[tid] = (view.parts["steps"].get(part), f"steps/{part}.parquet")
        checked: dict[str | None, bool] = {}
        finished = set()
        for tid in sorted(need):
            path, label = need[tid]
            if path not in checked:
                checked[path] = self._footer_readable(path)
                if not checked[path]:
                    if path is not None and not self._exists(path):
                        vanished = True
                    damaged.append(label)
            if checked[path]:
                finished.add(tid)
        return finished, damaged, vanished


def _fits(have: pa.Schema, schema: pa.Schema) -> bool:
    """A file of this table, of this version or an older one: it has trial_id, and every
    column it shares with the table has the table's type."""
    if "trial_id" not in have.names:
        return False
    return all(
        have.field(f.name).type == f.type or pa.types.is_null(have.field(f.name).type)
        for f in schema
        if f.name in have.names
    )


def _needs_upgrade(have: pa.Schema, schema: pa.Schema) -> bool:
    """A file of an older version: some current columns missing, none unknown (a file with
    columns this version does not know was written by a newer one, and is left alone)."""
    if any(name not in schema.names for name in have.names):
        return False
    return any(name not in have.names for name in schema.names)


def _conform(tbl: pa.Table, schema: pa.Schema) -> pa.Table:
    """`tbl` with exactly `schema`'s columns, in order: missing ones null, every value kept."""
    columns = [
        tbl[f.name].cast(f.type) if f.name in tbl.column_names else pa.nulls(len(tbl), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _empty(schema: pa.Schema, columns: list[str]) -> pa.Table:
    fields = [
        pa.field("__filename", pa.string()) if c == "__filename" else schema.field(c)
        for c in columns
    ]
    return pa.schema(fields).empty_table()


def _reason(err: OSError) -> str:
    """`No space left on device` rather than pyarrow's whole sentence about the temp file."""
    text = str(err)
    for known in ("No space left on device", "Read-only file system", "Permission denied"):
        if known in text:
            return known
    return err.strerror or text


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "its details are unknown"


def _damaged_message(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} damaged file{'s' if len(names) > 1 else ''} skipped: {shown}"
