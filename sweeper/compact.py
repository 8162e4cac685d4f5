"""`sweep compact`: merge the per-trial files of finished trials into a few large files.

A store holds one small Parquet file per trial and table, and every reader pays per file (about
half a millisecond each with pyarrow, whatever the columns), so a store of 10,000 trials takes
seconds to open however little is read. Compaction merges the files of finished trials
(completed or diverged: a sweep never writes those again) into one group of parts,
`<table>/part-<id>.parquet`, per `part_bytes` of input; failed trials keep their own files,
since their re-run replaces them.

What every reader sees is unchanged: the same rows (sorted by trial, then step), the same
finished trials, the same report. Each group is one transaction (`Store.replace_with_part`), so a
crash at any point loses and duplicates nothing, and the next `sweep compact` or `sweep run`
finishes it. It runs under the store's lock, never beside a sweep, and first puts the store in
order (`Store.maintain`: interrupted compactions, leftovers, damaged groups, files of older
versions upgraded).

    from sweeper.compact import compact
    result = compact("results/quickstart")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Package-internal parts of the store: this module is the store's own maintenance.
from sweeper.store import _TRIAL_FILE, FINISHED, TABLES, NoStore, Store, _View, find_stores

DEFAULT_PART_BYTES = 256 * 2**20  # per-trial file bytes merged into one part (of each table)

# How a part's rows are ordered: by trial, so that a reader filtering on trial_id skips row
# groups, and so that two compactions of the same trials write the same rows.
_SORT_KEYS = {
    "trials": [("trial_id", "ascending")],
    "steps": [("trial_id", "ascending"), ("step", "ascending")],
    "coord": [("trial_id", "ascending"), ("step", "ascending"), ("layer_index", "ascending")],
}


class CompactError(ValueError):
    """What was given is not a store that can be compacted; the message says why."""


@dataclass(frozen=True)
class CompactionResult:
    """What one compaction did, and the store's files before and after it."""

    path: str  # the sweep's folder
    trials_merged: int  # trials whose own files went into new parts
    parts_written: int  # groups of parts written (one file per table each)
    parts_rewritten: int  # older parts written again without trials stored anew since
    trials_left: int  # trials that keep their own files (failed, damaged)
    compactions_finished: int  # interrupted compactions finished first
    files_upgraded: int  # files of older store versions rewritten with the current schema
    set_aside: tuple[str, ...]  # damaged compacted files moved to damaged/
    files_before: int  # Parquet files in trials/, steps/ and coord/
    files_after: int
    bytes_before: int
    bytes_after: int
    seconds: float

    def summary(self) -> str:
        """One line for the command line."""
        mb = 2**20
        parts = [
            f"{self.path}: {self.trials_merged} trials merged into {self.parts_written} part"
            f"{'s' if self.parts_written != 1 else ''}",
            f"files {self.files_before} -> {self.files_after}",
            f"{self.bytes_before / mb:.1f} -> {self.bytes_after / mb:.1f} MB",
        ]
        if self.trials_left:
            parts.append(f"{self.trials_left} left as they are (failed or damaged)")
        if self.parts_rewritten:
            parts.append(f"{self.parts_rewritten} older parts rewritten")
        if self.files_upgraded:
            parts.append(f"{self.files_upgraded} files upgraded to the current version")
        if self.compactions_finished:
            parts.append(f"{self.compactions_finished} interrupted compactions finished")
        if self.set_aside:
            parts.append(f"{len(self.set_aside)} damaged files set aside in damaged/")
        return "; ".join(parts) + f" ({self.seconds:.1f} s)"


def compact_path(path: str | Path, part_bytes: int = DEFAULT_PART_BYTES) -> list[CompactionResult]:
    """Compact every sweep at `path` (see `find_stores`), one after the other."""
    try:
        stores = find_stores(path)
    except NoStore as err:
        raise CompactError(str(err)) from None
    return [compact(store, part_bytes=part_bytes) for store in stores]


def compact(store: Store | str | Path, *, part_bytes: int = DEFAULT_PART_BYTES) -> CompactionResult:
    """Merge the finished trials' own files of one sweep into parts of about `part_bytes`.

    `store` is a Store or a sweep's folder. Raises CompactError for a path that is not a
    sweep's folder, a store on object storage (it has no lock, so a sweep could be writing)
    or a part size below 1; StoreLocked while a sweep (or another compaction) holds the
    store; StoreError when the disk refuses a write (nothing is lost: the next run finishes).
    """
    if not isinstance(store, Store):
        folder = Path(store).expanduser()
        if not (folder / "trials").is_dir():
            raise CompactError(f"{folder}: not a sweep's folder (it has no trials/ folder)")
        store = Store(folder.resolve().parent, folder.name)
    if not store.is_local:
        raise CompactError(
            f"{store.path}: compaction needs the store's lock, which stores on object storage "
            "do not have; compact a local copy"
        )
    if part_bytes < 1:
        raise CompactError(f"part size must be at least 1 byte, got {part_bytes}")

    start = time.perf_counter()
    with store.lock():
        files_before, bytes_before = _usage(store)
        # Files of older versions are upgraded last: merging rewrites most of them anyway.
        maintenance = store.maintain(upgrade=False)
        view = store._view()
        merged = rewritten = 0
        for part in _parts_to_rewrite(store, view):
            rewrite = _part_without_overridden(store, view, part)
            if rewrite is not None:
                store.replace_with_part(*rewrite)
                rewritten += 1
        candidates, left = _finished_own(store, view)
        written = 0
        for batch in _batches(view, candidates, part_bytes):
            tables, replaces, ids = _read_batch(store, view, batch)
            left += len(batch) - len(ids)  # a damaged file found only now: left as it is
            if ids:
                store.replace_with_part(tables, replaces)
                merged += len(ids)
                written += 1
        upgraded = store.upgrade()
        files_after, bytes_after = _usage(store)
    return CompactionResult(
        path=store.path,
        trials_merged=merged,
        parts_written=written,
        parts_rewritten=rewritten,
        trials_left=left,
        compactions_finished=maintenance.compactions_finished,
        files_upgraded=upgraded,
        set_aside=maintenance.set_aside,
        files_before=files_before,
        files_after=files_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        seconds=time.perf_counter() - start,
    )


