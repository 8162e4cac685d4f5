"""The asymmetric optimum fit (analysis/location.py) on curves with a known minimum."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.location import (
    REFERENCE_SHAPES,
    fit_curves,
    method_error,
    shape_ambiguity,
)

ONE_OCTAVE = np.arange(-12.0, -1.0)
HALF_OCTAVE = np.arange(-12.0, -1.5, 0.5)


def _symmetric_parabola_vertex(x: np.ndarray, y: np.ndarray, points: int) -> float:
    i = int(np.argmin(y))
    j = np.arange(i - points // 2, i + points // 2 + 1)
    a, b, _ = np.polyfit(x[j], y[j], 2)
    return -b / (2 * a)


@pytest.mark.parametrize("grid", [ONE_OCTAVE, HALF_OCTAVE], ids=["one-octave", "half-octave"])
@pytest.mark.parametrize("shape", ["steeper-above-3x", "steeper-above-5x", "rounded-v", "sharp-v"])
def test_asymmetric_curves_are_located_where_a_symmetric_parabola_is_biased(grid, shape):
    f = dict(REFERENCE_SHAPES)[shape]
    truths = -7.0 + np.linspace(-0.5, 0.5, 11) * (grid[1] - grid[0])
    curves = np.stack([2.0 + f(grid - t) for t in truths])
    fit = fit_curves(grid, curves)
    assert (fit.kind == "shape").all()
    assert np.abs(fit.x0 - truths).max() <= 0.1
    # the 5-point symmetric parabola this replaces misses by far more on the same curves
    old = np.array([_symmetric_parabola_vertex(grid, c, 5) for c in curves])
    assert np.abs(old - truths).mean() > 2 * np.abs(fit.x0 - truths).mean() + 0.05


def test_fitted_curve_reproduces_the_loss_above_the_minimum():
    f = dict(REFERENCE_SHAPES)["steeper-above-3x"]
    fit = fit_curves(ONE_OCTAVE, 2.0 + f(ONE_OCTAVE + 7.3)[None, :])
    assert fit.c[0] == pytest.approx(2.0, abs=1e-3)
    assert fit.excess(-6.3)[0] == pytest.approx(f(np.array(1.0)), rel=0.05)
    assert np.isnan(fit.excess(-2.0)[0])  # beyond the fitted window: not extrapolated


def test_seeds_missing_at_some_lrs_do_not_bend_the_curve():
    from analysis.optimum import _mean

    truth = 2.0 + 0.05 * (ONE_OCTAVE + 7.0) ** 2
    offsets = np.array([-0.05, 0.0, 0.05])
    y = truth[:, None] + offsets[None, :]
    y[ONE_OCTAVE > -8.0, 1:] = np.nan  # only the luckiest seed ran above 2^-8
    mean = _mean(y)
    assert np.allclose(mean - mean[0], truth - truth[0])
    assert np.isinf(_mean(np.where(np.arange(3) == 2, np.inf, y))).all()


def test_diverged_points_do_not_enter_and_few_points_fall_back():
    y = 2.0 + 0.05 * (ONE_OCTAVE + 7.0) ** 2
    cliff = y.copy()
    cliff[ONE_OCTAVE > -6.0] = np.inf
    few = np.full_like(y, np.nan)
    few[[4, 5, 6]] = y[[4, 5, 6]]
    alone = np.full_like(y, np.nan)
    alone[5] = 2.0
    fit = fit_curves(ONE_OCTAVE, np.stack([cliff, few, alone]))
    assert fit.kind.tolist() == ["shape", "parabola", "argmin"]
    assert fit.x0[0] == pytest.approx(-7.0, abs=0.05) and fit.x_hi[0] == -6.0
    assert fit.x0[1] == pytest.approx(-7.0, abs=1e-6)
    assert fit.x0[2] == ONE_OCTAVE[5]


def test_method_error_grows_with_the_grid_step():
    full = np.ones(len(ONE_OCTAVE), bool)
    one = method_error(ONE_OCTAVE, full, 5)
    half = method_error(HALF_OCTAVE, np.ones(len(HALF_OCTAVE), bool), 10)
    assert 0.3 < one < 0.7 and 0.05 < half < 0.2


def test_method_error_on_an_irregular_grid_covers_the_wider_gap():
    # The optimum may lie anywhere up to half the 1.75-octave gap below the argmin.
    x = np.array([-11.0, -10.0, -9.0, -7.25, -7.0, -5.0, -3.0])
    regular = np.arange(-11.0, -2.0, 0.25)
    assert method_error(x, np.ones(7, bool), 4) > 2 * method_error(
        regular, np.ones(len(regular), bool), 16
    )


def test_shape_ambiguity_is_small_for_a_clear_curve_and_zero_without_noise_estimate():
    f = dict(REFERENCE_SHAPES)["rounded-v"]
    y = 2.0 + f(HALF_OCTAVE + 7.2)
    assert shape_ambiguity(HALF_OCTAVE, y, 1e-6) < 0.15
    assert shape_ambiguity(HALF_OCTAVE, y, float("nan")) == 0.0
    # with noise as large as the curve's rise over the window, the location is unknown
    assert shape_ambiguity(HALF_OCTAVE, y, 1.0) > 0.5
