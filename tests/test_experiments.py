"""The grid files under experiments/: each one validates through the real CLI, says what it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeper.spec import load_spec

SWEEP = Path(sys.executable).parent / "sweep"
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
GRIDS = sorted(EXPERIMENTS.rglob("*.yaml"))
STUDIES = ("cpu", "gpu")  # the two scales every study comes in

# a grid's count, or a search's most
COUNT = re.compile(r"^(\d+) trials: \d+ stored, \d+ to run|at most (\d+) trials\b", re.MULTILINE)
HEADER_TRIALS = re.compile(r"^# Trials: (\d+)\b", re.MULTILINE)


def _id(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


def header(path: Path) -> str:
    """The comment block the file starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_there_are_grid_files():
    assert any(p.parent.name == "cpu" for p in GRIDS), "no experiments/cpu/*.yaml"
    assert any(p.parent.name == "gpu" for p in GRIDS), "no experiments/gpu/*.yaml"


@pytest.mark.parametrize("path", GRIDS, ids=_id)
def test_begins_with_a_comment_header(path: Path):
    text = header(path)
    assert text, f"{_id(path)} must begin with a comment header"
    # A header that explains something: a title line and more than a line or two of prose.
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert len(words) >= 20, f"{_id(path)}: the header is too short to say what the file is"


@pytest.mark.e2e
@pytest.mark.parametrize("path", GRIDS, ids=_id)
def test_dry_run_validates(path: Path, tmp_path: Path):
    """`sweep run FILE --dry-run` exits 0 and prints the trial count (data may be absent)."""
    proc = subprocess.run(
        [str(SWEEP), "run", str(path), "--dry-run", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = COUNT.search(proc.stdout)
    assert found, f"no trial count in the dry run's output:\n{proc.stdout}"
    count = int(found.group(1) or found.group(2))
    assert count > 0
    # A header that states the trial count must state the one the grid expands to.
    stated = HEADER_TRIALS.search(header(path))
    if stated:
        assert int(stated.group(1)) == count, (
            f"{_id(path)}: the header says {stated.group(1)} trials, the grid expands to {count}"
        )


@pytest.mark.parametrize("path", [p for p in GRIDS if p.parent.name in STUDIES], ids=_id)
def test_study_header_states_its_trial_count(path: Path):
    assert HEADER_TRIALS.search(header(path)), f"{_id(path)}: no '# Trials: N' line in the header"


def test_every_study_comes_at_both_scales():
    names = {scale: {p.stem for p in GRIDS if p.parent.name == scale} for scale in STUDIES}
    assert names["cpu"] == names["gpu"], names


def test_sweep_names_are_unique():
    """Two files with one name would share a results folder and mix their trials."""
    names = [load_spec(p).name for p in GRIDS]
    assert len(names) == len(set(names)), sorted(names)


@pytest.mark.parametrize("path", [p for p in GRIDS if p.parent.name == "cpu"], ids=_id)
def test_cpu_scale_needs_no_download_and_no_gpu(path: Path):
    spec = load_spec(path)
    assert spec.data.corpus == "stdlib"
    assert spec.resources.gpu == 0
    assert spec.train.device != "cuda"


@pytest.mark.parametrize("path", [p for p in GRIDS if p.parent.name == "gpu"], ids=_id)
def test_gpu_scale_reads_fineweb_shards_on_gpus(path: Path):
    # As written (load_spec makes relative globs absolute against the working directory).
    data = yaml.safe_load(path.read_text())["data"]
    assert data == {
        "shards": "data/fineweb10B/fineweb_train_*.bin",
        "val_shards": "data/fineweb10B/fineweb_val_*.bin",
    }
    spec = load_spec(path)
    assert spec.data.resolved_vocab_size == 50304
    assert spec.resources.gpu > 0
