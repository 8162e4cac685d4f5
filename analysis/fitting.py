"""Small numeric building blocks: batched (weighted) parabola fits and OLS with intervals.

numpy only (no scipy): the analysis must run on a bare laptop install.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z_975 = 1.959963984540054


def t_quantile_975(dof: int) -> float:
    """The 97.5 % quantile of Student's t (table to 30 dof, Cornish-Fisher beyond)."""
    if dof < 1:
        return float("nan")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, n = Z_975, float(dof)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
    )


@dataclass
class ParabolaFit:
    """`y = a x^2 + b x + c`, one fit per leading index of the inputs (arrays of shape (...))."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    n_points: np.ndarray  # points with non-zero weight
    x_lo: np.ndarray  # range of the points used: the vertex is trusted inside it only
    x_hi: np.ndarray
    min_points: int = 3  # free parameters: 2 when c is held fixed

    @property
    def convex(self) -> np.ndarray:
        return np.isfinite(self.a) & (self.a > 0) & (self.n_points >= self.min_points)

    @property
    def vertex(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.convex, -self.b / (2 * self.a), np.nan)

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.a * np.square(x) + self.b * x + self.c


def fit_parabola(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    fixed_c: float | None = None,
) -> ParabolaFit:
    """Weighted least-squares parabolas along the last axis, batched over the leading ones.

    Points whose x or y is not finite get weight 0, so callers can pass ragged data padded with
    NaN/inf. With `fixed_c`, c is held at that value (the curve passes through (0, fixed_c)).
    """
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    w = np.ones_like(y) if weights is None else np.broadcast_to(np.asarray(weights, float), y.shape)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (w > 0)
    w = np.where(ok, w, 0.0)
    xs = np.where(ok, x, 0.0)
    ys = np.where(ok, y, 0.0)
    n = ok.sum(axis=-1)
    with np.errstate(invalid="ignore"):
        x_lo = np.where(ok, x, np.inf).min(axis=-1)
        x_hi = np.where(ok, x, -np.inf).max(axis=-1)

    if fixed_c is not None:
        r = ys - fixed_c
        s2, s3, s4 = ((w * xs**k).sum(-1) for k in (2, 3, 4))
        t1, t2 = (w * xs * r).sum(-1), (w * xs**2 * r).sum(-1)
        det = s4 * s2 - s3 * s3
        good = (np.abs(det) > 1e-12 * np.maximum(s4 * s2, 1e-300)) & (n >= 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(good, (t2 * s2 - t1 * s3) / det, np.nan)
            b = np.where(good, (s4 * t1 - s3 * t2) / det, np.nan)
        c = np.where(good, float(fixed_c), np.nan)
        return ParabolaFit(a, b, c, n, x_lo, x_hi, min_points=2)

    # Centre x on its weighted mean for a well-conditioned 3x3 system, then shift back.
    with np.errstate(divide="ignore", invalid="ignore"):
        centre = np.where(n > 0, (w * xs).sum(-1) / w.sum(-1), 0.0)
    u = np.where(ok, xs - centre[..., None], 0.0)
    # Powers by repeated products: u**k with a float exponent array is several times slower.
    wu = [w]
    for _ in range(4):
        wu.append(wu[-1] * u)
    s = [p.sum(-1) for p in wu]
    t = [(p * ys).sum(-1) for p in wu[:3]]
    m = np.stack(
        [
            np.stack([s[4], s[3], s[2]], -1),
            np.stack([s[3], s[2], s[1]], -1),
            np.stack([s[2], s[1], s[0]], -1),
        ],
        -2,
    )
    v = np.stack([t[2], t[1], t[0]], -1)
    det = np.linalg.det(m)
    scale = np.maximum(s[4] * s[2] * s[0], 1e-300)
    good = (n >= 3) & (np.abs(det) > 1e-10 * scale)
    eye = np.broadcast_to(np.eye(3), m.shape)
    sol = np.linalg.solve(np.where(good[..., None, None], m, eye), v[..., None])[..., 0]
    au, bu, cu = (np.where(good, sol[..., k], np.nan) for k in range(3))
    a = au
    b = bu - 2 * au * centre
    c = au * centre**2 - bu * centre + cu
    return ParabolaFit(a, b, c, n, x_lo, x_hi)


@dataclass
class OLSFit:
    """Ordinary least squares `y = X coef`, with standard errors and 95 % t intervals."""

    names: list[str]
    coef: np.ndarray
    se: np.ndarray  # NaN when there are no residual degrees of freedom
    ci_lo: np.ndarray
    ci_hi: np.ndarray
    dof: int
    r2: float
    n: int

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "value": float(self.coef[i]),
                "se": float(self.se[i]),
                "ci": [float(self.ci_lo[i]), float(self.ci_hi[i])],
            }
            for i, name in enumerate(self.names)
        }


def ols(columns: dict[str, np.ndarray], y: np.ndarray, *, intercept: str | None = "c") -> OLSFit:
    """Least squares of y on the named regressors (plus an intercept named `intercept`)."""
    names = list(columns)
    y = np.asarray(y, float)
    cols = [np.asarray(columns[k], float) for k in names]
    if intercept is not None:
        names.append(intercept)
        cols.append(np.ones_like(y))
    x = np.column_stack(cols)
    n, p = x.shape
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    dof = n - p
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else float("nan")
    if dof > 0:
        sigma2 = float(resid @ resid) / dof
        cov = sigma2 * np.linalg.pinv(x.T @ x)
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
        half = t_quantile_975(dof) * se
    else:
        se = np.full(p, np.nan)
        half = np.full(p, np.nan)
    return OLSFit(names, coef, se, coef - half, coef + half, dof, r2, n)
