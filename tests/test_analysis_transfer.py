"""Optimal lr per cell and its transfer across width, on synthetic stores with a known answer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.load import load_results
from analysis.optimum import find_optima
from analysis.pipeline import analyze
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store

# scion's optimum is fixed at 2^-7; adamw's falls by one octave per doubling of width
# (2^-5 at width 64 ... 2^-8 at width 512).
BASE = SyntheticConfig(
    name="transfer",
    optimizers={"scion": PlantedOptimizer(0.0, -7.0), "adamw": PlantedOptimizer(-1.0, -7.0)},
    widths=(64, 128, 256, 512),
    seeds=(0, 1, 2),
    log2_lr=(-11.0, -3.0, 0.5),
    steps=100,
    log_every=50,
    eval_every=50,
    diverge_octaves=2.5,
)


def planted(optimizer: str, width: int) -> float:
    slope = BASE.optimizers[optimizer].width_slope
    return -7.0 + slope * math.log2(width / BASE.ref_width)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("analysis"), BASE)


@pytest.fixture(scope="module")
def analysis(store):
    return analyze(store, predict_width=2048)


def test_cell_optima_recover_the_planted_lr(analysis):
    table = analysis.optima.table
    assert len(table) == 8
    assert (table["status"] == "ok").all() and (table["method"] == "shape").all()
    assert (table["noise"] == "seeds").all() and (table["flags"].map(len) == 0).all()
    truth = np.array(
        [planted(o, w) for o, w in zip(table["optimizer"], table["width"], strict=True)]
    )
    assert np.abs(table["log2_lr_star"] - truth).max() < 0.1
    inside = (table["ci_lo"] <= truth) & (truth <= table["ci_hi"])
    assert inside.mean() >= 0.75  # 95 % intervals; 8 cells
    assert (table["interior_frac"] > 0.99).all()
    # lrs 2.5 octaves above the optimum diverged and were counted, not dropped
    assert table["n_diverged"].sum() > 0
    assert (table["n_trials"] == 17 * 3).all()


@pytest.mark.parametrize(("optimizer", "slope"), [("adamw", -1.0), ("scion", 0.0)])
def test_transfer_slope_and_interval_contain_the_truth(analysis, optimizer, slope):
    (fit,) = [f for f in analysis.width_transfer if f.optimizer == optimizer]
    assert fit.status == "ok" and all(fit.used)
    assert fit.slope == pytest.approx(slope, abs=0.05)
    assert fit.slope_ci[0] <= slope <= fit.slope_ci[1]
    assert fit.slope_ci[1] - fit.slope_ci[0] < 0.2
    assert fit.verdict == ("transfers" if slope == 0.0 else "drifts")
    assert fit.tolerance == 0.25
    assert fit.drift == pytest.approx(3 * slope, abs=0.15)
    assert fit.wider_is_better is True and fit.best_loss_falls is True
    # prediction at width 2048, two doublings beyond the data
    pred = fit.prediction
    assert pred["extrapolation"] is True
    assert pred["log2_lr"] == pytest.approx(-7.0 + 3 * slope, abs=0.2)
    assert pred["log2_lr_ci"][0] <= -7.0 + 3 * slope <= pred["log2_lr_ci"][1]


def test_transfer_penalty(analysis):
    fits = {f.optimizer: f for f in analysis.width_transfer}
    # scion: copying the small model's lr costs nothing
    assert fits["scion"].penalty == pytest.approx(0.0, abs=0.002)
    assert fits["scion"].penalty_ci[0] <= fits["scion"].penalty <= fits["scion"].penalty_ci[1]
    # adamw: lr*(64) = 2^-5 is 3 octaves too high at width 512, where 2.5 octaves diverge
    assert fits["adamw"].penalty is None
    assert "diverges" in fits["adamw"].penalty_note


def test_penalty_is_the_loss_lost_when_the_lr_is_measured(tmp_path):
    cfg = dataclasses.replace(BASE, name="mild", diverge_octaves=None, seeds=(0,))
    cfg = dataclasses.replace(cfg, optimizers={"adamw": PlantedOptimizer(-0.5, -7.0)})
    an = analyze(write_synthetic_store(tmp_path, cfg))
    (fit,) = an.width_transfer
    # lr*(64) is 1.5 octaves off at width 512: curvature 0.03 x 1.5^2 = 0.0675 nats
    assert fit.penalty == pytest.approx(0.0675, abs=0.01)
    # one seed: no measured noise, so no interval per cell; the slope's comes from the scatter
    assert (an.optima.table["noise"] == "none").all()
    assert an.optima.table["ci_lo"].isna().all()
    assert (an.optima.table["flags"].map(lambda f: "single-seed" in f)).all()
    assert fit.noise == "scatter" and fit.slope_ci[0] <= -0.5 <= fit.slope_ci[1]
    assert fit.penalty_ci is None


def test_edge_flag_fires_when_the_optimum_is_outside_the_grid(tmp_path):
    cfg = dataclasses.replace(
        BASE,
        name="edge",
        seeds=(0,),
        diverge_octaves=None,
        optimizers={"scion": PlantedOptimizer(0.0, -1.0), "adamw": PlantedOptimizer(0.0, -13.0)},
    )
    an = analyze(write_synthetic_store(tmp_path, cfg))
    table = an.optima.table.set_index("optimizer")
    assert (table["status"] == "edge").all() and table["ci_lo"].isna().all()
    assert (table["flags"].map(lambda f: "edge" in f)).all()
    assert set(table.loc["scion", "edge_side"]) == {"high"}
    assert set(table.loc["adamw", "edge_side"]) == {"low"}
    for fit in an.width_transfer:
        assert fit.status == "impossible" and fit.slope is None
        assert fit.verdict == "inconclusive"
        assert "fit impossible" in fit.reason and "edge" in fit.reason
    reasons = {f.optimizer: f.reason for f in an.width_transfer}
    assert "larger lrs" in reasons["scion"] and "smaller lrs" in reasons["adamw"]


def test_metrics_agree_on_synthetic_data(store):
    base = find_optima(load_results(store, "final_val")).table["log2_lr_star"].to_numpy()
    for metric in ("smoothed_train", "last_frac"):
        other = find_optima(load_results(store, metric)).table["log2_lr_star"].to_numpy()
        assert np.abs(other - base).max() < 0.1


def test_depth_transfer(tmp_path):
    cfg = dataclasses.replace(
        BASE,
        name="depth",
        widths=(128,),
        depths=(1, 2, 4),
        seeds=(0, 1, 2),
        optimizers={"muon": PlantedOptimizer(0.0, -7.0, depth_slope=-0.5)},
    )
    an = analyze(write_synthetic_store(tmp_path, cfg))
    (fit,) = an.depth_transfer
    assert fit.axis == "depth" and fit.sizes == [1, 2, 4]
    assert fit.slope_ci[0] <= -0.5 <= fit.slope_ci[1]
    assert len(an.width_transfer) == 3  # one family per depth, each with one width
    for width_fit in an.width_transfer:
        assert width_fit.status == "impossible" and "only one width" in width_fit.reason


def test_divergence_bounded_optimum_gets_a_flag_and_no_interval(tmp_path):
    # Trials diverge 0.25 octave above the optimum: on a one-octave grid the last stable lr is
    # the lowest loss and the next one diverged.
    cfg = dataclasses.replace(
        BASE,
        name="cliff",
        log2_lr=(-11.0, -3.0, 1.0),
        diverge_octaves=0.25,
        optimizers={"scion": PlantedOptimizer(0.0, -6.9)},
    )
    an = analyze(write_synthetic_store(tmp_path, cfg))
    table = an.optima.table
    assert (table["status"] == "divergence_bounded").all()
    assert (table["flags"].map(lambda f: f == ["divergence-bounded"])).all()
    assert table["ci_lo"].isna().all() and table["ci_hi"].isna().all()
    (fit,) = an.width_transfer
    assert fit.status == "impossible" and fit.verdict == "inconclusive"
    assert "bounded by divergence at width 64, 128, 256, 512" in fit.reason


def test_a_slope_between_transfer_and_drift_is_inconclusive_until_the_tolerance_decides(
    tmp_path,
):
    # A true slope of -0.2 lies just inside the default band: its interval straddles the
    # band's edge, so neither claim can be made.
    cfg = dataclasses.replace(
        BASE, name="edge-of-band", optimizers={"muon": PlantedOptimizer(-0.2, -7.0)}
    )
    store = write_synthetic_store(tmp_path, cfg)
    (fit,) = analyze(store).width_transfer
    assert fit.slope_ci[0] < -0.25 < fit.slope_ci[1] < 0
    assert fit.verdict == "inconclusive" and "straddles" in fit.verdict_why
    (wide,) = analyze(store, tolerance=0.6).width_transfer
    assert wide.verdict == "transfers" and wide.tolerance == 0.6
    (narrow,) = analyze(store, tolerance=0.1).width_transfer
    assert narrow.verdict == "drifts"
    for bad in (0.0, -0.25, float("nan"), float("inf")):
        with pytest.raises(AnalysisError, match="tolerance must be a positive number"):
            analyze(store, tolerance=bad)
