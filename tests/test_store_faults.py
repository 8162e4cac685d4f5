"""The store under faults: foreign files, a second controller, damaged files, failed writes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import warnings

import pyarrow.parquet as pq
import pytest

from sweeper.spec import expand, parse_spec
from sweeper.store import DamagedFileWarning, Store, StoreError, StoreLocked, TrialResult

SPEC = parse_spec(
    {
        "name": "s",
        "train": {"steps": 20, "log_every": 10},
        "grid": {"width": [32], "optimizer": {"adamw": {"lr": [0.01, 0.001, 0.1]}}},
    }
)
A, B, C = expand(SPEC, "fp")


def result(status: str = "completed") -> TrialResult:
    rows = [{"step": s, "tokens": s * 10, "train_loss": 2.0} for s in (0, 10, 20)]
    return TrialResult(status, {"final_val_loss": 2.0}, rows)


def snapshot(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_prepare_removes_only_names_the_store_writes(tmp_path):
    store = Store(tmp_path, "s")
    store.write_trial(A, result())
    store.write_trial(B, result())
    (tmp_path / "s" / "trials" / f"{B.trial_id}.parquet").unlink()  # crash before trials/
    mine = {
        "steps/important.txt": b"a user's notes",
        "steps/notes.parquet": b"a user's own table",
        "coord/.hidden": b"x",
        "grid-history/mine.yaml": b"y",
    }
    for name, data in mine.items():
        (tmp_path / "s" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / name).write_bytes(data)
    (tmp_path / "s" / ".incoming" / f".tmp-{'a' * 32}.parquet").write_bytes(b"PAR1 torn")
    store.prepare("name: s\n")
    for name, data in mine.items():
        assert (tmp_path / "s" / name).read_bytes() == data
    assert not (tmp_path / "s" / "steps" / f"{B.trial_id}.parquet").exists()
    assert not list((tmp_path / "s" / ".incoming").iterdir())
    assert store.finished_ids() == {A.trial_id}


def test_temporary_files_never_match_a_table_glob(tmp_path, monkeypatch):
    store = Store(tmp_path, "s")
    seen: list[str] = []
    real_write = pq.write_table

    def write_table(tbl, where, **kwargs):  # what a reader globbing */*.parquet sees mid-write
        real_write(tbl, where, **kwargs)
        for table in ("trials", "steps", "coord"):
            seen.extend(f"{table}/{p.name}" for p in (tmp_path / "s" / table).glob("*.parquet"))

    monkeypatch.setattr(pq, "write_table", write_table)
    store.write_trial(A, result())
    # nothing while the steps file is written; the whole steps file while trials/ is
    assert seen == [f"steps/{A.trial_id}.parquet"]


# --------------------------------------------------------------------------- the lock

HOLD = """
import sys, time
from sweeper.store import Store
with Store(sys.argv[1], "s").lock():
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_controller_is_refused_with_the_holder_named(tmp_path):
    proc = _holder(tmp_path)
    try:
        store = Store(tmp_path, "s")
        assert f"pid {proc.pid}" in store.holder()
        before = snapshot(tmp_path)
        with pytest.raises(StoreLocked, match=f"pid {proc.pid} on .* since"), store.lock():
            pass
        assert snapshot(tmp_path) == before
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_controller_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path, "s")
    assert store.holder() is None
    with store.lock():
        assert f"pid {os.getpid()}" in store.holder()
    assert store.holder() is None and (tmp_path / "s" / ".lock").read_bytes() == b""


def test_holder_writes_nothing(tmp_path):
    assert Store(tmp_path, "s").holder() is None
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_trial_file_is_named_skipped_and_runs_again(tmp_path, damage):
    store = Store(tmp_path, "s")
    for t in (A, B):
        store.write_trial(t, result())
    path = tmp_path / "s" / "trials" / f"{B.trial_id}.parquet"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 99}
    path.write_bytes(damaged[damage])
    with pytest.warns(DamagedFileWarning, match=f"1 damaged file skipped: trials/{B.trial_id}"):
        assert store.finished_ids() == {A.trial_id}
    with pytest.warns(DamagedFileWarning, match=B.trial_id):
        assert store.read("trials")["trial_id"].to_pylist() == [A.trial_id]
    store.write_trial(B, result())  # the re-run replaces it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.finished_ids() == {A.trial_id, B.trial_id}


def test_a_damaged_or_missing_steps_file_makes_its_trial_run_again(tmp_path):
    store = Store(tmp_path, "s")
    for t in (A, B, C):
        store.write_trial(t, result())
    (tmp_path / "s" / "steps" / f"{B.trial_id}.parquet").write_bytes(b"garbage")
    (tmp_path / "s" / "steps" / f"{C.trial_id}.parquet").unlink()
    with pytest.warns(DamagedFileWarning, match="2 damaged files skipped") as caught:
        assert store.finished_ids() == {A.trial_id}
    assert B.trial_id in str(caught[0].message) and C.trial_id in str(caught[0].message)
    with pytest.warns(DamagedFileWarning, match=f"steps/{B.trial_id}"):
        steps = store.read("steps")
    assert set(steps["trial_id"].to_pylist()) == {A.trial_id}


# --------------------------------------------------------------------------- failed writes


def test_a_full_disk_is_one_store_error_and_keeps_what_was_stored(tmp_path, monkeypatch):
    store = Store(tmp_path, "s")
    store.write_trial(A, result())
    before = snapshot(tmp_path / "s" / "trials")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(StoreError, match="No space left on device") as err:
        store.write_trial(A, result("failed"))
    assert store.path in str(err.value)
    assert snapshot(tmp_path / "s" / "trials") == before
    assert not list((tmp_path / "s" / ".incoming").iterdir())


def test_a_file_where_the_store_should_be_is_refused(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(StoreError, match="is not a folder"):
        Store(tmp_path / "results", "s").check_usable()
    (tmp_path / "ok" / "s").mkdir(parents=True)
    (tmp_path / "ok" / "s" / "trials").write_text("not a folder")
    with pytest.raises(StoreError, match="trials is not a folder"):
        Store(tmp_path / "ok", "s").check_usable()
    Store(tmp_path / "new" / "deeper", "s").check_usable()  # folders to be made: fine


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(StoreError, match="read-only"):
        Store(tmp_path / "ro", "s").check_usable()
