"""Where is the minimum of a loss-vs-log2-lr curve? A fit that admits asymmetric curves.

Real loss-vs-lr curves are much steeper above the optimum (towards divergence) than below, and
grids are coarse (one octave per point is common). A symmetric parabola through the points
around the grid argmin is then biased towards the flat side by up to half a grid step, more
with wider windows (on a one-octave grid with a right/left steepness ratio of 3, a 5-point
parabola misses by 0.46 octave on average, a 3-point one by 0.22).

The fit here, for the finite points within WINDOW_OCTAVES of the argmin (u = x - x0):

    loss(x) = c + a_left  s(u)  for u < 0
            = c + a_right s(u)  for u > 0,        a_left, a_right >= 0,

with s one of a few shapes: rounded V's s(u) = sqrt(u^2 + r^2) - r (quadratic near the optimum,
straight far from it, as measured curves are; large r is a parabola), and an exponential rise
s(u) = exp(k u) - k u - 1 (k > 0 steeper above, k < 0 below; then a_right is tied to a_left).
For fixed (shape, x0) the fit is linear least squares, so x0 is profiled over a fine grid
between the argmin's neighbours and the (shape, x0) with the least squared error wins.
Noiseless checks on one-octave grids (optimum anywhere between grid points): exact for
piecewise parabolas and rounded V's of any asymmetry, within 0.07 octave of the truth for V's
whose rounding is between the candidates', but up to half an octave off or more for an
exponential rise or a quartic wall, which five points one octave apart cannot tell from a rounded
V. Half-octave grids: within 0.07 octave for the family's shapes, 0.25 for those outside it.
`method_error` measures this on the grid at hand, on those shapes and on a few the family does
not hold (one-octave grid: +-0.5 octave, half-octave: +-0.11), and optimum.py widens every
interval by it: five points one octave apart cannot tell an exponential rise from a rounded V,
and the interval says so.

With fewer than 4 finite points in the window (or none on one side of the argmin) the fit falls
back to the parabola through the argmin and its two neighbours, and to the argmin itself when
even that is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .fitting import Z_975

# Half-width of the fit window around the grid argmin, in octaves of lr.
WINDOW_OCTAVES = 2.0
# Resolution of the profile over x0 (octaves).
X0_STEP = 0.02
ROUNDINGS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # r of the rounded V's, octaves
RISES = (-1.0, -0.5, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)  # k of the rises, 1/octave
# Shapes the method's own error is measured on (noiseless, optimum between grid points): a
# parabola, piecewise parabolas 3x and 5x steeper above, two rounded V's with slopes like the
# quickstart's AdamW curves, exponential rises, and shapes the fit's family does not hold (a rise
# between its k's, a steeper one, a quartic wall above the optimum), so that the error it
# reports includes the fit's misspecification, not only its resolution.
REFERENCE_SHAPES = (
    ("parabola", lambda u: 0.03 * u**2),
    ("steeper-above-3x", lambda u: np.where(u < 0, 0.03, 0.09) * u**2),
    ("steeper-above-5x", lambda u: np.where(u < 0, 0.03, 0.15) * u**2),
    ("rounded-v", lambda u: np.where(u < 0, 0.08, 0.3) * (np.sqrt(u**2 + 0.49) - 0.7)),
    ("sharp-v", lambda u: np.where(u < 0, 0.05, 0.4) * (np.sqrt(u**2 + 0.25) - 0.5)),
    ("exponential", lambda u: 0.06 * (np.exp(u) - u - 1)),
    ("exponential-k1.1", lambda u: 0.05 * (np.exp(1.1 * u) - 1.1 * u - 1)),
    ("exponential-k2.25", lambda u: 0.012 * (np.exp(2.25 * u) - 2.25 * u - 1)),
    ("quartic-above", lambda u: 0.01 * u**2 + 0.004 * u**4 * (u > 0)),
)


def _shape_columns(u: np.ndarray) -> np.ndarray:
    """(n_shapes, ..., 2): each shape's (left, right) regressors at offsets u."""
    cols = []
    for r in ROUNDINGS:
        s = np.sqrt(u**2 + r**2) - r
        cols.append(np.stack([np.where(u < 0, s, 0.0), np.where(u > 0, s, 0.0)], -1))
    for k in RISES:
        s = (np.exp(k * u) - k * u - 1) / k**2
        cols.append(np.stack([s, np.zeros_like(s)], -1))
    return np.stack(cols)


