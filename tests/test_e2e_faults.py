"""End-to-end under faults: refused runs change nothing, one controller per store, damaged
files, and a disk that is full, read-only or not a folder. Through the real `sweep` CLI."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_e2e_sweep import BIN, TINY, stored, write_grid

pytestmark = pytest.mark.e2e

ONE = {**TINY, "grid": {**TINY["grid"], "width": [32], "optimizer": {"adamw": {"lr": [1e-3]}}}}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder): 'byte for byte as it was'."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def assert_refused(out: subprocess.CompletedProcess, words: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert words in out.stderr and "error:" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.fixture
def a_stored_sweep(tmp_path, sweep_cli) -> Path:
    """A store holding one trial, plus a file of the user's next to it."""
    out = sweep_cli("run", str(write_grid(tmp_path, ONE)), "--executor", "local")
    assert out.returncode == 0, out.stderr
    (tmp_path / "results" / "tiny" / "steps" / "important.txt").write_text("mine")
    return tmp_path / "results"


def test_a_grid_refused_for_its_gpu_leaves_the_store_as_it_was(tmp_path, sweep_cli, a_stored_sweep):
    before = snapshot(a_stored_sweep)
    grid = write_grid(tmp_path, {**TINY, "resources": {"cpu": 1, "gpu": 2}}, "gpu.yaml")
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert_refused(out, "no CUDA GPU")
    assert out.stdout == ""  # refused before the sweep's header and progress bar
    assert snapshot(a_stored_sweep) == before


@pytest.mark.ray
def test_a_grid_refused_for_its_cpus_leaves_the_store_as_it_was(
    tmp_path, sweep_cli, a_stored_sweep
):
    before = snapshot(a_stored_sweep)
    grid = write_grid(tmp_path, {**TINY, "resources": {"cpu": 64}}, "cpu.yaml")
    assert_refused(sweep_cli("run", str(grid), "--num-cpus", "1"), "64 CPU")
    assert snapshot(a_stored_sweep) == before


def test_a_refused_grid_leaves_no_store_behind(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, {**TINY, "resources": {"cpu": 1, "gpu": 1}})
    assert_refused(sweep_cli("run", str(grid), "--executor", "local"), "no CUDA GPU")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_results_that_is_a_file_is_refused(tmp_path, sweep_cli, dry_run):
    (tmp_path / "results").write_text("not a folder")
    extra = ["--dry-run"] if dry_run else ["--executor", "local"]
    out = sweep_cli("run", str(write_grid(tmp_path, ONE)), *extra)
    assert_refused(out, "is not a folder")
    assert (tmp_path / "results").read_text() == "not a folder"


def test_an_immutable_results_folder_is_refused(tmp_path, sweep_cli):
    (tmp_path / "results").mkdir()
    if subprocess.run(["chattr", "+i", str(tmp_path / "results")], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        out = sweep_cli("run", str(write_grid(tmp_path, ONE)), "--executor", "local")
        assert_refused(out, "read-only")
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "results")])


# --------------------------------------------------------------------------- damaged files


def test_damaged_files_are_named_skipped_and_their_trials_run_again(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, TINY)
    assert sweep_cli("run", str(grid), "--executor", "local").returncode == 0
    store = tmp_path / "results" / "tiny"
    cut, empty, garbage, *_ = sorted((store / "trials").glob("*.parquet"))
    cut.write_bytes(cut.read_bytes()[:200])
    empty.write_bytes(b"")
    steps = store / "steps" / garbage.name
    steps.write_bytes(b"not parquet at all")
    for command in (["status", str(store)], ["analyze", str(store)], ["report", str(store)]):
        out = sweep_cli(*command)
        assert out.returncode == 0, (command, out.stderr)
        assert "damaged file" in out.stderr and "Traceback" not in out.stderr
    out = sweep_cli("run", str(grid), "--dry-run")
    assert out.returncode == 0 and "6 trials: 3 stored, 3 to run" in out.stdout
    assert cut.name in out.stderr and empty.name in out.stderr and garbage.name in out.stderr
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0 and "3 already stored, 3 to run" in out.stdout
    trials, steps_rows = stored(tmp_path)
    assert len(trials) == 6 and set(steps_rows.trial_id) == set(trials.trial_id)
    assert "damaged" not in sweep_cli("status", str(store)).stderr


