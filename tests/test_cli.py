"""The CLI's surface: version, help, options that do not apply refused (not ignored)."""

from __future__ import annotations

import pytest
from test_e2e_sweep import TINY, write_grid

from sweeper import __version__


def test_version(sweep_cli):
    out = sweep_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"sweep {__version__} ")


def test_help_shows_flags_as_flags(sweep_cli):
    out = sweep_cli("run", "--help")
    assert out.returncode == 0
    assert "--dry-run  " in out.stdout and "<bool>" not in out.stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--dashboard"],
        ["--address", "127.0.0.1:6379"],
        ["--num-cpus", "2"],
        ["--dashboard-host", "0.0.0.0"],
    ],
)
def test_ray_options_with_the_local_executor_are_refused(tmp_path, sweep_cli, extra):
    out = sweep_cli("run", str(write_grid(tmp_path, TINY)), "--executor", "local", *extra)
    assert out.returncode == 2
    assert f"{extra[0]}: for the Ray executor only" in out.stderr
    assert not (tmp_path / "results").exists()
