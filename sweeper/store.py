"""The Parquet store: the one contract between the sweep and the analysis.

Layout of one sweep, under `<results>/<name>/`:

    grid.yaml                the grid file of the latest run (earlier ones in grid-history/)
    trials/<trial_id>.parquet    one row per trial (TRIALS below)
    steps/<trial_id>.parquet     one row per trial and log step (STEPS below)
    coord/<trial_id>.parquet     coord-check rows, only for trials that asked for them (COORD)

Every file is written under a temporary name in `.incoming/` and renamed into place, steps and
coord before trials: a trial exists when, and only when, its `trials/` file does, and then all
of its rows do. A glob such as `trials/*.parquet` (pandas, pyarrow, DuckDB) sees whole files
only. One controller at a time runs a sweep: it holds the lock `.lock` (see `Store.lock`).

A file that cannot be read (cut short, overwritten) is skipped with a warning naming it
(`DamagedFileWarning`); its trial counts as not stored, so the next run trains it again.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

STORE_VERSION = 1

# (column, arrow type, meaning and unit). The README's schema section is this table.
TRIALS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("trial_id", pa.string(), "stable hash of every setting that changes the result"),
    ("sweep", pa.string(), "the grid file's name"),
    ("store_version", pa.int32(), "version of this schema"),
    ("status", pa.string(), "completed | diverged | failed"),
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

STATUSES = ("completed", "diverged", "failed")

# The only names the store writes in its table folders: a trial's file and a temporary file.
_TRIAL_FILE = re.compile(r"[0-9a-f]{16}\.parquet")
_TEMP_FILE = re.compile(r"\.tmp-[0-9a-f]{32}\.parquet")
_INCOMING = ".incoming"
_LOCK = ".lock"


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
    row.update(result.summary)
    if result.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {result.status!r}")
    for key in ("started_at", "finished_at"):
        if row[key] is None:
            row[key] = _now()
    return row


class Store:
    """One sweep's folder of Parquet tables. `root` is a local path or a pyarrow URI (s3://...)."""

    def __init__(self, root: str | Path, name: str):
        root = str(root)
        if "://" in root:
            self.fs, base = pafs.FileSystem.from_uri(root)
        else:
            # absolute, so that workers running in other folders write to the same place
            root = base = str(Path(root).resolve())
            self.fs = pafs.LocalFileSystem()
        self.root = root  # what a worker passes to Store() to reach the same folder
        self.name = name
        self.path = f"{base.rstrip('/')}/{name}"

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    def _dir(self, table: str) -> str:
        return f"{self.path}/{table}"

    def _write_atomic(self, table: str, file_name: str, tbl: pa.Table) -> None:
        directory, incoming = self._dir(table), f"{self.path}/{_INCOMING}"
        tmp = f"{incoming}/.tmp-{uuid.uuid4().hex}.parquet"
        try:
            self.fs.create_dir(directory, recursive=True)
            self.fs.create_dir(incoming, recursive=True)
            pq.write_table(tbl, tmp, filesystem=self.fs)
            self.fs.move(tmp, f"{directory}/{file_name}")
        except OSError as err:  # pyarrow's errors are OSErrors too
            with contextlib.suppress(OSError):  # a torn temporary file only takes space
                self.fs.delete_file(tmp)
            raise StoreError(f"cannot write to the store {self.path}: {_reason(err)}") from err

    # ----------------------------------------------------------------------- writing

    def check_usable(self) -> None:
        """Raise StoreError, writing nothing, when the store's folder cannot be made or written:
        a file where a folder should be, or a folder this user cannot write."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return  # object stores answer only when written to
        path = Path(self.path)
        nearest = next(p for p in [path, *path.parents] if p.exists())
        for folder in [nearest, *(path / t for t in (*TABLES, _INCOMING) if (path / t).exists())]:
            if not folder.is_dir():
                raise StoreError(f"cannot use {self.path} as a store: {folder} is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StoreError(f"cannot write to {folder}: it is read-only for this user")

    def prepare(self, grid_text: str | None = None) -> None:
        """Create the folder, drop what an interrupted run left half-written, keep the grid file.

        Call while holding `lock()`, before starting trials. Only names the store itself writes
        are removed (temporary files, and rows of trials whose `trials/` file never came), so a
        file someone else put here is never touched.
        """
        self.fs.create_dir(self.path, recursive=True)
        stored = {f"{i}.parquet" for i in self.trial_ids()}
        for table in TABLES:
            for info in self._files(table, include_hidden=True):
                name = info.base_name
                if _TEMP_FILE.fullmatch(name) or (
                    table != "trials" and _TRIAL_FILE.fullmatch(name) and name not in stored
                ):
                    self.fs.delete_file(info.path)
        incoming = pafs.FileSelector(f"{self.path}/{_INCOMING}", allow_not_found=True)
        for info in self.fs.get_file_info(incoming):
            if _TEMP_FILE.fullmatch(info.base_name):
                self.fs.delete_file(info.path)
        if grid_text is not None:
            digest = hashlib.sha256(grid_text.encode()).hexdigest()[:12]
            self.fs.create_dir(f"{self.path}/grid-history", recursive=True)
            for target in (f"{self.path}/grid.yaml", f"{self.path}/grid-history/{digest}.yaml"):
                with self.fs.open_output_stream(target) as out:
                    out.write(grid_text.encode())

    def holder(self) -> str | None:
        """Who holds `lock()` now, in words, or None. Writes nothing."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
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
        if not isinstance(self.fs, pafs.LocalFileSystem):
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
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # before the unlock: an empty file means "nobody"
        finally:
            os.close(fd)

    def write_trial(self, spec: Any, result: TrialResult) -> None:
        """Store one trial atomically; a trial stored before under the same id is replaced."""
        tid = spec.trial_id
        row = trial_row(spec, result)
        steps = [{"trial_id": tid, **r} for r in result.steps]
        coord = [{"trial_id": tid, **r} for r in result.coord]
        self._write_atomic("steps", f"{tid}.parquet", pa.Table.from_pylist(steps, STEPS_SCHEMA))
        if coord:
            self._write_atomic("coord", f"{tid}.parquet", pa.Table.from_pylist(coord, COORD_SCHEMA))
        self._write_atomic("trials", f"{tid}.parquet", pa.Table.from_pylist([row], TRIALS_SCHEMA))

    # ----------------------------------------------------------------------- reading

    def _files(self, table: str, include_hidden: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._dir(table), allow_not_found=True)
        return [
            f
            for f in self.fs.get_file_info(selector)
            if f.type == pafs.FileType.File
            and (include_hidden or not f.base_name.startswith((".", "_")))
        ]

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """A whole table (empty, with the right columns, when nothing is stored yet).

        Files that cannot be read are left out with one DamagedFileWarning naming them.
        """
        tbl, damaged = self._read(table, columns)
        if damaged:
            warnings.warn(_damaged_message(damaged), DamagedFileWarning, stacklevel=2)
        return tbl

    def _read(self, table: str, columns: list[str] | None) -> tuple[pa.Table, list[str]]:
        schema = TABLES[table]
        files = [f.path for f in self._files(table)]
        if not files:
            empty = schema.empty_table()
            return (empty if columns is None else empty.select(columns)), []
        try:  # the usual case, all files whole: one dataset scan
            return self._scan(files, schema, columns), []
        except (OSError, pa.ArrowException):
            pass
        good, damaged = [], []
        for path in files:
            try:
                good.append(self._scan([path], schema, columns))
            except (OSError, pa.ArrowException):
                damaged.append(f"{table}/{path.rsplit('/', 1)[-1]}")
        if not good:
            empty = schema.empty_table()
            return (empty if columns is None else empty.select(columns)), damaged
        return pa.concat_tables(good), damaged

    def _scan(self, files: list[str], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
        dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=columns)

    def trial_ids(self) -> set[str]:
        return {f.base_name.removesuffix(".parquet") for f in self._files("trials")}

    def finished_ids(self) -> set[str]:
        """Trials that need not run again: completed or diverged (failed ones are retried).

        A trial whose trials or steps file is damaged is not finished: it runs again and its
        files are replaced.
        """
        tbl, damaged = self._read("trials", ["trial_id", "status"])
        finished = {
            tid
            for tid, status in zip(
                tbl["trial_id"].to_pylist(), tbl["status"].to_pylist(), strict=True
            )
            if status != "failed"
        }
        steps = {f.base_name: f.path for f in self._files("steps")}
        for tid in sorted(finished):
            path = steps.get(f"{tid}.parquet")
            try:
                if path is None:
                    raise OSError("missing")
                pq.read_metadata(path, filesystem=self.fs)
            except (OSError, pa.ArrowException):
                damaged.append(f"steps/{tid}.parquet")
                finished.discard(tid)
        if damaged:
            warnings.warn(
                _damaged_message(damaged) + "; their trials will run again",
                DamagedFileWarning,
                stacklevel=2,
            )
        return finished


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
