"""The committed quickstart store is the quickstart's finished search, out of its command's way.

The reference run's report and store (the transfer search's trials) are in
results/reference/quickstart, out of the quickstart command's way: the README's commands in their
written order (install, quickstart, tests) must all pass. That the report is what the current
analysis derives from the store is tests/test_committed_reports.py's job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "results" / "reference" / "quickstart"  # the sweep's folder: trials, report/


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
    assert not STORE.resolve().is_relative_to(writes)