# --------------------------------------------------------------------------- one controller

SLOW = {
    **TINY,
    "train": {**TINY["train"], "steps": 600, "log_every": 200, "eval_every": 300},
}


def test_a_second_controller_on_the_same_store_is_refused(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, SLOW)
    first = subprocess.Popen(
        [str(BIN / "sweep"), "run", str(grid), "--executor", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "results" / "tiny" / ".lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    try:
        second = sweep_cli("run", str(grid), "--executor", "local")
        assert_refused(second, f"pid {first.pid}")
        assert "another `sweep run` is running this sweep" in second.stderr
        dry = sweep_cli("run", str(grid), "--dry-run")
        assert dry.returncode == 0 and f"pid {first.pid}" in dry.stderr
    finally:
        assert first.wait(timeout=300) == 0, first.stderr
    trials, _ = stored(tmp_path)
    assert len(trials) == 6 and trials.trial_id.is_unique  # each trial trained once


@pytest.mark.ray
def test_two_sweeps_on_different_stores_at_once_both_finish(tmp_path, sweep_cli):
    procs = []
    for name in ("first", "second"):
        grid = write_grid(tmp_path, {**ONE, "name": name}, f"{name}.yaml")
        procs.append(
            subprocess.Popen(
                [str(BIN / "sweep"), "run", str(grid), "--num-cpus", "1"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for name in ("first", "second"):
        assert len(stored(tmp_path, name)[0]) == 1


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_a_full_disk_stops_the_sweep_at_once_and_loses_nothing(tmp_path, sweep_cli, executor):
    grid = {**TINY, "execution": {"max_concurrent": 1, "retries": 2}}
    with small_disk(tmp_path / "results", "96k") as disk:
        path = write_grid(tmp_path, grid)
        extra = ["--executor", "local"] if executor == "local" else ["--num-cpus", "1"]
        started = time.monotonic()
        out = sweep_cli("run", str(path), *extra)
        assert_refused(out, "No space left on device")
        assert "stopped at the first write that failed" in out.stderr
        assert "retry" not in out.stdout  # a full disk is not retried
        assert time.monotonic() - started < 120
        kept = {p.name: p.read_bytes() for p in (disk / "tiny" / "trials").glob("*.parquet")}
        assert 1 <= len(kept) < 6
        # what was stored reads back whole
        status = sweep_cli("status", str(disk / "tiny"))
        assert f"{len(kept)} stored" in status.stdout and "damaged" not in status.stderr
        assert not list((disk / "tiny" / ".incoming").glob("*"))


def test_a_report_that_cannot_be_written_is_one_message(tmp_path, sweep_cli, a_stored_sweep):
    (tmp_path / "afile").write_text("in the way")
    out = sweep_cli("report", str(a_stored_sweep / "tiny"), "-o", str(tmp_path / "afile" / "rep"))
    assert_refused(out, "cannot write the report")
    assert "Not a directory" in out.stderr


def test_a_report_on_a_full_disk_leaves_no_file_cut_short(tmp_path, sweep_cli, a_stored_sweep):
    with small_disk(tmp_path / "out", "48k") as disk:
        out = sweep_cli("report", str(a_stored_sweep / "tiny"), "-o", str(disk / "rep"))
        assert_refused(out, "No space left on device")
        for f in (disk / "rep").iterdir():  # whatever was written is whole
            assert not f.name.startswith("."), f"a temporary file was left: {f.name}"
            data = f.read_bytes()
            if f.suffix == ".png":
                assert data.endswith(b"IEND\xaeB`\x82"), f"{f.name} is cut short"


# --------------------------------------------------------------------------- red-team findings


def test_a_users_parquet_files_in_the_store_are_never_read(tmp_path, sweep_cli, a_stored_sweep):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = a_stored_sweep / "tiny"
    pq.write_table(pa.table({"x": [1, 2]}), store / "trials" / "my-notes.parquet")
    (trial,) = sorted((store / "trials").glob("[0-9a-f]*.parquet"))
    pq.write_table(pa.table({"x": [1, 2]}), trial)  # another schema under a trial's name
    out = sweep_cli("status", str(store))
    assert out.returncode == 0 and "0 stored" in out.stdout and trial.name in out.stderr
    grid = write_grid(tmp_path, ONE)
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0 and "0 already stored, 1 to run" in out.stdout, out.stderr
    assert (store / "trials" / "my-notes.parquet").exists()  # left alone
    out = sweep_cli("analyze", str(store))
    assert out.returncode == 0 and "damaged" not in out.stderr, out.stderr


def test_a_steps_file_of_the_wrong_schema_makes_its_trial_run_again(tmp_path, sweep_cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    grid = write_grid(tmp_path, ONE)
    assert sweep_cli("run", str(grid), "--executor", "local").returncode == 0
    (steps,) = (tmp_path / "results" / "tiny" / "steps").glob("*.parquet")
    pq.write_table(pa.table({"trial_id": [steps.stem], "step": ["zero"]}), steps)
    status = sweep_cli("status", str(tmp_path / "results" / "tiny"))
    assert status.returncode == 0 and steps.name in status.stderr
    out = sweep_cli("run", str(grid), "--executor", "local")
    assert out.returncode == 0 and "0 already stored, 1 to run" in out.stdout, out.stderr


@pytest.mark.parametrize("where", ["grid-history", "table-is-a-file"])
def test_a_store_that_cannot_be_prepared_or_read_is_one_message(
    tmp_path, sweep_cli, a_stored_sweep, where
):
    store = a_stored_sweep / "tiny"
    grid = write_grid(tmp_path, {**ONE, "grid": {**ONE["grid"], "seed": [0, 1]}})
    if where == "grid-history":
        if subprocess.run(["chattr", "+i", str(store / "grid-history")]).returncode:
            pytest.skip("chattr +i is not available here")
        try:
            assert_refused(sweep_cli("run", str(grid), "--executor", "local"), "grid file")
        finally:
            subprocess.run(["chattr", "-i", str(store / "grid-history")])
        return
    import shutil

    shutil.rmtree(store / "steps")
    (store / "steps").write_text("not a folder")
    for command in (["status", str(store)], ["analyze", str(store)], ["report", str(store)]):
        assert_refused(sweep_cli(*command), "steps")


@pytest.mark.parametrize("results", ["loop", "foo://bar"])
def test_a_symlink_loop_or_an_unknown_scheme_is_one_message(tmp_path, sweep_cli, results):
    if results == "loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        results = str(tmp_path / "loop" / "x")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({**ONE, "results": results}))
    assert_refused(sweep_cli("run", str(grid), "--executor", "local"), "cannot be a store")
    for command in (["status", results], ["report", results], ["compact", results]):
        out = sweep_cli(*command)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (command, out.stderr)


def test_cuda_without_a_gpu_is_refused_before_anything_runs(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, {**ONE, "train": {**ONE["train"], "device": "cuda"}})
    assert_refused(sweep_cli("run", str(grid), "--executor", "local"), "train.device is cuda")
    assert_refused(sweep_cli("run", str(grid), "--num-cpus", "1"), "resources.gpu is 0")
    assert not (tmp_path / "results").exists()


def test_compact_takes_a_file_uri(tmp_path, sweep_cli, a_stored_sweep):
    out = sweep_cli("compact", (a_stored_sweep / "tiny").as_uri())
    assert out.returncode == 0, out.stderr
    assert list((a_stored_sweep / "tiny" / "trials").glob("part-*.parquet"))
