"""Stores on object storage, end to end: run, resume, status, analyze and report on an s3://
store served by a local S3 server (moto, on loopback), and on a file:// URI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from test_e2e_sweep import TINY

pytestmark = pytest.mark.e2e
GRID = {
    **TINY,
    "grid": {**TINY["grid"], "width": [32, 64], "optimizer": {"adamw": {"lr": [1e-3, 1e-2, 3e-2]}}},
}


@pytest.fixture(scope="module")
def s3() -> dict[str, str]:
    """A moto S3 server on a free loopback port with one bucket; the environment to reach it."""
    pytest.importorskip("moto", reason="moto[server] is a test dependency (pip install -e .[dev])")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        fs = pafs.S3FileSystem(
            access_key="test",
            secret_key="test",
            region="us-east-1",
            scheme="http",
            endpoint_override=f"127.0.0.1:{port}",
            allow_bucket_creation=True,
        )
        fs.create_dir("sweeps")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def grid_file(tmp_path, results: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "results": results}))
    return str(path)


@pytest.mark.ray
def test_run_resume_status_analyze_and_report_on_s3(tmp_path, sweep_cli, s3, monkeypatch):
    grid = grid_file(tmp_path, "s3://sweeps/study")
    first = sweep_cli("run", grid, "--num-cpus", "1", **s3)
    assert first.returncode == 0, first.stderr
    assert "-> s3://sweeps/study/tiny" in first.stdout
    again = sweep_cli("run", grid, "--num-cpus", "1", "--report", **s3)
    assert again.returncode == 0 and "6 already stored, 0 to run" in again.stdout, again.stderr

    for target in ("s3://sweeps/study/tiny", "s3://sweeps/study", grid):
        out = sweep_cli("status", target, **s3)
        assert out.returncode == 0 and "6 stored" in out.stdout, (target, out.stderr)
    out = sweep_cli("analyze", "s3://sweeps/study", **s3)
    assert out.returncode == 0 and "adamw" in out.stdout, out.stderr
    out = sweep_cli("report", "s3://sweeps/study/tiny", **s3)
    assert out.returncode == 0 and "report: s3://sweeps/study/tiny/report/report.html" in out.stdout

    # read back from the server what the sweep and the report wrote there
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    import json

    import pyarrow.fs as pafs

    from sweeper.store import Store

    store = Store("s3://sweeps/study", "tiny")
    assert len(store.finished_ids()) == 6
    fs, base = pafs.FileSystem.from_uri("s3://sweeps/study/tiny/report")
    with fs.open_input_stream(f"{base}/fits.json") as f:
        fits = json.loads(f.read())
    assert len(fits["optima"]) == 2 and fits["meta"]["results"] == "s3://sweeps/study/tiny"
    assert fs.get_file_info(f"{base}/report.html").size > 10_000


def test_missing_bucket_or_prefix_is_one_message(tmp_path, sweep_cli, s3):
    out = sweep_cli("status", "s3://sweeps/nothing-here", **s3)
    assert out.returncode == 2 and "no such folder" in out.stderr and "Traceback" not in out.stderr
    out = sweep_cli("run", grid_file(tmp_path, "s3://no-bucket/x"), "--executor", "local", **s3)
    assert out.returncode == 2 and "no-bucket" in out.stderr and "Traceback" not in out.stderr


def test_file_uri_store_runs_and_reports(tmp_path, sweep_cli):
    uri = (tmp_path / "results").as_uri()
    out = sweep_cli("run", grid_file(tmp_path, uri), "--executor", "local", "--report")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "results" / "tiny" / "report" / "report.html").is_file()
    out = sweep_cli("status", f"{uri}/tiny")
    assert out.returncode == 0 and "6 stored" in out.stdout
    assert os.path.isfile(tmp_path / "results" / "tiny" / ".lock")  # a local store: locked


def test_an_object_store_that_does_not_answer_is_one_message(tmp_path, sweep_cli):
    nowhere = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    grid = grid_file(tmp_path, "s3://sweeps/study")
    commands = (
        ["run", grid, "--executor", "local"],
        ["run", grid, "--dry-run"],
        ["status", "s3://sweeps/study"],
        ["report", "s3://sweeps/study"],
    )
    # Each waits out the S3 client's retries (about 7 s, idle): all four at once.
    with ThreadPoolExecutor(len(commands)) as pool:
        outs = list(pool.map(lambda args: sweep_cli(*args, timeout=120, **nowhere), commands))
    for args, out in zip(commands, outs, strict=True):
        assert out.returncode == 2, (args, out.stderr)
        assert "Could not connect" in out.stderr and "Traceback" not in out.stderr, args