N_SHAPES = len(ROUNDINGS) + len(RISES)


@dataclass
class CurveFit:
    """Fits of D curves: minimum at x0 with loss c, shape index and its two coefficients.

    `kind` is "shape" (the asymmetric fit), "parabola" (3-point fallback), "argmin" or "none".
    `x_lo`..`x_hi` is the span of the points the fit used: it is not trusted beyond them.
    """

    x0: np.ndarray
    c: np.ndarray
    shape: np.ndarray  # int, -1 when not a shape fit
    coef: np.ndarray  # (D, 2): left, right; for a parabola (a, b) of a (u)^2 + ... see excess()
    kind: np.ndarray  # str
    x_lo: np.ndarray
    x_hi: np.ndarray

    def excess(self, x: float | np.ndarray) -> np.ndarray:
        """Fitted loss above the minimum at log2 lr `x` (NaN outside the fitted span)."""
        x = np.broadcast_to(np.asarray(x, float), self.x0.shape)
        u = x - self.x0
        out = np.full(self.x0.shape, np.nan)
        shaped = self.kind == "shape"
        if shaped.any():
            cols = _shape_columns(u[shaped])  # (S, n, 2)
            picked = cols[self.shape[shaped], np.arange(shaped.sum())]
            out[shaped] = (picked * self.coef[shaped]).sum(-1)
        para = self.kind == "parabola"
        out[para] = self.coef[para, 0] * u[para] ** 2
        inside = (x >= self.x_lo - 1e-9) & (x <= self.x_hi + 1e-9)
        return np.where(inside, out, np.nan)


def _empty(d: int) -> CurveFit:
    nan = np.full(d, np.nan)
    return CurveFit(
        nan.copy(), nan.copy(), np.full(d, -1), np.full((d, 2), np.nan),
        np.full(d, "none", dtype=object), nan.copy(), nan.copy(),
    )  # fmt: skip


def _profile(xs: np.ndarray, ys: np.ndarray, x_min: float, x_max: float):
    """Every candidate (shape, x0) fitted to curves ys (D, m) on points xs (m,), x0 in
    [x_min, x_max]: (x0 grid (X,), coefficients (S*X, D, 3), squared errors (S*X, D), inf for
    candidates with a negative coefficient)."""
    x0s = np.round(np.arange(x_min, x_max + X0_STEP / 2, X0_STEP), 9)
    u = xs[None, :] - x0s[:, None]  # (X, m)
    cols = _shape_columns(u)  # (S, X, m, 2)
    s_n, x_n, m, _ = cols.shape
    design = np.concatenate([np.ones((s_n, x_n, m, 1)), cols], -1).reshape(-1, m, 3)
    pinv = np.linalg.pinv(design)  # (C, 3, m): zero rows where a column is all zero
    coef = np.einsum("cpm,dm->cdp", pinv, ys)  # (C, D, 3)
    fitted = np.einsum("cmp,cdp->cdm", design, coef)
    sse = ((fitted - ys[None]) ** 2).sum(-1)  # (C, D)
    ok = (coef[..., 1] >= 0) & (coef[..., 2] >= 0) & (coef[..., 1:].sum(-1) > 0)
    return x0s, coef, np.where(ok, sse, np.inf)


def _shape_fit(xs: np.ndarray, ys: np.ndarray, x_min: float, x_max: float):
    """Best (shape, x0) per curve: (x0, c, shape, coef), NaN where no candidate had
    non-negative coefficients."""
    x0s, coef, sse = _profile(xs, ys, x_min, x_max)
    x_n = len(x0s)
    best = np.argmin(sse, axis=0)  # (D,)
    d = np.arange(ys.shape[0])
    found = np.isfinite(sse[best, d])
    shape, xi = np.divmod(best, x_n)
    chosen = coef[best, d]  # (D, 3)
    return (
        np.where(found, x0s[xi], np.nan),
        np.where(found, chosen[:, 0], np.nan),
        np.where(found, shape, -1),
        np.where(found[:, None], chosen[:, 1:], np.nan),
    )


