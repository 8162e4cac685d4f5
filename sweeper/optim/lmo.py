"""Linear minimization oracles (LMOs) and the matching inits on the norm ball.

An LMO maps a gradient-like matrix `G (d_out, d_in)` to the unit-norm direction of steepest
descent in one operator norm (returned positive: the optimizer subtracts it). Every function
here acts on the last two dimensions, so a stack `(K, d_out, d_in)` of K models is one call.

| name                    | LMO(G)                                  | norm it is the ball of  |
| ----------------------- | --------------------------------------- | ----------------------- |
| `spectral`              | NS5(G) * sqrt(d_out / d_in)             | RMS -> RMS              |
| `spectral_max`          | NS5(G) * max(1, sqrt(d_out / d_in))     | (image / dense inputs)  |
| `spectral_unnormalized` | NS5(G) * sqrt(d_out)                    |                         |
| `sign`                  | sign(G) / d_in                          | l1 -> inf (times d_in)  |
| `sign_unnormalized`     | sign(G)                                 |                         |
| `colnorm`               | every column to RMS 1                   | l1 -> RMS               |
| `rownorm`               | every row to l2 norm 1 / sqrt(d_in)     | RMS -> inf              |
| `bias_rms`              | g / rms(g)   (vectors, last dim)        | RMS (vectors)           |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Keller Jordan's quintic coefficients: they trade exact orthogonality (a+b+c = 0.701, not 1)
# for a steep slope at 0, so five steps lift even tiny singular values into about [0.7, 1.1].
NS_COEFFS = (3.4445, -4.7750, 2.0315)

SPECTRAL_VARIANTS = ("normalized", "unnormalized", "max")

LMO_NAMES = (
    "spectral",
    "spectral_max",
    "spectral_unnormalized",
    "sign",
    "sign_unnormalized",
    "colnorm",
    "rownorm",
    "bias_rms",
)

_EPS = 1e-8


def _dims(G: Tensor) -> tuple[int, int]:
    if G.ndim < 2:
        raise ValueError(f"a matrix LMO needs at least 2 dims, got shape {tuple(G.shape)}")
    return G.shape[-2], G.shape[-1]


def l2_norms(G: Tensor, dim: int) -> Tensor:
    """float32 l2 norms along `dim`, kept as a size-1 dim so they broadcast back over G."""
    if G.stride(dim) == 1:
        return torch.linalg.vector_norm(G, dim=dim, keepdim=True, dtype=torch.float32)
    # Along a strided dim (the columns of a row-major matrix) CPU's vector_norm is ~10x
    # slower than a plain sum of squares.
    return G.float().square().sum(dim=dim, keepdim=True).sqrt_()


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate U V^T of G = U S V^T with `steps` quintic Newton-Schulz iterations.

    Runs in bfloat16 on CUDA (the iteration tolerates it, and bf16 matmuls are much faster)
    and float32 elsewhere, unless `dtype` says otherwise; returns G's dtype.
    """
    d_out, d_in = _dims(G)
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    # Iterate on the wide orientation: X X^T is then the smaller Gram matrix.
    tall = d_out > d_in
    if tall:
        X = X.mT
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # one batch dim so the fused baddbmm calls apply
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)  # all singular values <= 1
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.reshape(*batch, *X.shape[-2:])
    if tall:
        X = X.mT
    return X.to(G.dtype)


def spectral_factor(d_out: int, d_in: int, variant: str = "normalized") -> float:
    """The factor that puts an orthogonal matrix on the chosen spectral ball."""
    if variant == "normalized":
        return math.sqrt(d_out / d_in)
    if variant == "unnormalized":
        return math.sqrt(d_out)
    if variant == "max":
        return max(1.0, math.sqrt(d_out / d_in))
    raise ValueError(f"unknown spectral variant {variant!r}; choose from {SPECTRAL_VARIANTS}")


def spectral(G: Tensor, variant: str = "normalized", steps: int = 5) -> Tensor:
    """NS5(G) scaled to the RMS->RMS ball: sqrt(d_out/d_in) (or the `unnormalized`/`max` one)."""
    d_out, d_in = _dims(G)
    return newton_schulz(G, steps).mul_(spectral_factor(d_out, d_in, variant))


def sign(G: Tensor, normalized: bool = True) -> Tensor:
    """sign(G) / d_in: every entry +-1/d_in (`normalized=False`: +-1)."""
    _, d_in = _dims(G)
    out = torch.sign(G)
    return out.div_(d_in) if normalized else out


def colnorm(G: Tensor) -> Tensor:
    """Every column scaled to RMS 1 (l2 norm sqrt(d_out)): the l1->RMS ball of one-hot inputs."""
    d_out, _ = _dims(G)
    return (G / (l2_norms(G, -2) / math.sqrt(d_out) + _EPS)).to(G.dtype)


def rownorm(G: Tensor) -> Tensor:
    """Every row scaled to l2 norm 1/sqrt(d_in): the RMS->inf ball of the readout."""
    _, d_in = _dims(G)
    return (G / ((l2_norms(G, -1) + _EPS) * math.sqrt(d_in))).to(G.dtype)


