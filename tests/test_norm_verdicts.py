"""Planted answers for the norm-transfer verdicts and for which horizons the scaling laws trust.

Norm transfer: the loss-optimal log2 output norm x0 is planted constant (5.0) or drifting by
one octave per doubling of width; its trends against log2 width and log2 horizon must come out
`transfers`, `drifts`, or `inconclusive` when there are too few fits. Scaling: horizons read in
the middle of a run whose lr has begun to decay must not enter a law, and a law with as many
points as terms must not be reported as an exponent.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis.horizons import horizon_table, last_clean_step
from analysis.load import load_results
from analysis.norm_transfer import fit_norm_transfer
from analysis.report import conclusions
from analysis.scaling import (
    SCALING_GROUP,
    fit_batch_law,
    fit_lr_law,
    fit_scaling,
    optima_at_horizons,
)
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store
from analysis.verdict import DEFAULT_TOLERANCE

# 128 steps of 32 x 32 tokens: D = 2^17, read at D/4, D/2 and D (rows every 8 steps).
D = 2**17
HORIZONS = [D // 4, D // 2, D]
NORM = SyntheticConfig(
    name="norm",
    optimizers={"scion": PlantedOptimizer(0.0, -7.0)},
    widths=(64, 128, 256),
    batch_sizes=(32,),
    seeds=(0, 1, 2),
    log2_lr=(-11.0, -3.0, 1.0),
    steps=128,
    log_every=8,
    eval_every=1024,
    seq_len=32,
    diverge_octaves=None,
    optimal_log2_norm=5.0,
)


def _horizons(tmp_path_factory, config: SyntheticConfig) -> pd.DataFrame:
    root = tmp_path_factory.mktemp(config.name)
    return horizon_table(load_results(write_synthetic_store(root, config)), HORIZONS)


@pytest.fixture(scope="module")
def constant(tmp_path_factory) -> pd.DataFrame:
    return _horizons(tmp_path_factory, NORM)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> pd.DataFrame:
    return _horizons(
        tmp_path_factory, dataclasses.replace(NORM, name="drift", norm_width_slope=1.0)
    )


def _trends(nt) -> dict[str, dict]:
    (width,), (horizon,) = nt.across_widths, nt.across_horizons
    return {"width": width, "horizon": horizon}


# --------------------------------------------------------------------------- norm transfer


def test_constant_norm_transfers_across_width_and_horizon(constant):
    nt = fit_norm_transfer(constant, n_bootstrap=200)
    for axis, rec in _trends(nt).items():
        assert rec["axis"] == axis and rec["verdict"] == "transfers", rec["verdict_why"]
        assert rec["n_fits"] == 9 and rec["n_horizons"] == 3 and rec["n_widths"] == 3
        assert rec["slope_ci_method"] == "bootstrap"
        assert -DEFAULT_TOLERANCE <= rec["slope_ci"][0] <= 0.0 <= rec["slope_ci"][1]
        assert rec["slope_ci"][1] <= DEFAULT_TOLERANCE and rec["tolerance"] == DEFAULT_TOLERANCE
        # the x0 values that entered, each with its interval
        assert len(rec["fits"]) == 9 and rec["not_used"] == []
        for f in rec["fits"]:
            assert f["log2_norm_opt"] == pytest.approx(5.0, abs=0.1)
            assert f["log2_norm_opt_ci"][0] < f["log2_norm_opt"] < f["log2_norm_opt_ci"][1]
    summary = nt.summary["by_optimizer"]["scion"]
    assert summary["width"]["verdict"] == summary["horizon"]["verdict"] == "transfers"
    assert nt.summary["tolerance"] == DEFAULT_TOLERANCE


def test_norm_drifting_one_octave_per_width_doubling_drifts(drifting):
    trends = _trends(fit_norm_transfer(drifting, n_bootstrap=200))
    width = trends["width"]
    assert width["verdict"] == "drifts", width["verdict_why"]
    assert width["slope"] == pytest.approx(1.0, abs=0.1)
    assert width["slope_ci"][0] > DEFAULT_TOLERANCE
    # the horizon trend is judged with the width trend fitted alongside: still flat
    assert trends["horizon"]["verdict"] == "transfers", trends["horizon"]["verdict_why"]


def test_the_tolerance_is_the_callers(constant):
    nt = fit_norm_transfer(constant, n_bootstrap=200, tolerance=1e-4)
    for rec in _trends(nt).values():
        assert rec["tolerance"] == 1e-4 and rec["verdict"] != "transfers"
    assert nt.summary["tolerance"] == 1e-4


@pytest.mark.parametrize(
    ("widths", "horizons", "says"),
    [
        ((64, 128), (D,), "2 fits over 1 horizon"),  # two fits
        ((64, 128, 256), (D,), "3 fits over 1 horizon"),  # one horizon, however many widths
        ((64,), (D // 2, D), "2 fits over 2 horizons"),  # two fits over two horizons
    ],
)
def test_too_few_fits_or_one_horizon_is_inconclusive(constant, widths, horizons, says):
    part = constant[constant["width"].isin(widths) & constant["horizon"].isin(horizons)]
    for rec in _trends(fit_norm_transfer(part, n_bootstrap=200)).values():
        assert rec["verdict"] == "inconclusive"
        assert "at least 3 interior fits over at least 2 horizons" in rec["verdict_why"]
        assert says in rec["verdict_why"]


def test_one_width_leaves_the_width_trend_untested(constant):
    trends = _trends(fit_norm_transfer(constant[constant["width"] == 128], n_bootstrap=200))
    assert trends["width"]["slope"] is None and trends["width"]["slope_ci"] is None
    assert trends["width"]["verdict"] == "inconclusive"
    assert "only one width (128)" in trends["width"]["verdict_why"]
    assert trends["horizon"]["verdict"] == "transfers"  # 3 fits over 3 horizons


def test_lrs_that_barely_move_the_norm_locate_no_optimal_norm(tmp_path_factory):
    # The lr moves the norm 0.02 octave per octave (a head held on its norm ball, or trained by
    # another optimizer): the best lr's norm is known to +-0.01 octave, but it is no optimum of
    # the loss over norms, and a trend of it would be judged on intervals as narrow as the window.
    flat = _horizons(tmp_path_factory, dataclasses.replace(NORM, name="flat", norm_lr_slope=0.02))
    nt = fit_norm_transfer(flat, n_bootstrap=200)
    assert (nt.fits["status"] == "norm_flat").all()
    assert nt.fits["log2_norm_opt"].isna().all() and (nt.fits["norm_span"] < 0.5).all()
    for rec in _trends(nt).values():
        assert rec["verdict"] == "inconclusive" and rec["slope"] is None
        assert "9 with lrs that move the output norm by under 0.5 octave" in rec["verdict_why"]


def test_lrs_that_move_the_norm_a_fifth_as_much_still_locate_it(tmp_path_factory):
    weak = _horizons(tmp_path_factory, dataclasses.replace(NORM, name="weak", norm_lr_slope=0.2))
    nt = fit_norm_transfer(weak, n_bootstrap=200)
    assert (nt.fits["status"] == "ok").all()
    for rec in _trends(nt).values():
        assert rec["verdict"] == "transfers", rec["verdict_why"]


# --------------------------------------------------------------------------- decayed horizons


@pytest.mark.parametrize(
    ("steps", "schedule", "warmup", "warmdown"),
    [
        (100, "constant", 0.0, 0.0),
        (100, "constant", 0.1, 0.0),
        (100, "constant", 0.0, 0.2),
        (100, "constant", 0.05, 0.3),
        (64, "linear", 0.0, 0.0),
        (64, "cosine", 0.1, 0.0),
        (64, "cosine", 0.1, 0.5),
        (7, "constant", 0.0, 0.33),
    ],
)
def test_last_clean_step_follows_the_trainers_schedule(steps, schedule, warmup, warmdown):
    from sweeper.train import lr_multiplier  # torch: only this test needs it

    n_warm = round(warmup * steps)
    factors = [lr_multiplier(u, steps, schedule, warmup, warmdown) for u in range(steps)]
    # the row at step s follows updates 0 .. s-1: clean while none after warm-up is below 1
    below = [u for u in range(n_warm, steps) if factors[u] < 1.0]
    expected = below[0] if below else steps + 1
    got = last_clean_step(np.array([steps]), np.array([schedule]), [warmup], [warmdown])
    assert int(got[0]) == expected


# Three batch sizes under one token budget D, so steps = D / (B x 32) = 256, 128, 64.
DECAY = dataclasses.replace(
    NORM,
    name="warmdown",
    widths=(128,),
    batch_sizes=(16, 32, 64),
    steps=None,
    tokens=D,
    warmdown=0.8,
)


@pytest.mark.parametrize(
    "config",
    [DECAY, dataclasses.replace(DECAY, name="cosine", warmdown=0.0, schedule="cosine")],
    ids=["warmdown", "cosine"],
)
def test_mid_run_horizons_of_decaying_runs_stay_out_of_the_scaling_laws(tmp_path_factory, config):
    h = _horizons(tmp_path_factory, config)
    assert h[h["horizon"] < D]["decayed"].all()  # read while the lr was already decaying
    assert not h[h["horizon"] == D]["decayed"].any()  # the runs' own end
    optima = optima_at_horizons(h)
    assert set(optima[optima["horizon"] < D]["status"]) == {"decayed"}
    (law,) = fit_scaling(optima, pd.DataFrame()).lr_law
    assert law["horizons"] == [D] and law["n"] == 3 and law["n_decayed"] == 6
    assert "b" not in law["terms"]  # one horizon left: no D exponent
    # three seeds: the runs themselves were resampled, and ci covers the bootstrap's interval
    a = law["terms"]["a"]
    assert law["bootstrap"] == "runs" and a["ci_bootstrap"] is not None
    assert a["ci"][0] <= a["ci_bootstrap"][0] and a["ci_bootstrap"][1] <= a["ci"][1]
    # norm transfer does not read the decayed horizons either
    nt = fit_norm_transfer(h, n_bootstrap=50)
    assert set(nt.best["horizon"]) == {D} and nt.summary["n_decayed_excluded"] > 0


def test_constant_schedule_keeps_mid_run_horizons(tmp_path_factory):
    h = _horizons(tmp_path_factory, dataclasses.replace(DECAY, name="const", warmdown=0.0))
    assert not h["decayed"].any()
    (law,) = fit_scaling(optima_at_horizons(h), pd.DataFrame()).lr_law
    assert law["horizons"] == HORIZONS and law["n_decayed"] == 0


# --------------------------------------------------------------------------- exactly determined


def test_exactly_determined_lr_law_is_not_an_exponent(tmp_path):
    from analysis.pipeline import analyze

    config = dataclasses.replace(DECAY, name="two", batch_sizes=(16, 32), seeds=(0,))
    path = write_synthetic_store(tmp_path, config)
    an = analyze(path, horizons=[D], n_bootstrap=50)
    (law,) = an.scaling.lr_law
    assert law["status"] == "exactly-determined" and law["terms"] is None
    assert "2 points for 2 terms" in law["reason"]
    said = [c for c in conclusions(an) if "scaling law" in c]
    assert said and all("exactly determined" in c for c in said)
    assert not any("log2 lr* =" in c for c in conclusions(an))


def _optima(points: list[tuple[int, int, float]]) -> pd.DataFrame:
    """Hand-made (batch size, horizon, loss*) optima of one configuration, all interior."""
    fixed = {c: 0 for c in SCALING_GROUP} | {"optimizer": "scion", "width": 128, "depth": 2}
    return pd.DataFrame(
        [
            {**fixed, "batch_size": b, "horizon": d, "log2_lr_star": -7.0, "loss_star": loss}
            | {"status": "ok"}
            for b, d, loss in points
        ]
    )


def test_exactly_determined_batch_law_is_not_an_exponent():
    # B* = 2^5 at D = 2^16 and 2^6 at 2^17: two horizons for two terms.
    points = [
        (b, d, 3.0 + 0.05 * (np.log2(b) - star) ** 2)
        for d, star in ((2**16, 5.0), (2**17, 6.0))
        for b in (8, 16, 32, 64, 128, 256)
    ]
    (law,) = fit_batch_law(_optima(points))
    assert law["status"] == "exactly-determined" and law["terms"] is None and law["n"] == 2
    assert "exactly determined" in law["reason"]
    # one more horizon: an exponent, with an interval (optima on grid points: any location
    # method finds them exactly)
    points += [(b, 2**18, 3.0 + 0.05 * (np.log2(b) - 7.0) ** 2) for b in (8, 16, 32, 64, 128, 256)]
    (law,) = fit_batch_law(_optima(points))
    assert law["status"] == "ok" and law["dof"] == 1
    assert law["terms"]["e"]["value"] == pytest.approx(1.0, abs=0.05)
    assert law["terms"]["e"]["ci"][0] <= law["terms"]["e"]["value"] <= law["terms"]["e"]["ci"][1]
    assert fit_lr_law(_optima(points[:2]))[0]["status"] == "exactly-determined"
