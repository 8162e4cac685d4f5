"""The calibration benchmark (benchmarks/calibration.py): its generator plants what it says, and
a fast run through the real `sweep report` scores every cell and family.

The calibration targets of issue 9 are asserted on a few families per scenario (the
`test_target_*` tests), with thresholds loosened for sampling error on 6 families; the full
benchmark measures them properly (benchmarks/results/calibration.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import calibration as cal  # noqa: E402

from sweeper.store import Store  # noqa: E402

# A subset of the scenarios: the ones the verdict targets are about, on the one-octave grid.
FAST = ("oct-3seed-slope+0", "oct-3seed-slope-0.4", "oct-1seed-slope-0.4")
FAST_FAMILIES = 6


def _scenario(name: str) -> tuple[int, cal.Scenario]:
    return next((i, sc) for i, sc in enumerate(cal.SCENARIOS) if sc.name == name)


def test_scenarios_cover_the_issue():
    assert {sc.step for sc in cal.SCENARIOS} == {1.0, 0.5}
    assert {sc.seeds for sc in cal.SCENARIOS} == {1, 3}
    assert {sc.slope for sc in cal.SCENARIOS} == {0.0, -0.4, -1.0}
    assert len({sc.name for sc in cal.SCENARIOS}) == len(cal.SCENARIOS)
    assert all(name in {sc.name for sc in cal.SCENARIOS} for name in FAST)


@pytest.mark.parametrize("shape", cal.SHAPES)
def test_shapes_are_asymmetric_with_minimum_at_zero(shape):
    sc = cal.Scenario(1.0, 3, 0.0, (shape,))
    for i in range(5):
        fam = cal.make_family(sc, i, 0)
        u = np.linspace(-4, 4, 8001)
        y = cal.shape_loss(shape, fam.params, u)
        assert abs(u[np.argmin(y)]) < 1e-3
        assert cal.shape_loss(shape, fam.params, 0.0) == pytest.approx(0.0)
        for d in (0.5, 1.0, 2.0):  # steeper above the optimum than below
            above = cal.shape_loss(shape, fam.params, d)
            below = cal.shape_loss(shape, fam.params, -d)
            assert above > below > 0
        assert cal.shape_loss(shape, fam.params, 2.0) > 2 * cal.shape_loss(shape, fam.params, -2.0)
        # near the optimum: curvature of a few hundredths of a nat per octave^2 (vee is sharper)
        h = 0.05
        curv = (cal.shape_loss(shape, fam.params, h) + cal.shape_loss(shape, fam.params, -h)) / (
            h * h
        )
        assert 0.02 < curv < 0.6


def test_asymmetry_drifts_mildly_with_width():
    sc = cal.SCENARIOS[0]
    fams = [cal.make_family(sc, i, 0) for i in range(30)]
    for f in fams:
        ratios = [f.asym(w) for w in cal.WIDTHS]
        assert all(0.7 < r < 1.4 for r in ratios)
        assert np.prod(ratios) == pytest.approx(1.0)  # centred on the middle width
    assert len({round(f.asym_trend, 6) for f in fams}) == 30


def test_families_are_reproducible_and_distinct():
    sc = cal.SCENARIOS[0]
    a = [cal.make_family(sc, i, 0) for i in range(10)]
    b = [cal.make_family(sc, i, 0) for i in range(10)]
    assert a == b
    assert len({f.weight_decay for f in a}) == 10
    assert len({f.centre for f in a}) == 10
    # the optimum falls anywhere between grid points
    assert all(abs(f.centre - cal.CENTRE) <= cal.OFFSET for f in a)
    offsets = [
        (f.centre - cal.CENTRE) % 1.0 for f in (cal.make_family(sc, i, 0) for i in range(60))
    ]
    assert min(offsets) < 0.2 and max(offsets) > 0.8
    assert {f.shape for f in a} == set(cal.SHAPES)


@pytest.mark.parametrize("name", [sc.name for sc in cal.SCENARIOS])
def test_grid_spans_about_four_octaves_around_every_optimum(name):
    _, sc = _scenario(name)
    lo, hi, step = cal.grid_log2(sc)
    assert step == sc.step
    for w in cal.WIDTHS:
        for c in (cal.CENTRE - cal.OFFSET, cal.CENTRE + cal.OFFSET):
            x = c + sc.slope * math.log2(w / cal.REF_WIDTH)
            assert x - lo >= cal.SPAN - cal.OFFSET - 1e-9
            assert hi - x >= cal.SPAN - cal.OFFSET - 1e-9
            spread = sc.slope * math.log2(max(cal.WIDTHS) / cal.REF_WIDTH)
            assert x - lo <= cal.SPAN + cal.OFFSET + abs(spread) + step + 1e-9
            assert hi - x <= cal.SPAN + cal.OFFSET + abs(spread) + step + 1e-9


@pytest.mark.parametrize("name", ["oct-3seed-slope-1", "0.5oct-1seed-slope-0.4"])
def test_noiseless_family_plants_its_optimum_and_cliff(name):
    """Argmin within one grid step of the truth; every trial above cliff diverges, none below."""
    idx, sc = _scenario(name)
    families = [cal.make_family(sc, i, idx, noiseless=True) for i in range(6)]
    by_wd = {f.weight_decay: f for f in families}
    specs = cal.scenario_trials(sc, families, "t")
    assert len(specs) == len(families) * len(cal.WIDTHS) * sc.seeds * len(
        np.arange(cal.grid_log2(sc)[0], cal.grid_log2(sc)[1] + 1e-9, sc.step)
    )
    rng = np.random.default_rng(0)
    curves: dict[tuple, list] = {}
    for spec in specs:
        fam = by_wd[round(spec.hparams["weight_decay"], 8)]
        res = cal.trial_result(fam, spec, rng)
        x = math.log2(spec.lr)
        u = x - fam.x_star(spec.width)
        if res.status == "diverged":
            assert u > fam.cliff
            assert res.summary["final_val_loss"] is None
            assert math.isnan(res.steps[-1]["train_loss"]) and len(res.steps) >= 2
            loss = math.inf
        else:
            assert res.status == "completed" and u <= fam.cliff
            loss = res.summary["final_val_loss"]
            asym = fam.asym(spec.width)
            assert loss == pytest.approx(
                cal.floor_loss(spec.width) + float(cal.shape_loss(fam.shape, fam.params, u, asym))
            )
            assert res.steps[-1]["step"] == spec.steps
        curves.setdefault((fam.index, spec.width, spec.seed), []).append((x, loss))
    n_diverged = 0
    for (fi, width, _), pts in curves.items():
        xs, ys = np.array(pts).T
        truth = families[fi].x_star(width)
        assert abs(xs[np.argmin(ys)] - truth) <= sc.step + 1e-9
        n_diverged += int(np.isinf(ys).sum())
        assert np.isinf(ys[xs > truth + cal.CLIFF[1]]).all()  # the cliff is planted
    assert n_diverged > 0


def test_seed_offset_is_shared_across_lrs_and_widths():
    idx, sc = _scenario("oct-3seed-slope+0")
    fam = cal.make_family(sc, 0, idx)
    noiseless = cal.make_family(sc, 0, idx, noiseless=True)
    specs = [
        s
        for s in cal.scenario_trials(sc, [fam], "t")
        if math.log2(s.lr) - fam.x_star(s.width) < fam.cliff - 1
    ]
    rng = np.random.default_rng(1)
    diffs: dict[int, list] = {}
    for s in specs:
        a = cal.trial_result(fam, s, rng).summary["final_val_loss"]
        b = cal.trial_result(noiseless, s, rng).summary["final_val_loss"]
        diffs.setdefault(s.seed, []).append(a - b)
    for seed, d in diffs.items():
        # offset + independent noise: mean is the seed's offset, spread the per-trial sigma
        assert np.mean(d) == pytest.approx(fam.seed_offsets[seed], abs=4 * fam.noise)
        assert 0.3 * fam.noise < np.std(d) < 2 * fam.noise


def test_store_holds_the_planted_trials(tmp_path):
    idx, sc = _scenario("oct-1seed-slope-0.4")
    families = [cal.make_family(sc, i, idx) for i in range(2)]
    path = cal.write_store(tmp_path, sc, families, "calib")
    trials = Store(tmp_path, "calib").read("trials", ["trial_id", "status", "hparams"]).to_pylist()
    assert len(trials) == len(cal.scenario_trials(sc, families, "calib"))
    assert {t["status"] for t in trials} == {"completed", "diverged"}
    assert {json.loads(t["hparams"])["weight_decay"] for t in trials} == {
        f.weight_decay for f in families
    }
    assert path == tmp_path / "calib"


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("calibration")
    return cal.main(
        [
            "--families",
            str(FAST_FAMILIES),
            "--jobs",
            "1",
            "--out",
            str(out),
            "--work",
            str(out / "stores"),
            "--scenarios",
            *FAST,
        ]
    ) | {"out": out}


def _by_name(run: dict) -> dict[str, dict]:
    return {r["scenario"]: r for r in run["scenarios"]}


@pytest.mark.e2e
def test_report_scores_every_cell_and_family(fast_run):
    assert (fast_run["out"] / "calibration.json").exists()
    md = (fast_run["out"] / "calibration.md").read_text()
    assert "## Targets (issue 9)" in md and "Machine:" in md
    for name in FAST:
        r = _by_name(fast_run)[name]
        assert r["report_rc"] == 0, r.get("report_error")
        cells, fams = r["lr_star"], r["transfer"]
        assert cells["unmatched"] == 0 and fams["unmatched"] == 0
        assert cells["n_cells"] == FAST_FAMILIES * len(cal.WIDTHS)
        assert fams["n_families"] == FAST_FAMILIES
        assert cells["n_estimates"] >= 0.9 * cells["n_cells"]
        assert sum(fams["verdicts"].values()) == FAST_FAMILIES
        # sanity: the fitted optimum is within an octave or so of the truth on average
        assert cells["mae"] < 1.0
    assert {t["id"] for t in fast_run["targets"]} == {t[0] for t in cal.TARGETS}


# Loose versions of the issue's targets on 6 families per scenario (the full benchmark has ~48).
@pytest.mark.e2e
def test_target_mae_3seed_one_octave(fast_run):
    for name in ("oct-3seed-slope+0", "oct-3seed-slope-0.4"):
        assert _by_name(fast_run)[name]["lr_star"]["mae"] <= 0.3  # target 0.2


@pytest.mark.e2e
def test_target_lr_interval_coverage(fast_run):
    for name in FAST:
        cells = _by_name(fast_run)[name]["lr_star"]
        if cells["coverage"] is None and name.startswith("oct-1seed"):
            assert cells["null_share"] == 1  # one seed, no interval: no false claim either
            continue
        assert cells["coverage"] >= 0.7  # target 0.85


@pytest.mark.e2e
def test_target_slope_interval_coverage(fast_run):
    for name in FAST:
        fams = _by_name(fast_run)[name]["transfer"]
        if fams["slope_coverage"] is None and name.startswith("oct-1seed"):
            assert fams["slope_null_share"] == 1
            continue
        assert fams["slope_coverage"] >= 0.65  # target 0.85


@pytest.mark.e2e
def test_target_verdicts(fast_run):
    runs = _by_name(fast_run)
    share = {n: runs[n]["transfer"]["verdict_share"] for n in FAST}
    assert share["oct-3seed-slope+0"]["drifts"] <= 1 / 6  # target 0.10
    assert share["oct-3seed-slope-0.4"]["transfers"] <= 1 / 6  # target 0.10
    assert share["oct-1seed-slope-0.4"]["transfers"] <= 1 / 6  # target 0.10
