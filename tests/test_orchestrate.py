"""Planning and resource checks, without starting Ray."""

from __future__ import annotations

import pytest

from sweeper.orchestrate import SweepError, check_resources, plan
from sweeper.spec import TrialSpec, expand, parse_spec
from sweeper.store import TrialResult

NODES = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 8.0}]


def test_requests_that_some_node_meets_pass():
    check_resources({"cpu": 16, "gpu": 0.25}, NODES)
    check_resources({"cpu": 1, "gpu": 1}, NODES)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        ({"cpu": 1, "gpu": 2}, ["2 GPU", "largest has 1 GPU", "1 GPU in all"]),
        ({"cpu": 32, "gpu": 0}, ["32 CPU", "largest has 16 CPU"]),
    ],
)
def test_impossible_requests_are_refused_with_the_numbers(request_, words):
    with pytest.raises(SweepError) as err:
        check_resources(request_, NODES)
    for w in words:
        assert w in str(err.value)


def test_gpu_on_a_cpu_only_cluster():
    with pytest.raises(SweepError, match="0.25 GPU.*largest has 0 GPU"):
        check_resources({"cpu": 1, "gpu": 0.25}, [{"CPU": 2.0}])


def spec(tmp_path, **grid):
    return parse_spec(
        {
            "name": "p",
            "results": str(tmp_path),
            "train": {"steps": 2},
            "grid": {"width": [32], "optimizer": {"adamw": {"lr": [0.1, 0.01]}}, **grid},
        }
    )


def test_plan_subtracts_finished_trials_but_not_failed_ones(tmp_path):
    p = plan(spec(tmp_path))
    assert len(p.trials) == len(p.todo) == 2
    p.store.write_trial(p.trials[0], TrialResult("diverged"))
    p.store.write_trial(p.trials[1], TrialResult("failed", {"error": "x"}))
    again = plan(spec(tmp_path))
    assert [t.trial_id for t in again.todo] == [p.trials[1].trial_id]


def test_unknown_optimizer_setting_is_refused_before_anything_runs(tmp_path):
    bad = spec(tmp_path, optimizer={"muon": {"lr": 0.02, "adam_lr": 1e-3, "nesterow": True}})
    with pytest.raises(SweepError, match=r"grid.optimizer.muon.nesterow.*accepted: .*nesterov"):
        plan(bad)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"lmo_hidden": "foo"}, "unknown lmo_hidden 'foo'"),
        ({"momentum": [0.1, 0.0]}, "momentum"),
    ],
)
def test_values_an_optimizer_refuses_are_grid_errors(tmp_path, setting, words):
    bad = spec(tmp_path, optimizer={"scion": {"lr": 0.01, **setting}})
    with pytest.raises(SweepError, match=r"grid.optimizer.scion: ") as err:
        plan(bad)
    assert words in str(err.value)
    assert not any(tmp_path.iterdir())


def test_tune_sees_each_trial_as_flat_scalars_and_a_readable_name():
    from sweeper.orchestrate import _varying, trial_name, tune_config

    s = parse_spec(
        {
            "name": "p",
            "train": {"steps": 2},
            "grid": {
                "width": [32, 64],
                "seed": [0, 1],
                "optimizer": {
                    "adamw": {"lr": [2**-7]},
                    "scion": {"lr": [0.01], "momentum": [0.1], "lr_output": [0.5]},
                },
            },
        }
    )
    trials = expand(s, "fp")
    config = tune_config(trials[0])
    scalars = {k: v for k, v in config.items() if k != "spec"}
    assert all(isinstance(v, int | float | str) for v in scalars.values())
    assert scalars["optimizer"] == "adamw" and scalars["width"] == 32
    assert scalars["lr"] == 2**-7 and scalars["log2_lr"] == -7 and scalars["seed"] == 0
    assert scalars["store_trial_id"] == trials[0].trial_id
    assert TrialSpec.model_validate_json(config["spec"]) == trials[0]
    scion = next(t for t in trials if t.optimizer == "scion")
    assert tune_config(scion)["momentum"] == 0.1 and tune_config(scion)["lr_output"] == 0.5

    assert trial_name(trials[0], _varying(trials)) == "adamw-w32-lr2^-7-s0"
    assert trial_name(scion, _varying(trials)).startswith("scion-w32-lr2^-6.64386-output0.5-")


def test_tune_scratch_of_a_killed_controller_goes_at_the_next_run(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    from sweeper.orchestrate import _tune_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    left = tmp_path / f"sweeper-tune-{dead}-abc"
    (left / "tiny").mkdir(parents=True)
    running = tmp_path / f"sweeper-tune-{os.getppid()}-def"  # a live controller's
    running.mkdir()
    mine = _tune_scratch()
    assert not left.exists() and running.exists()
    assert os.path.basename(mine).startswith(f"sweeper-tune-{os.getpid()}-")
