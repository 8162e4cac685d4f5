"""Compaction: what every reader sees is unchanged, on compacted, uncompacted and mixed stores;
a crash (or SIGKILL) at any step loses and duplicates nothing; damaged parts; the lock."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_store_versions import MIXED, build_mixed_store, sort

from analysis import load_results
from analysis.pipeline import analyze
from analysis.report import build_fits
from sweeper.compact import CompactError, compact, compact_path, find_stores
from sweeper.store import TABLES, DamagedFileWarning, Store, StoreLocked

# Small enough to crash a compaction at each of its steps in seconds: 8 trials (one failed, two
# diverged), coord rows, files of both versions.
TINY = dataclasses.replace(
    MIXED,
    name="tiny",
    optimizers={"scion": MIXED.optimizers["scion"]},
    widths=(64,),
    log2_lr=(-10.0, -4.0, 2.0),
)


class Crash(BaseException):
    """What a kill does to the compaction: it stops, and no handler runs."""


def snapshot(store: Store) -> dict:
    """Everything a reader of the store gets; no damaged-file warning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables = {t: sort(store.read(t)).to_pandas() for t in TABLES}
        return {**tables, "finished": store.finished_ids(), "ids": store.trial_ids()}


def assert_same_snapshot(got: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(got[key], value, obj=key)
        else:
            assert got[key] == value, key


def analysis_of(path: str | Path) -> dict:
    fits = build_fits(analyze(load_results(path)))
    fits["meta"].pop("generated_at")
    fits["meta"].pop("timings_s")
    fits["meta"].pop("results")
    return json.loads(json.dumps(fits, default=str))


def plain_reads(store: Store) -> dict[str, pd.DataFrame]:
    """What pandas sees, globbing the folders; each trial at most once, always."""
    out = {}
    for table in TABLES:
        folder = Path(store.path, table)
        if not folder.is_dir() or not list(folder.glob("*.parquet")):
            continue
        df = pd.read_parquet(folder, schema=TABLES[table])
        keys = {"trials": ["trial_id"], "steps": ["trial_id", "step"]}.get(table)
        if keys:
            assert not df.duplicated(keys).any(), f"{table}: a trial seen twice"
        out[table] = df
    return out


def files(store: Store) -> list[str]:
    return sorted(
        str(p.relative_to(store.path)) for t in TABLES for p in Path(store.path, t).glob("*")
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    store, _ = build_mixed_store(tmp_path_factory.mktemp("tiny"), TINY)
    return Path(store.path)


def fresh(template: Path, where: Path) -> Store:
    shutil.copytree(template, where / template.name)
    return Store(where, template.name)


# --------------------------------------------------------------------------- what readers see


def test_compacted_and_mixed_stores_read_like_the_original(tmp_path):
    original, _ = build_mixed_store(tmp_path / "a")
    want, want_fits = snapshot(original), analysis_of(original.path)
    assert want["finished"] and want["finished"] != want["ids"]  # some failed, some finished

    # fully compacted, a few trials per part
    whole = fresh(Path(original.path), tmp_path / "b")
    result = compact(whole, part_bytes=300_000)
    assert result.parts_written >= 3 and result.trials_merged == len(want["finished"])
    assert result.trials_left == len(want["ids"]) - len(want["finished"])
    assert result.files_after < result.files_before / 3
    assert result.bytes_after < result.bytes_before
    assert_same_snapshot(snapshot(whole), want)
    assert analysis_of(whole.path) == want_fits
    plain_reads(whole)

    # mixed: half the trials compacted, the other half stored after it, in their own files
    mixed = Store(tmp_path / "c", original.name)
    first, later = [], []
    for i, tid in enumerate(sorted(want["ids"])):
        (first if i % 2 else later).append(tid)
    for table in TABLES:
        Path(mixed.path, table).mkdir(parents=True)
    copy = lambda ids: [  # noqa: E731
        shutil.copy(p, Path(mixed.path, t, p.name))
        for t in TABLES
        for tid in ids
        if (p := Path(original.path, t, f"{tid}.parquet")).exists()
    ]
    copy(first)
    compact(mixed)
    copy(later)
    assert {p.name[:5] for p in Path(mixed.path, "trials").iterdir()} >= {"part-"}
    assert_same_snapshot(snapshot(mixed), want)
    assert analysis_of(mixed.path) == want_fits
    plain_reads(mixed)

    # a second compaction merges what came since; a third finds nothing to do
    assert compact(mixed).trials_merged == len(set(later) & want["finished"])
    assert compact(mixed).trials_merged == 0
    assert_same_snapshot(snapshot(mixed), want)


def test_a_failed_trials_rerun_replaces_it_after_compaction(tmp_path, template):
    store = fresh(template, tmp_path)
    before = snapshot(store)
    failed = sorted(before["ids"] - before["finished"])
    compact(store)
    # the re-run of a failed trial: its own files, replaced in place (here: a completed one's
    # rows under the failed trial's id)
    trials = Path(store.path, "trials", f"{failed[0]}.parquet")
    row = pq.read_table(trials).to_pylist()[0]
    row.update(status="completed", error=None, final_val_loss=1.5)
    pq.write_table(pa.Table.from_pylist([row], TABLES["trials"]), trials)
    pq.write_table(
        pa.Table.from_pylist([{"trial_id": failed[0], "step": 0}], TABLES["steps"]),
        Path(store.path, "steps", f"{failed[0]}.parquet"),
    )
    after = snapshot(store)
    assert after["finished"] == before["finished"] | {failed[0]}
    assert after["ids"] == before["ids"] and len(after["trials"]) == len(before["trials"])
    assert plain_reads(store)["trials"]["trial_id"].is_unique
    assert compact(store).trials_merged == 1
    assert_same_snapshot(snapshot(store), after)


def test_a_compacted_trial_written_again_wins_and_the_next_compaction_drops_the_old_copy(
    tmp_path, template
):
    """Never done by a sweep (it only runs unfinished trials), but a script could."""
    store = fresh(template, tmp_path)
    compact(store)
    done = sorted(snapshot(store)["finished"])[0]
    part = next(Path(store.path, "trials").glob("part-*"))
    row = pq.read_table(part).filter(pa.compute.equal(pq.read_table(part)["trial_id"], done))
    row = row.to_pylist()[0] | {"final_val_loss": 9.0}
    pq.write_table(
        pa.Table.from_pylist([row], TABLES["trials"]), Path(store.path, "trials", f"{done}.parquet")
    )
    steps = pq.read_table(Path(store.path, "steps", part.name))
    steps = steps.filter(pa.compute.equal(steps["trial_id"], done))
    pq.write_table(steps.slice(0, 1), Path(store.path, "steps", f"{done}.parquet"))
    got = snapshot(store)
    assert (got["trials"]["trial_id"] == done).sum() == 1
    assert got["trials"].set_index("trial_id").loc[done, "final_val_loss"] == 9.0
    assert (got["steps"]["trial_id"] == done).sum() == 1  # the new rows only
    result = compact(store)
    assert result.parts_rewritten == 1 and result.trials_merged == 1
    assert_same_snapshot(snapshot(store), got)
    plain_reads(store)


# --------------------------------------------------------------------------- crashes


def _crash_after(monkeypatch, n: int) -> list[str]:
    """Make the n-th change of a name in the store (write, rename, delete) raise Crash."""
    done: list[str] = []

    def counted(name, real):
        def step(*args, **kwargs):
            if len(done) == n:
                raise Crash(name)
            done.append(name)
            return real(*args, **kwargs)

        return step

    for name in ("_move", "_delete", "_remove_folder"):
        monkeypatch.setattr(Store, name, counted(name, getattr(Store, name)))
    monkeypatch.setattr(pq, "write_table", counted("write_table", pq.write_table))
    return done


def test_a_crash_at_any_step_of_a_compaction_loses_and_duplicates_nothing(
    tmp_path, template, monkeypatch
):
    want = snapshot(Store(template.parent, template.name))
    want_plain = {
        t: len(df) for t, df in plain_reads(Store(template.parent, template.name)).items()
    }
    steps = None
    n = 0
    while steps is None or n < steps:
        store = fresh(template, tmp_path / str(n))
        with monkeypatch.context() as patch:
            done = _crash_after(patch, n)
            try:
                compact(store, part_bytes=100_000)  # two parts
                steps = len(done)  # got through: every step has been crashed at
            except Crash:
                pass
        assert_same_snapshot(snapshot(store), want)  # Store.read follows the journal
        seen = plain_reads(store)  # a subset maybe, never a trial twice
        assert all(len(seen.get(t, ())) <= count for t, count in want_plain.items())
        with store.lock():
            store.prepare()  # what the next `sweep run` does first
        assert not list(Path(store.path, ".incoming").iterdir())
        assert_same_snapshot(snapshot(store), want)
        assert {t: len(df) for t, df in plain_reads(store).items()} == want_plain
        compact(store)
        assert_same_snapshot(snapshot(store), want)
        n += 1
    assert steps > 40  # two parts, upgrades: every kind of step


KILLED = """
import sys, time
from sweeper.compact import compact
from sweeper.store import Store

real, calls = Store._delete, []

def slow_delete(self, path):
    calls.append(path)
    if len(calls) == 3:  # committed, two files deleted
        print("deleting", flush=True)
        time.sleep(60)
    real(self, path)

Store._delete = slow_delete
compact(sys.argv[1])
"""


def test_a_compaction_killed_by_sigkill_is_finished_by_the_next_run(tmp_path, template):
    store = fresh(template, tmp_path)
    want = snapshot(store)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, store.path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "deleting"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert [p.name for p in Path(store.path, ".incoming").iterdir() if p.is_dir()]
    assert_same_snapshot(snapshot(store), want)
    plain_reads(store)
    result = compact(store)  # takes the dead one's lock, finishes its compaction, goes on
    assert result.compactions_finished == 1
    assert_same_snapshot(snapshot(store), want)
    assert not list(Path(store.path, ".incoming").iterdir())


# --------------------------------------------------------------------------- damage, lock, input


def test_a_damaged_part_is_set_aside_and_its_trials_run_again(tmp_path, template):
    store = fresh(template, tmp_path)
    want = snapshot(store)
    own = {p.relative_to(store.path): p.read_bytes() for p in Path(store.path).glob("*/*.parquet")}
    compact(store)
    steps_part = next(Path(store.path, "steps").glob("part-*"))
    steps_part.write_bytes(steps_part.read_bytes()[:200])
    with pytest.warns(DamagedFileWarning, match=f"steps/{steps_part.stem}"):
        assert store.finished_ids() == set()  # every finished trial was in that part
    with store.lock(), pytest.warns(DamagedFileWarning, match="set aside"):
        store.prepare()
    assert sorted(p.name for p in Path(store.path, "damaged", steps_part.stem).iterdir()) == [
        "coord.parquet",
        "steps.parquet",
        "trials.parquet",
    ]
    # the re-run writes the trials' own files again
    for rel, data in own.items():
        if rel.stem in want["finished"]:
            Path(store.path, rel).write_bytes(data)
    assert_same_snapshot(snapshot(store), want)
    plain_reads(store)


HOLD = """
import sys, time
from sweeper.store import Store
with Store(sys.argv[1], sys.argv[2]).lock():
    print("held", flush=True)
    time.sleep(60)
"""


def test_compaction_never_runs_beside_a_sweep(tmp_path, template):
    store = fresh(template, tmp_path)
    before = files(store)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), store.name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}"):
            compact(store)
    finally:
        proc.kill()
        proc.wait()
    assert files(store) == before