def window_points(
    x: np.ndarray, finite: np.ndarray, i: int, window: float = WINDOW_OCTAVES
) -> np.ndarray:
    """Indices of the finite points a fit around the argmin `i` uses: those within `window`
    octaves, and always the nearest finite point on each side, however far (an irregular grid,
    an adaptive search's, may leave the argmin's neighbour beyond the window: without it the
    optimum would be taken at the argmin, with no room on that side)."""
    idx = np.flatnonzero(finite & (np.abs(x - x[i]) <= window + 1e-9))
    on = np.flatnonzero(finite)
    sides = [on[on < i][-1:], on[on > i][:1]]
    return np.union1d(idx, np.concatenate(sides)).astype(int)


def fit_curves(x: np.ndarray, y: np.ndarray, window: float = WINDOW_OCTAVES) -> CurveFit:
    """Minima of curves `y` (D, L) on the ascending log2-lr grid `x` (L,).

    +inf marks a diverged point and NaN an unmeasured one; neither enters a fit.
    """
    x = np.asarray(x, float)
    y = np.atleast_2d(np.asarray(y, float))
    out = _empty(len(y))
    finite = np.isfinite(y)
    valid = finite.any(axis=1)
    argmin = np.argmin(np.where(finite, y, np.inf), axis=1)
    for i in np.unique(argmin[valid]):
        rows = np.flatnonzero(valid & (argmin == i))
        # Rows sharing an argmin can still differ in which points are finite: group by mask.
        masks, inverse = np.unique(finite[rows], axis=0, return_inverse=True)
        for k, mask in enumerate(masks):
            _fit_group(x, y, rows[inverse.ravel() == k], int(i), mask, window, out)
    return out


def _fit_group(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, i: int, mask: np.ndarray,
    window: float, out: CurveFit,
) -> None:  # fmt: skip
    idx = window_points(x, mask, i, window)
    left, right = idx[idx < i], idx[idx > i]
    ys = y[np.ix_(rows, idx)]
    if len(idx) >= 4 and len(left) and len(right):
        x0, c, shape, coef = _shape_fit(x[idx], ys, x[left[-1]], x[right[0]])
        ok = np.isfinite(x0)
        r = rows[ok]
        out.x0[r], out.c[r], out.shape[r], out.coef[r] = x0[ok], c[ok], shape[ok], coef[ok]
        out.kind[r] = "shape"
        out.x_lo[r], out.x_hi[r] = x[idx[0]], x[idx[-1]]
        rows = rows[~ok]
        if len(rows) == 0:
            return
    if len(left) and len(right):
        j = np.array([left[-1], i, right[0]])
        a, b, c = np.polynomial.polynomial.polyfit(x[j], y[np.ix_(rows, j)].T, 2)[::-1]
        convex = a > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = np.clip(-b / (2 * a), x[j[0]], x[j[2]])
        r = rows[convex]
        out.x0[r] = vertex[convex]
        out.c[r] = (a * vertex**2 + b * vertex + c)[convex]
        out.coef[r, 0], out.coef[r, 1] = a[convex], 0.0
        out.kind[r] = "parabola"
        out.x_lo[r], out.x_hi[r] = x[j[0]], x[j[2]]
        rows = rows[~convex]
    out.x0[rows], out.c[rows] = x[i], y[rows, i]
    out.kind[rows] = "argmin"
    out.x_lo[rows] = out.x_hi[rows] = x[i]