def bias_rms(g: Tensor) -> Tensor:
    """g / rms(g) over the last dim (a stack of vectors `(K, d)` is K vectors)."""
    n = g.shape[-1] if g.ndim else 1
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True, dtype=torch.float32)
    return (g / (norms / math.sqrt(n) + _EPS)).to(g.dtype)


def get_lmo(name: str, ns_steps: int = 5) -> Callable[[Tensor], Tensor]:
    """The LMO called `name` (one of LMO_NAMES) as a one-argument function."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "spectral": lambda G: spectral(G, "normalized", ns_steps),
        "spectral_max": lambda G: spectral(G, "max", ns_steps),
        "spectral_unnormalized": lambda G: spectral(G, "unnormalized", ns_steps),
        "sign": lambda G: sign(G, normalized=True),
        "sign_unnormalized": lambda G: sign(G, normalized=False),
        "colnorm": colnorm,
        "rownorm": rownorm,
        "bias_rms": bias_rms,
    }
    if name not in table:
        raise ValueError(f"unknown lmo {name!r}; choose from {', '.join(LMO_NAMES)}")
    return table[name]


# ---- inits on the norm ball (in place, then times `scale`) ------------------------------------


def _randn_like(W: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(W.shape, generator=generator, device=W.device, dtype=torch.float32)


@torch.no_grad()
def init_spectral_(
    W: Tensor,
    variant: str = "normalized",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """W <- scale * factor * (a random orthogonal matrix): every singular value equal."""
    d_out, d_in = _dims(W)
    Z = _randn_like(W, generator)
    wide = d_out < d_in
    if wide:
        Z = Z.mT
    Q, R = torch.linalg.qr(Z)  # Q has orthonormal columns
    # Fix QR's sign ambiguity so Q is Haar-distributed rather than biased by the algorithm.
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    if wide:
        Q = Q.mT
    return W.copy_(Q * (scale * spectral_factor(d_out, d_in, variant)))


@torch.no_grad()
def init_sign_(
    W: Tensor,
    normalized: bool = True,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """W <- scale * (random +-1) / d_in (or +-1 when not normalized)."""
    _, d_in = _dims(W)
    pm1 = torch.empty(W.shape, device=W.device).bernoulli_(0.5, generator=generator) * 2 - 1
    return W.copy_(pm1 * (scale / d_in if normalized else scale))


@torch.no_grad()
def init_colnorm_(
    W: Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """W <- scale * Gaussian columns rescaled to l2 norm sqrt(d_out)."""
    return W.copy_(colnorm(_randn_like(W, generator)) * scale)


@torch.no_grad()
def init_rownorm_(
    W: Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """W <- scale * Gaussian rows rescaled to l2 norm 1/sqrt(d_in)."""
    return W.copy_(rownorm(_randn_like(W, generator)) * scale)


@torch.no_grad()
def init_bias_rms_(
    w: Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """w <- 0: the reference's init for BiasRMS vectors (`scale` has nothing to scale)."""
    return w.zero_()


def init_on_ball_(
    name: str, W: Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Initialise W in place on the ball of the LMO called `name`, times `scale`."""
    spectral_variants = {
        "spectral": "normalized",
        "spectral_max": "max",
        "spectral_unnormalized": "unnormalized",
    }
    if name in spectral_variants:
        return init_spectral_(W, spectral_variants[name], scale, generator)
    if name in ("sign", "sign_unnormalized"):
        return init_sign_(W, name == "sign", scale, generator)
    if name == "colnorm":
        return init_colnorm_(W, scale, generator)
    if name == "rownorm":
        return init_rownorm_(W, scale, generator)
    if name == "bias_rms":
        return init_bias_rms_(W, scale, generator)
    raise ValueError(f"unknown lmo {name!r}; choose from {', '.join(LMO_NAMES)}")


# ---- matrix views of parameters ----------------------------------------------------------------


def as_matrix(t: Tensor, transposed: bool = False, stacked: bool = False) -> Tensor:
    """The `(d_out, d_in)` view of a parameter (or its gradient / momentum) for an LMO.

    `transposed`: stored `(d_in, d_out)`, like `nn.Embedding.weight (vocab, d)`.
    `stacked`: leading dims are batch dims (K models in one tensor); otherwise a >2-D weight
    (a conv kernel `(out, in, *k)`) is flattened to `(out, in * prod(k))`.
    The result is a view, so in-place ops on it write through to `t`.
    """
    if t.ndim > 2 and not stacked:
        t = t.view(t.shape[0], -1)
    return t.mT if transposed else t


def per_member(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A step size as it applies to `like`: a number as it is; a tensor of K per-member values
    (a learning-rate bundle's lrs) viewed (K, 1, ..., 1) to broadcast over `like`'s leading
    member dim."""
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.view(-1, *[1] * (like.ndim - 1))
    return value


def descend_(p: Tensor, update: Tensor, step: float | Tensor) -> Tensor:
    """p <- p - step * update, `step` a number or per-member (see `per_member`)."""
    if isinstance(step, Tensor):
        return p.sub_(update * per_member(step, p))
    return p.add_(update, alpha=-step)


def from_matrix(u: Tensor, like: Tensor, transposed: bool = False) -> Tensor:
    """Undo `as_matrix`: an update `u` for the matrix view, in the layout of `like`."""
    if transposed:
        u = u.mT
    return u if u.shape == like.shape else u.reshape(like.shape)
