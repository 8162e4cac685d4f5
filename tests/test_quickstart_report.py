"""The committed quickstart report is what the current code produces from its store.

The reference run's report is in results/reference/quickstart/report and its store (the transfer
search's trials) in tests/data/quickstart, both out of the quickstart command's way: the README's
commands in their written order (install, quickstart, tests) must all pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import write_report

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "results" / "reference" / "quickstart" / "report"
STORE = ROOT / "tests" / "data" / "quickstart"


def test_committed_report_matches_the_current_analysis(tmp_path):
    committed = json.loads((REPORT / "fits.json").read_text())
    fresh = json.loads((write_report(STORE, tmp_path).parent / "fits.json").read_text())
    assert fresh["figures"] == committed["figures"]
    assert fresh["counts"] == committed["counts"]
    assert len(fresh["optima"]) == len(committed["optima"])
    for new, old in zip(fresh["optima"], committed["optima"], strict=True):
        assert (new["label"], new["status"]) == (old["label"], old["status"])
        assert new["log2_lr_star"] == pytest.approx(old["log2_lr_star"], abs=1e-6)
        assert new["loss_star"] == pytest.approx(old["loss_star"], abs=1e-6)
    for new, old in zip(fresh["width_transfer"], committed["width_transfer"], strict=True):
        assert (new["label"], new["slope"]) == (old["label"], pytest.approx(old["slope"]))
        assert new["verdict"] == old["verdict"] and new["slope_ci"] == pytest.approx(
            old["slope_ci"]
        )
    for name in committed["figures"].values():
        assert name is None or (REPORT / name).is_file()


def test_committed_store_is_the_current_quickstarts_finished_search():
    import pandas as pd

    from sweeper.data import fingerprint
    from sweeper.orchestrate import plan
    from sweeper.spec import load_spec

    spec = load_spec(ROOT / "experiments" / "quickstart.yaml")
    trials = pd.read_parquet(STORE / "trials", columns=["trial_id", "data_fingerprint"])
    if set(trials.data_fingerprint) != {fingerprint(spec.data)}:
        pytest.skip(
            "this machine's Python standard library differs from the one the committed "
            "quickstart was trained on, so its trial ids differ"
        )
    p = plan(spec, str(STORE.parent))
    assert set(trials.trial_id) <= {t.trial_id for t in p.trials}  # the grid's own trials
    assert p.search is not None and not p.todo  # and the search proposes nothing more


def test_the_quickstart_command_writes_nothing_a_test_reads():
    """Running the quickstart before the tests (the README's order) cannot change their inputs."""
    import subprocess

    from sweeper.spec import load_spec

    spec = load_spec(ROOT / "experiments" / "quickstart.yaml")
    writes = Path(spec.results).resolve() / spec.name  # the store, and its report/ inside
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    inside = [f for f in tracked if (ROOT / f).resolve().is_relative_to(writes)]
    assert inside == [], f"the quickstart would overwrite committed files: {inside[:3]}"
    for committed in (REPORT, STORE):
        assert not committed.resolve().is_relative_to(writes)