def test_what_cannot_be_compacted_is_refused_with_a_reason(tmp_path, template):
    with pytest.raises(CompactError, match="no such folder"):
        compact_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompactError, match="no trials stored"):
        compact_path(tmp_path / "empty")
    with pytest.raises(CompactError, match="not a sweep's folder"):
        compact(tmp_path / "empty")
    with pytest.raises(CompactError, match="at least 1 byte"):
        compact(fresh(template, tmp_path), part_bytes=0)
    remote = Store(tmp_path, "x")
    remote.fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not local
    with pytest.raises(CompactError, match="object storage"):
        compact(remote)
    assert issubclass(CompactError, ValueError)
    # a results root: each sweep in it
    shutil.copytree(template, tmp_path / "root" / "one")
    shutil.copytree(template, tmp_path / "root" / "two")
    assert [s.name for s in find_stores(tmp_path / "root")] == ["one", "two"]
    results = compact_path(tmp_path / "root")
    assert [Path(r.path).name for r in results] == ["one", "two"]
    assert all(r.trials_merged for r in results)
    assert "trials merged into 1 part" in results[0].summary()


def test_a_trial_with_a_file_damaged_inside_stays_out_of_the_parts(tmp_path, template):
    """Footer whole (so it looks finished), data pages garbage: found only when merging."""
    store = fresh(template, tmp_path)
    want = snapshot(store)
    victim = sorted(want["finished"])[0]
    path = Path(store.path, "steps", f"{victim}.parquet")
    data = bytearray(path.read_bytes())
    data[8:200] = b"\xff" * 192  # the first data pages; the footer at the end is intact
    path.write_bytes(bytes(data))
    result = compact(store)
    assert result.trials_merged == len(want["finished"]) - 1
    assert path.read_bytes() == bytes(data)  # left as it was, for the reader to name
    with pytest.warns(DamagedFileWarning, match=f"steps/{victim}"):
        steps = sort(store.read("steps")).to_pandas()
    pd.testing.assert_frame_equal(
        steps, want["steps"][want["steps"]["trial_id"] != victim].reset_index(drop=True)
    )