def shape_ambiguity(x: np.ndarray, y: np.ndarray, noise_var: float) -> float:
    """How far apart the optima of the shapes that fit one curve about equally well lie.

    Per shape, the best x0 and its squared error; a shape fits "about equally well" when its
    error exceeds the best shape's by less than 3.84 (chi-square, 1 dof, 95 %) times the noise
    variance of a point (`noise_var`). Coarse grids leave several shapes within that, with
    optima up to a few tenths of an octave apart: the location is not known better than that,
    whatever the noise. When the best shape misses the points by more than the noise, its
    misfit variance replaces the noise variance. Returns the largest distance from the best
    fit's x0 (octaves), 0 when the fit is not a shape fit.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    finite = np.isfinite(y)
    if not finite.any() or not np.isfinite(noise_var):
        return 0.0
    i = int(np.argmin(np.where(finite, y, np.inf)))
    idx = window_points(x, finite, i)
    left, right = idx[idx < i], idx[idx > i]
    if len(idx) < 4 or not len(left) or not len(right):
        return 0.0
    x0s, _, sse = _profile(x[idx], y[None, idx], x[left[-1]], x[right[0]])
    per_shape = sse[:, 0].reshape(N_SHAPES, len(x0s))
    best_sse = per_shape.min(axis=1)
    if not np.isfinite(best_sse).any():
        return 0.0
    best_x0 = x0s[np.argmin(per_shape, axis=1)]
    top = int(np.argmin(best_sse))
    # A best fit that misses the points by more than the noise says the curve's shape is not
    # among the candidates: its misfit then sets the scale of "about equally well".
    misfit = best_sse[top] / max(len(idx) - 4, 1)
    plausible = best_sse <= best_sse[top] + 3.84 * max(noise_var, misfit)
    return float(np.max(np.abs(best_x0[plausible] - best_x0[top])))


@dataclass
class Located:
    """Optima of N curves (arrays of shape (N,)): log2 lr*, the fitted loss there, whether it
    lies inside the grid (argmin not at an end, x* within [x_1, x_{L-2}]), whether any point
    was finite."""

    x_star: np.ndarray
    loss_star: np.ndarray
    interior: np.ndarray
    valid: np.ndarray


def locate_optimum(x: np.ndarray, y: np.ndarray, window: float = WINDOW_OCTAVES) -> Located:
    """Optima of curves `y` (N, L) on the ascending grid `x` (L,), with the interior flag."""
    x = np.asarray(x, float)
    y = np.atleast_2d(np.asarray(y, float))
    fit = fit_curves(x, y, window)
    finite = np.isfinite(y)
    valid = finite.any(axis=1)
    i = np.argmin(np.where(finite, y, np.inf), axis=1)
    if len(x) >= 3:
        interior = valid & (i > 0) & (i < len(x) - 1) & (fit.x0 >= x[1]) & (fit.x0 <= x[-2])
    else:
        interior = np.zeros(len(y), bool)
    return Located(fit.x0, fit.c, interior, valid)


@lru_cache(maxsize=256)
def _method_error_cached(rel: tuple[float, ...], i: int) -> float:
    xs = np.array(rel)
    if i == 0 or i + 1 >= len(xs):
        return float("nan")
    # The optimum lies anywhere between the midpoints to the argmin's neighbours (an irregular
    # grid makes the two sides differ).
    offsets = np.linspace(-(xs[i] - xs[i - 1]) / 2, (xs[i + 1] - xs[i]) / 2, 9)
    curves = np.stack([f(xs[None, :] - offsets[:, None]) for _, f in REFERENCE_SHAPES])
    fits = fit_curves(xs, curves.reshape(-1, len(xs)))
    truth = np.tile(offsets, len(REFERENCE_SHAPES))
    # Only the cases whose grid argmin is the cell's: others are a different grid position.
    same = np.argmin(curves.reshape(-1, len(xs)), axis=1) == i
    err = (fits.x0 - truth)[same]
    return float(Z_975 * np.sqrt(np.mean(err**2))) if len(err) else float("nan")


def method_error(x: np.ndarray, finite: np.ndarray, i: int) -> float:
    """The location method's own error on this grid, as the half-width of a 95 % interval
    (1.96 x the RMS error, octaves) over noiseless reference curves laid on the grid's finite
    points near the argmin `i`, their optimum anywhere between the midpoints to the argmin's
    neighbours."""
    x = np.asarray(x, float)
    idx = window_points(x, finite, i)
    if i not in idx:
        return float("nan")
    rel = tuple(np.round(x[idx] - x[i], 6))
    return _method_error_cached(rel, int(np.flatnonzero(idx == i)[0]))
