"""Every committed report is what the current analysis derives from its committed store, and
every committed store is what its experiment file runs today.

Each study's folder under results/reference/ is its sweep's folder as `sweep run` left it (the
trials, compacted) with the `report/` that `sweep report` wrote from it. A change to the analysis
that moves a committed number or a verdict fails here, so a committed report cannot silently go
stale: re-run `sweep report results/reference/STUDY` and say in the study's README what moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analysis.pipeline import analyze
from analysis.report import build_fits
from sweeper.spec import TrialSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
STUDIES = sorted(p.name for p in REFERENCE.iterdir() if (p / "report" / "fits.json").is_file())
# Where the numbers come from, not what they are: the store's path, the clock, the run's timings;
# and the figures' file names (drawing them would double the test's time; the report's own tests
# draw every figure, and each named one is checked to be committed).
UNCOMPARED = {("meta", "results"), ("meta", "generated_at"), ("meta", "timings_s"), ("figures",)}
# The bootstrap is seeded, so on one machine the numbers repeat exactly; another BLAS or CPU
# rounds the fits' arithmetic differently, within this.
REL, ABS = 1e-6, 1e-9


def differences(new, old, path: tuple = ()) -> list[str]:
    """Where two fits.json trees differ: words and structure exactly, numbers within REL/ABS."""
    if any(path[: len(u)] == u for u in UNCOMPARED):
        return []
    where = "/".join(map(str, path)) or "<top>"
    if isinstance(old, dict) and isinstance(new, dict):
        if new.keys() != old.keys():
            return [f"{where}: keys {sorted(new)} != {sorted(old)}"]
        return [d for k in old for d in differences(new[k], old[k], (*path, k))]
    if isinstance(old, list) and isinstance(new, list):
        if len(new) != len(old):
            return [f"{where}: {len(new)} items != {len(old)}"]
        pairs = enumerate(zip(new, old, strict=True))
        return [d for i, (n, o) in pairs for d in differences(n, o, (*path, i))]
    numbers = (int, float)
    if (
        isinstance(old, numbers)
        and isinstance(new, numbers)
        and not isinstance(old, bool)
        and not isinstance(new, bool)
    ):
        return (
            [] if math.isclose(new, old, rel_tol=REL, abs_tol=ABS) else [f"{where}: {new} != {old}"]
        )
    return [] if new == old else [f"{where}: {new!r} != {old!r}"]


def test_differences_sees_a_moved_number_a_flipped_verdict_and_a_lost_row():
    old = {"meta": {"generated_at": "x"}, "w": [{"verdict": "transfers", "slope": -0.1}]}
    assert differences({"meta": {"generated_at": "y"}, "w": old["w"]}, old) == []
    assert differences({**old, "w": [{"verdict": "transfers", "slope": -0.1 + 1e-12}]}, old) == []
    assert differences({**old, "w": [{"verdict": "transfers", "slope": -0.2}]}, old)
    assert differences({**old, "w": [{"verdict": "drifts", "slope": -0.1}]}, old)
    assert differences({**old, "w": []}, old)


def test_there_are_committed_reports():
    assert "quickstart" in STUDIES


@pytest.mark.parametrize("study", STUDIES)
def test_committed_report_is_rederived_from_its_store(study):
    committed_dir = REFERENCE / study / "report"
    committed = json.loads((committed_dir / "fits.json").read_text())
    # The numbers write_report puts in fits.json, without drawing the figures.
    fresh = json.loads(json.dumps(build_fits(analyze(REFERENCE / study)), allow_nan=False))
    found = differences(fresh, committed)
    assert not found, f"{study}: the committed report is stale:\n" + "\n".join(found[:20])
    for name in committed["figures"].values():
        assert name is None or (committed_dir / name).is_file()


def experiment_file(study: str) -> Path:
    """The grid file a committed study ran: the quickstart's, or its CPU-scale study file."""
    if study == "quickstart":
        return ROOT / "experiments" / "quickstart.yaml"
    return ROOT / "experiments" / "cpu" / f"{study}.yaml"


@pytest.mark.parametrize("study", STUDIES)
def test_committed_store_is_its_experiment_files_finished_run(study):
    """Editing a study's file (its grid, its search) without running it again fails here."""
    import pandas as pd

    from sweeper.data import fingerprint
    from sweeper.orchestrate import plan

    spec = load_spec(experiment_file(study))
    assert spec.name == study
    trials = pd.read_parquet(
        REFERENCE / study / "trials", columns=["trial_id", "data_fingerprint", "spec"]
    )
    if set(trials.data_fingerprint) != {fingerprint(spec.data)}:
        pytest.skip(
            "this machine's Python standard library differs from the one the committed "
            "study was trained on, so its trial ids differ"
        )
    p = plan(spec, str(REFERENCE))
    grid = {t.trial_id for t in p.trials}
    # The grid's own trials, and those a search ran past an lr range's end, following an
    # optimum there: each of a grid cell (equal in all but lr and seed), beyond its lrs.
    ranges: dict[str, list[float]] = {}
    for t in p.trials:
        ranges.setdefault(_cell_id(t), []).append(t.lr)
    for trial_id, text in zip(trials.trial_id, trials.spec, strict=True):
        if trial_id in grid:
            continue
        t = TrialSpec.model_validate_json(text)
        lrs = ranges.get(_cell_id(t))
        assert lrs is not None, f"{study}: stored trial {trial_id} is of no cell of the grid"
        assert not min(lrs) <= t.lr <= max(lrs), f"{study}: {trial_id} is inside the lr range"
    assert not p.todo  # and nothing is left to run or to search


def _cell_id(trial: TrialSpec) -> str:
    return trial.model_copy(update={"lr": 1.0, "seed": 0}).trial_id


@pytest.mark.parametrize("study", STUDIES)
def test_running_a_study_writes_nothing_a_test_reads(study):
    """A user's run of the study (the quickstart first, in the README's order) writes to its own
    folder under results/, never over the committed one."""
    import subprocess

    spec = load_spec(experiment_file(study))
    writes = (ROOT / spec.results).resolve() / spec.name  # the store, and its report/ inside
    assert not (REFERENCE / study).resolve().is_relative_to(writes)
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    inside = [f for f in tracked if (ROOT / f).resolve().is_relative_to(writes)]
    assert inside == [], f"running {study} would overwrite committed files: {inside[:3]}"
