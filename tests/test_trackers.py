"""`sweep run --tracker ...`: every trial's curve lands in TensorBoard, MLflow and W&B (offline),
read back here with each tool's own format, and named by its optimizer, width and lr."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
from test_e2e_sweep import TINY, write_grid

pytestmark = pytest.mark.e2e
GRID = {
    **TINY,
    "grid": {**TINY["grid"], "width": [32], "optimizer": {"adamw": {"lr": [1e-3, 1e-2]}}},
}
LOGGED_STEPS = 4  # rows at steps 0, 2, 4, 6


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) for p in packages)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """One sweep of two trials with all three trackers, run in its own folder."""
    if not installed("tensorboardX", "mlflow", "wandb"):
        pytest.skip("tensorboardX, mlflow and wandb are test dependencies (pip install -e .[dev])")
    from conftest import _sweep

    tmp = tmp_path_factory.mktemp("tracked")
    grid = write_grid(tmp, GRID)
    args = ["--tracker", "tensorboard", "--tracker", "mlflow", "--tracker", "wandb"]
    out = _sweep("run", str(grid), "--num-cpus", "1", *args, cwd=tmp, WANDB_MODE="offline")
    assert out.returncode == 0, out.stderr
    assert f"tensorboard --logdir {tmp / 'results' / 'tiny' / 'tune'}" in out.stdout
    assert (
        f"sqlite:///{tmp / 'mlflow.db'}" in out.stdout
        and "W&B: project 'tiny', offline" in out.stdout
    )
    return tmp


@pytest.mark.ray
def test_tensorboard_has_each_trials_curve(tracked):
    from tensorboardX.proto import event_pb2

    runs = sorted((tracked / "results" / "tiny" / "tune" / "tiny").glob("*/events.out.tfevents.*"))
    assert len(runs) == 2
    for path in runs:
        steps = []
        for record in _tfrecords(path.read_bytes()):
            event = event_pb2.Event.FromString(record)
            steps += [event.step for v in event.summary.value if v.tag.endswith("/train_loss")]
        assert len(steps) == LOGGED_STEPS


def _tfrecords(data: bytes):
    # TFRecord: length (8 bytes), its crc (4), the record, its crc (4)
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        yield data[pos + 12 : pos + 12 + length]
        pos += 16 + length


@pytest.mark.ray
def test_mlflow_has_each_trial_as_a_run_with_params_and_history(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert {r.data.params["lr"] for r in runs} == {"0.001", "0.01"}
    for run in runs:
        assert run.data.params["optimizer"] == "adamw" and run.data.params["width"] == "32"
        assert run.info.run_name.startswith("adamw-w32-lr2^")
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == LOGGED_STEPS
        assert "final_val_loss" in run.data.metrics


@pytest.mark.ray
def test_wandb_offline_runs_hold_config_and_history(tracked):
    import json

    from wandb.proto import wandb_internal_pb2

    runs = sorted((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    lrs = set()
    for path in runs:
        config, history = {}, []
        for data in _wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record.FromString(data)
            kind = record.WhichOneof("record_type")
            # The config comes with the run record, or after it in config records (W&B sends
            # what it has at init with the run, and later updates on their own).
            if kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key) for i in record.history.item})
        assert config["optimizer"] == "adamw" and config["width"] == 32
        lrs.add(config["lr"])
        assert sum("train_loss" in keys for keys in history) == LOGGED_STEPS
    assert lrs == {1e-3, 1e-2}


def _wandb_records(data: bytes):
    # W&B's offline file: a 7-byte header, then LevelDB's log format: 32 KiB blocks of chunks,
    # each (crc: 4 bytes, length: 2, type: 1 full | 2 first | 3 middle | 4 last).
    block, pos, record = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            yield record


def test_wandb_is_offline_without_a_login(tmp_path, monkeypatch):
    from sweeper.trackers import _wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert _wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode() == "disabled"


def test_an_unknown_or_missing_tracker_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from sweeper.store import Store
    from sweeper.trackers import TrackerError, tracking_for

    store = Store(tmp_path, "s")
    with pytest.raises(TrackerError, match="unknown tracker 'neptune'"):
        tracking_for(["neptune"], "s", store)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TrackerError, match="needs the mlflow package: pip install mlflow"):
        tracking_for(["mlflow"], "s", store)
    assert not (tmp_path / "s").exists()
