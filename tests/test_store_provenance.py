"""Provenance: each trained trial records the versions, machine and code that ran it, in the
trials table, without changing its id."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trial_specs import make_trial

import sweeper
from sweeper import train
from sweeper.spec import TrialSpec
from sweeper.store import PROVENANCE_COLUMNS, TRIALS_COLUMNS, Store, TrialResult
from sweeper.train import provenance, run_trial

torch.set_num_threads(1)
PACKAGE = Path(sweeper.__file__).resolve().parent


def test_a_trained_trial_records_what_ran_it(tmp_path):
    spec = make_trial(steps=4, log_every=2, eval_every=4)
    tid = spec.trial_id
    result = run_trial(spec)
    prov = result.provenance
    assert set(prov) == set(PROVENANCE_COLUMNS)
    assert prov["sweeper_version"] == sweeper.__version__ == importlib.metadata.version("sweeper")
    assert prov["torch_version"] == importlib.metadata.version("torch") == torch.__version__
    assert prov["ray_version"] == importlib.metadata.version("ray")
    assert prov["python_version"] == platform.python_version()
    assert prov["cpu_model"]
    assert prov["gpu_name"] is None  # ran on the CPU
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True)
    if head.returncode == 0:
        assert prov["git_commit"] == head.stdout.decode().strip()
        assert isinstance(prov["git_dirty"], bool)

    store = Store(tmp_path, "s")
    store.write_trial(spec, result)
    row = store.read("trials").to_pylist()[0]
    assert {k: row[k] for k in PROVENANCE_COLUMNS} == prov
    assert row["trial_id"] == tid == spec.trial_id  # provenance is no part of the id


def test_provenance_never_enters_a_trial_id(tmp_path):
    assert not set(PROVENANCE_COLUMNS) & set(TrialSpec.model_fields)
    assert set(PROVENANCE_COLUMNS) <= {name for name, _, _ in TRIALS_COLUMNS}
    spec = make_trial()
    store = Store(tmp_path, "s")
    for commit in ("a" * 40, "b" * 40):  # the same trial from two checkouts: one trial
        store.write_trial(spec, TrialResult("failed", provenance={"git_commit": commit}))
    assert store.read("trials")["git_commit"].to_pylist() == ["b" * 40]
    with pytest.raises(ValueError, match="provenance has fields the store does not know"):
        store.write_trial(spec, TrialResult("failed", provenance={"gpu": "x"}))


def test_provenance_is_computed_once_per_process():
    train._process_provenance.cache_clear()
    provenance(torch.device("cpu"))
    provenance(torch.device("cpu"))
    info = train._process_provenance.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def _package_copy(where: Path) -> Path:
    package = where / "sweeper"
    package.mkdir(parents=True)
    shutil.copy(PACKAGE / "__init__.py", package / "__init__.py")
    return package


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_state_of_a_checkout_a_copy_and_an_untracked_copy(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    repo = tmp_path / "repo"
    package = _package_copy(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "sweeper"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert train._git_state(package) == {"git_commit": head.stdout.strip(), "git_dirty": False}
    (package / "new.py").write_text("x = 1\n")  # uncommitted code in the package: dirty
    assert train._git_state(package)["git_dirty"] is True
    (package / "new.py").unlink()
    (repo / "notes.txt").write_text("beside the package: not the code that ran\n")
    assert train._git_state(package)["git_dirty"] is False
    # an installed copy inside some other checkout (a venv in a project) is not its code
    installed = _package_copy(repo / ".venv" / "site-packages")
    assert train._git_state(installed) == {"git_commit": None, "git_dirty": None}
    # not a checkout at all
    assert train._git_state(_package_copy(tmp_path / "plain")) == {
        "git_commit": None,
        "git_dirty": None,
    }


def test_git_missing_or_hanging_gives_nulls_quickly(tmp_path, monkeypatch):
    package = _package_copy(tmp_path)
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert train._git_state(package) == {"git_commit": None, "git_dirty": None}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(train, "GIT_TIMEOUT_S", 0.2)
    start = time.perf_counter()
    assert train._git_state(package) == {"git_commit": None, "git_dirty": None}
    assert time.perf_counter() - start < 5
