"""Shared fixtures. One Ray cluster per test session, started only by tests that ask for it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
RAY_CPUS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real Ray cluster on loopback (`ray start --head --block`), ended after the session.

    Ray's own stop command would end every Ray instance on the machine, a user's sweep included:
    the cluster runs in the foreground of its own process group instead, and only that group is
    ended.
    """
    port = _free_port()
    # token authentication on, as a user's cluster should have it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={RAY_CPUS}",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_head(address, env, head)
        yield address
    finally:
        # SIGTERM to `ray start --block` ends the processes it started; the group catches the rest.
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_head(address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        probe = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True
        )
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"no Ray head answered at {address} within 120 s")


def _sweep(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str):
    return subprocess.run(
        [str(BIN / "sweep"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200", **env},
    )


@pytest.fixture
def sweep_cli():
    """Run the real `sweep` console script: sweep_cli("run", "grid.yaml") -> CompletedProcess."""
    return _sweep


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the default in pyproject.toml), the
    end-to-end and Ray tests run one after another on one worker, as they would alone: they
    start Ray instances and `sweep` processes, pin CPUs and wait on them; the unit tests share
    the other worker (and this one, when it is free)."""
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("end-to-end"))
    # A wrapper: the marks are in place before any plugin's hook (xdist's) reads them.
    return (yield)
