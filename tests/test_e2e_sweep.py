"""End-to-end: the real `sweep` CLI on tiny grids, locally and on a Ray cluster it attaches to."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent

TINY = {
    "name": "tiny",
    "model": {"kind": "gpt", "depth": 1, "seq_len": 32, "head_dim": 16},
    "train": {"steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 1},
    "grid": {
        "width": [32, 64],
        "batch_size": [4],
        "optimizer": {"adamw": {"lr": [1e-3, 1e-2]}, "scion": {"lr": 0.01, "momentum": 0.1}},
    },
    "resources": {"cpu": 1},
    "execution": {"max_concurrent": 2, "retries": 0},
}


def write_grid(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    grid = {**grid, "results": str(tmp_path / "results")}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid))
    return path


def stored(tmp_path: Path, name: str = "tiny") -> tuple[pd.DataFrame, pd.DataFrame]:
    root = tmp_path / "results" / name
    return pd.read_parquet(root / "trials"), pd.read_parquet(root / "steps")


def check_matches_grid(trials: pd.DataFrame, steps: pd.DataFrame) -> None:
    assert len(trials) == 6 and trials.trial_id.is_unique
    cells = set(zip(trials.optimizer, trials.width, trials.lr, strict=True))
    assert cells == {
        (opt, w, lr)
        for w in (32, 64)
        for opt, lr in (("adamw", 1e-3), ("adamw", 1e-2), ("scion", 0.01))
    }
    assert set(trials.status) <= {"completed", "diverged"}
    assert (trials.steps == 6).all() and (trials.depth == 1).all()
    assert (trials.hparams[trials.optimizer == "scion"] == '{"momentum": 0.1}').all()
    # a row at steps 0, 2, 4, 6 for every trial that ran to the end
    done = trials[trials.status == "completed"].trial_id
    per_trial = steps[steps.trial_id.isin(done)].groupby("trial_id").step.apply(sorted)
    assert all(s == [0, 2, 4, 6] for s in per_trial)
    assert steps.groupby("trial_id").val_loss.count().min() >= 1


def test_dry_run_prints_the_grid_and_writes_nothing(tmp_path, sweep_cli):
    out = sweep_cli("run", str(write_grid(tmp_path, TINY)), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "6 trials: 0 stored, 6 to run" in out.stdout
    assert "4 cells, 6 trials" in out.stdout  # (adamw, scion) x 2 widths
    assert not (tmp_path / "results").exists()


def test_local_executor_runs_the_grid_then_reruns_nothing(tmp_path, sweep_cli):
    grid = write_grid(tmp_path, TINY)
    first = sweep_cli("run", str(grid), "--executor", "local")
    assert first.returncode == 0, first.stderr
    trials, steps = stored(tmp_path)
    check_matches_grid(trials, steps)
    assert (tmp_path / "results" / "tiny" / "grid.yaml").read_text() == grid.read_text()

    again = sweep_cli("run", str(grid), "--executor", "local")
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert stored(tmp_path)[0].equals(trials)

    status = sweep_cli("status", str(tmp_path / "results" / "tiny"))
    assert "6 stored" in status.stdout


def test_report_renders_for_a_store_written_by_sweep_run(tmp_path, sweep_cli):
    grid = {**TINY, "grid": {**TINY["grid"], "optimizer": {"adamw": {"lr": [1e-3, 3e-3, 1e-2]}}}}
    out = sweep_cli("run", str(write_grid(tmp_path, grid)), "--executor", "local", "--report")
    assert out.returncode == 0, out.stderr
    report = tmp_path / "results" / "tiny" / "report"
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html
    fits = json.loads((report / "fits.json").read_text())
    assert {o["optimizer"] for o in fits["optima"]} == {"adamw"}
    assert len(fits["optima"]) == 2  # one cell per width
    assert sorted(p.name for p in report.glob("*.png"))

    analyze = sweep_cli("analyze", str(tmp_path / "results" / "tiny"))
    assert analyze.returncode == 0 and "adamw" in analyze.stdout

    missing = sweep_cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


@pytest.mark.ray
def test_attached_cluster_runs_the_same_grid_and_a_grown_grid_runs_only_new_trials(
    tmp_path, sweep_cli, ray_address
):
    grid = write_grid(tmp_path, TINY)
    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    trials, steps = stored(tmp_path)
    check_matches_grid(trials, steps)

    wider = {**TINY, "grid": {**TINY["grid"], "width": [32, 64, 96]}}
    out = sweep_cli("run", str(write_grid(tmp_path, wider)), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    assert "6 already stored, 3 to run" in out.stdout
    grown = stored(tmp_path)[0]
    assert len(grown) == 9 and grown.trial_id.is_unique
    before = trials.set_index("trial_id")
    after = grown.set_index("trial_id").loc[before.index]
    pd.testing.assert_frame_equal(before, after)


def signal_once_stored(grid: Path, address: str, trials_dir: Path, n: int, sig: int) -> int:
    """Run `sweep run grid --address address`, send it `sig` once `n` trials are stored, and
    return its exit code."""
    proc = subprocess.Popen(
        [str(BIN / "sweep"), "run", str(grid), "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(trials_dir.glob("*.parquet"))) < n:
        time.sleep(0.2)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@pytest.mark.ray
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_controller_resumes_with_every_trial_once(tmp_path, sweep_cli, ray_address, sig):
    slow = {
        **TINY,
        "train": {**TINY["train"], "steps": 60, "log_every": 20, "eval_every": 30},
        "execution": {"max_concurrent": 1, "retries": 0},
    }
    grid = write_grid(tmp_path, slow)
    trials_dir = tmp_path / "results" / "tiny" / "trials"
    code = signal_once_stored(grid, ray_address, trials_dir, 2, sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    kept = {p.name: p.read_bytes() for p in trials_dir.glob("*.parquet")}
    assert 2 <= len(kept) < 6, "the kill should land mid-sweep"

    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    trials, steps = stored(tmp_path)
    assert len(trials) == 6 and trials.trial_id.is_unique
    assert steps.groupby(["trial_id", "step"]).size().max() == 1
    for name, data in kept.items():  # what was stored before the kill is untouched
        assert (trials_dir / name).read_bytes() == data


@pytest.mark.ray
def test_default_local_ray_with_dashboard_on_loopback(tmp_path, sweep_cli):
    small = {**TINY, "grid": {**TINY["grid"], "width": [32], "optimizer": {"adamw": {"lr": 1e-3}}}}
    out = sweep_cli("run", str(write_grid(tmp_path, small)), "--num-cpus", "1", "--dashboard")
    assert out.returncode == 0, out.stderr
    assert "Ray dashboard: http://127.0.0.1:" in out.stdout
    assert len(stored(tmp_path)[0]) == 1


@pytest.mark.ray
def test_gpu_request_beyond_the_cluster_is_refused(tmp_path, sweep_cli, ray_address):
    grid = write_grid(tmp_path, {**TINY, "resources": {"cpu": 1, "gpu": 0.5}})
    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 2
    assert "0.5 GPU" in out.stderr and "0 GPU" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "results" / "tiny").glob("trials/*.parquet"))


MALFORMED = {
    "not_yaml.yaml": ("name: [oops\n", "not valid YAML"),
    "not_mapping.yaml": ("- 1\n- 2\n", "a YAML mapping"),
    "unknown_optimizer.yaml": (
        {**TINY, "grid": {**TINY["grid"], "optimizer": {"sgd": {"lr": 1}}}},
        "unknown optimizer 'sgd'",
    ),
    "unknown_setting.yaml": (
        {**TINY, "grid": {**TINY["grid"], "optimizer": {"scion": {"lr": 1, "momentun": 0.1}}}},
        "grid.optimizer.scion.momentun",
    ),
    "bad_setting_value.yaml": (
        {**TINY, "grid": {**TINY["grid"], "optimizer": {"scion": {"lr": 1, "lmo_hidden": "x"}}}},
        "grid.optimizer.scion: unknown lmo_hidden 'x'",
    ),
    "typo_field.yaml": ({**TINY, "trian": {"steps": 1}}, "trian: unknown field"),
    "bad_width.yaml": ({**TINY, "grid": {**TINY["grid"], "width": ["wide"]}}, "grid.width.0"),
    "missing_text.yaml": ({**TINY, "data": {"text": "/nonexistent/corpus.txt"}}, "corpus.txt"),
    "bad_fraction.yaml": ({**TINY, "resources": {"gpu": 0.3}}, "resources.gpu"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_grid_gives_one_clear_error(tmp_path, sweep_cli, name):
    content, expected = MALFORMED[name]
    path = tmp_path / name
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump({**content, "results": str(tmp_path / "results")}))
    else:
        path.write_text(content)
    out = sweep_cli("run", str(path), "--executor", "local")
    assert out.returncode == 2, out.stdout + out.stderr
    assert expected in out.stderr
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.ray
def test_max_concurrent_holds_on_ray(tmp_path, sweep_cli, ray_address):
    # The cluster has room for more trials at once; the grid allows one.
    grid = write_grid(tmp_path, {**TINY, "execution": {"max_concurrent": 1, "retries": 0}})
    out = sweep_cli("run", str(grid), "--address", ray_address)
    assert out.returncode == 0, out.stderr
    trials = stored(tmp_path)[0].sort_values("started_at")
    assert len(trials) == 6
    ends, starts = trials["finished_at"].to_numpy()[:-1], trials["started_at"].to_numpy()[1:]
    assert (starts >= ends).all(), "two trials ran at once"
