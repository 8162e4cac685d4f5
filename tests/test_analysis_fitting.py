"""Numeric building blocks of the analysis: batched parabolas, OLS, t quantiles, optimum search."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.fitting import fit_parabola, ols, t_quantile_975
from analysis.location import locate_optimum


def test_parabola_recovers_vertex_batched_and_ignores_nonfinite_points():
    x = np.linspace(-3, 3, 7)
    vertices = np.array([-1.0, 0.0, 0.7])
    y = 2.0 * (x[None, :] - vertices[:, None]) ** 2 + 1.5
    y[0, 0] = np.inf  # a diverged point is dropped, not fitted
    y[1, -1] = np.nan
    fit = fit_parabola(np.broadcast_to(x, y.shape), y)
    np.testing.assert_allclose(fit.vertex, vertices, atol=1e-9)
    np.testing.assert_allclose(fit.a, 2.0, atol=1e-9)
    np.testing.assert_allclose(fit(vertices), 1.5, atol=1e-9)
    assert list(fit.n_points) == [6, 6, 7]


def test_parabola_rejects_concave_and_too_few_points():
    x = np.array([0.0, 1.0, 2.0])
    assert not fit_parabola(x, -(x**2)).convex
    assert np.isnan(fit_parabola(x, -(x**2)).vertex)
    assert not fit_parabola(x, np.array([1.0, np.inf, 2.0])).convex


def test_weighted_parabola_follows_the_precise_points():
    x = np.linspace(-2, 2, 5)
    y = (x - 0.5) ** 2
    y_bad = y.copy()
    y_bad[0] += 1.0  # an outlier with a huge error bar
    weights = np.array([1e-6, 1, 1, 1, 1])
    assert abs(float(fit_parabola(x, y_bad, weights).vertex) - 0.5) < 1e-3
    assert abs(float(fit_parabola(x, y_bad).vertex) - 0.5) > 0.02


def test_parabola_with_fixed_c():
    x = np.linspace(1, 5, 5)
    y = 0.5 * x**2 - 3 * x + 2.0
    fit = fit_parabola(x, y, fixed_c=2.0)
    assert float(fit.vertex) == pytest.approx(3.0)
    assert float(fit.c) == 2.0


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=2e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
    assert np.isnan(t_quantile_975(0))


def test_ols_recovers_coefficients_with_intervals():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 5, 40), rng.uniform(10, 20, 40)
    y = 0.6 * a - 0.5 * b + 3 + rng.normal(0, 0.05, 40)
    fit = ols({"a": a, "b": b}, y)
    assert fit.names == ["a", "b", "c"]
    for name, truth in (("a", 0.6), ("b", -0.5), ("c", 3.0)):
        d = fit.as_dict()[name]
        assert d["ci"][0] <= truth <= d["ci"][1]
    exact = ols({"a": np.array([1.0, 2.0])}, np.array([1.0, 3.0]))
    assert exact.dof == 0 and np.isnan(exact.se).all()


def test_locate_optimum_interior_edge_and_diverged():
    x = np.arange(-10.0, -1.0)  # 9 grid points
    y = 0.05 * (x - (-6.3)) ** 2 + 3.0
    edge_high = 0.05 * (x - (-1.0)) ** 2 + 3.0
    diverged_above = y.copy()
    diverged_above[6:] = np.inf  # lrs above the optimum diverged
    all_dead = np.full_like(y, np.inf)
    loc = locate_optimum(x, np.stack([y, edge_high, diverged_above, all_dead]))
    assert loc.x_star[0] == pytest.approx(-6.3, abs=0.02) and loc.interior[0]
    assert not loc.interior[1]
    assert loc.valid[2] and np.isfinite(loc.x_star[2]) and loc.x_star[2] < x[6]
    assert not loc.valid[3] and np.isnan(loc.x_star[3])


def test_the_grid_step_at_the_optimum_ignores_far_scan_points():
    """A search's lrs: scanned two octaves apart, half an octave apart around its optimum. The
    advice 'a finer lr grid near the optimum' must read the spacing there, not the mean."""
    from analysis.optimum import _step_at

    x = np.array([-12.0, -10.0, -8.0, -7.5, -7.0, -6.5, -6.0, -4.0])
    assert _step_at(x, 4) == 0.5
    assert _step_at(x, 3) == 0.5
    assert _step_at(x, 2) == 2.0  # beside a scan point: that gap is the resolution
    assert _step_at(x, 0) == 2.0 and np.isnan(_step_at(x[:1], 0))  # one lr: no step
