"""Shared fixtures. One Ray cluster per test session, started only by tests that ask for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    """A real Ray cluster on loopback (`ray start --head`), stopped after the session."""
    port = _free_port()
    # token authentication on, as a user's cluster should have it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True)
    subprocess.run(
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
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    yield f"127.0.0.1:{port}"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


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