def _usage(store: Store) -> tuple[int, int]:
    """(files, bytes) of the three tables' folders."""
    files = [f for table in TABLES for f in store._files(table, include_hidden=True)]
    return len(files), sum(f.size for f in files)


def _finished_own(store: Store, view: _View) -> tuple[list[str], int]:
    """(trials with their own files that can be merged, how many own trials files stay).

    Mergeable: completed or diverged, named by its trial id, with a readable trials row and
    readable steps (and coord, when it has some) footers. The rest stays for the next run to
    retry (failed) or replace (damaged).
    """
    own = view.own["trials"]
    if not own:
        return [], 0
    tbl, _, _ = store._scan_files(list(own.values()), "trials", ["trial_id", "status"])
    rows = dict(zip(tbl["trial_id"].to_pylist(), tbl["status"].to_pylist(), strict=True))
    mergeable = []
    for tid in sorted(own):
        if rows.get(tid) not in FINISHED or not _TRIAL_FILE.fullmatch(f"{tid}.parquet"):
            continue
        steps, coord = view.own["steps"].get(tid), view.own["coord"].get(tid)
        if store._footer_readable(steps) and (
            coord is None or store._footer_readable(coord, "coord")
        ):
            mergeable.append(tid)
    return mergeable, len(own) - len(mergeable)


def _batches(view: _View, ids: list[str], part_bytes: int) -> list[list[str]]:
    """`ids` in order, cut where their own files add up to more than `part_bytes`."""
    batches: list[list[str]] = []
    size = 0
    for tid in ids:
        trial_bytes = sum(view.sizes.get(view.own[table].get(tid, ""), 0) for table in TABLES)
        if not batches or (batches[-1] and size + trial_bytes > part_bytes):
            batches.append([])
            size = 0
        batches[-1].append(tid)
        size += trial_bytes
    return batches


def _read_batch(
    store: Store, view: _View, batch: list[str]
) -> tuple[dict[str, pa.Table], list[str], list[str]]:
    """(the batch's rows per table, the files they replace, the trials merged).

    A trial with any file that cannot be read whole is left out (its files stay, and a
    reader names them): a part only ever holds complete trials.
    """
    ids = list(batch)
    for _ in range(2):  # a second pass only when a file turned out damaged
        tables, bad = {}, set()
        for table in TABLES:
            paths = {tid: view.own[table][tid] for tid in ids if tid in view.own[table]}
            tbl, damaged, _ = store._scan_files(list(paths.values()), table, TABLES[table].names)
            if damaged:
                names = {f"{table}/{tid}.parquet": tid for tid in paths}
                bad |= {names[d] for d in damaged if d in names}
            tables[table] = tbl
        if not bad:
            break
        ids = [tid for tid in ids if tid not in bad]
    else:
        return {}, [], []
    if not ids:
        return {}, [], []
    if tables["trials"].num_rows != len(ids):
        # A trial's file holding more (or fewer) than its one row: not the store's own.
        return {}, [], []
    out = {t: tbl.sort_by(_SORT_KEYS[t]) for t, tbl in tables.items() if tbl.num_rows}
    replaces = [
        f"{table}/{tid}.parquet" for table in TABLES for tid in ids if tid in view.own[table]
    ]
    return out, replaces, ids


def _parts_to_rewrite(store: Store, view: _View) -> list[str]:
    """Parts holding a trial that has files of its own again (written after compaction):
    those files are newer, so the part is rewritten without it. Normally none."""
    own_ids = set(view.own["trials"])
    if not own_ids or not view.parts["trials"]:
        return []
    stale = []
    for part, path in sorted(view.parts["trials"].items()):
        try:
            ids = pq.read_table(path, columns=["trial_id"], filesystem=store.fs)["trial_id"]
        except (OSError, pa.ArrowException):
            continue
        if pc.any(pc.is_in(ids, pa.array(sorted(own_ids)))).as_py():
            stale.append(part)
    return stale


def _part_without_overridden(
    store: Store, view: _View, part: str
) -> tuple[dict[str, pa.Table], list[str]] | None:
    """The part's rows less the overridden trials', and its files; None if one is damaged."""
    own_ids = pa.array(sorted(view.own["trials"]))
    tables, replaces = {}, []
    for table in TABLES:
        path = view.parts[table].get(part)
        if path is None:
            continue
        try:
            tbl = pq.read_table(path, filesystem=store.fs)
        except (OSError, pa.ArrowException):
            return None  # left as it is; the readers name it
        tbl = tbl.filter(pc.invert(pc.is_in(tbl["trial_id"], own_ids)))
        if tbl.num_rows:
            tables[table] = tbl
        replaces.append(f"{table}/{part}.parquet")
    return tables, replaces
