"""LMOs and inits on the ball: each gives exactly the norm the reference states."""

from __future__ import annotations

import math

import pytest
import torch

from sweeper.optim import (
    LMO_NAMES,
    NS_COEFFS,
    as_matrix,
    bias_rms,
    colnorm,
    from_matrix,
    get_lmo,
    init_on_ball_,
    l1_to_inf,
    l1_to_rms,
    l2_norms,
    newton_schulz,
    rms_to_inf,
    rms_to_rms,
    rownorm,
    sign,
    spectral,
)

torch.set_num_threads(1)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _ns_scalar(x: float, steps: int = 5) -> float:
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def test_ns_coefficients_sum():
    assert sum(NS_COEFFS) == pytest.approx(0.701, abs=1e-12)


def test_ns_scalar_map_covers_reference_interval():
    # "in float64, five steps map normalized singular values in [0.01, 1] into about
    # [0.68, 1.13]"
    ys = [_ns_scalar(x) for x in torch.linspace(0.01, 1.0, 2000, dtype=torch.float64).tolist()]
    assert min(ys) > 0.67 and max(ys) < 1.14


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_ns_singular_values_well_conditioned(shape):
    G = _randn(*shape)
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    assert s.min() >= 0.6 and s.max() <= 1.2
    # Same singular vectors as G: U^T X V is diagonal (NS only reshapes the spectrum).
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ X @ Vh.T
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-4)


def test_ns_matches_scalar_polynomial_on_each_singular_value():
    # A matrix with known singular values: NS acts on each normalized one separately.
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(24, 12, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    s = torch.linspace(0.05, 1.0, 12, dtype=torch.float64)
    G = U @ torch.diag(s) @ V.T
    X = newton_schulz(G, dtype=torch.float64)
    fro = s.norm().item() + 1e-7
    f_s = torch.tensor([_ns_scalar(v / fro) for v in s.tolist()], dtype=torch.float64)
    expected = U @ torch.diag(f_s) @ V.T
    assert torch.allclose(X, expected, atol=1e-10)


@pytest.mark.parametrize(
    "variant,factor",
    [
        ("normalized", lambda m, n: math.sqrt(m / n)),
        ("unnormalized", lambda m, n: math.sqrt(m)),
        ("max", lambda m, n: max(1.0, math.sqrt(m / n))),
    ],
)
@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_spectral_is_ns_times_factor(variant, factor, shape):
    G = _randn(*shape)
    assert torch.allclose(spectral(G, variant), newton_schulz(G) * factor(*shape), atol=1e-6)


def test_spectral_rejects_unknown_variant():
    with pytest.raises(ValueError, match="normalized"):
        spectral(_randn(4, 4), "bogus")


def test_sign_entries():
    G = _randn(12, 20)
    u = sign(G)
    assert torch.equal(u.abs(), torch.full_like(G, 1 / 20))
    assert torch.equal(torch.sign(u), torch.sign(G))
    assert torch.equal(sign(G, normalized=False), torch.sign(G))


def test_colnorm_every_column_rms_one():
    G = _randn(16, 10)
    u = colnorm(G)
    col_rms = u.pow(2).mean(dim=0).sqrt()
    assert torch.allclose(col_rms, torch.ones(10), atol=1e-6)
    # Direction kept: each column is a positive multiple of G's.
    assert torch.allclose(u / u.norm(dim=0), G / G.norm(dim=0), atol=1e-6)
    assert l1_to_rms(u).item() == pytest.approx(1.0, abs=1e-6)


def test_rownorm_every_row_norm():
    G = _randn(10, 25)
    u = rownorm(G)
    assert torch.allclose(u.norm(dim=1), torch.full((10,), 1 / 5), atol=1e-6)
    assert torch.allclose(u / u.norm(dim=1, keepdim=True), G / G.norm(dim=1, keepdim=True))
    assert rms_to_inf(u).item() == pytest.approx(1.0, abs=1e-6)


def test_bias_rms_unit_rms():
    g = _randn(37)
    u = bias_rms(g)
    assert u.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(u * g.pow(2).mean().sqrt(), g, atol=1e-6)


def test_zero_gradient_gives_zero_direction():
    for name in ("colnorm", "rownorm", "sign"):
        assert torch.equal(get_lmo(name)(torch.zeros(4, 6)), torch.zeros(4, 6))
    assert torch.equal(bias_rms(torch.zeros(5)), torch.zeros(5))


@pytest.mark.parametrize("name", LMO_NAMES)
def test_batched_equals_per_slice(name):
    lmo = get_lmo(name)
    G = _randn(3, 2, 12, 20) if name != "bias_rms" else _randn(3, 20)
    batched = lmo(G)
    per_slice = torch.stack([lmo(g) for g in G.unbind(0)])
    assert torch.allclose(batched, per_slice, atol=1e-5)


def test_unknown_lmo_lists_names():
    with pytest.raises(ValueError, match="colnorm"):
        get_lmo("frobenius")


def test_lmo_rejects_vectors():
    with pytest.raises(ValueError, match="2 dims"):
        colnorm(torch.ones(5))


def test_ns_keeps_low_precision_dtype():
    G = _randn(16, 8).bfloat16()
    X = newton_schulz(G)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() >= 0.55 and s.max() <= 1.25


# ---- inits on the ball ------------------------------------------------------------------------


def test_init_spectral_on_ball():
    for shape in [(32, 8), (8, 32)]:
        W = torch.empty(shape)
        init_on_ball_("spectral", W, scale=3.0)
        s = torch.linalg.svdvals(W)
        target = 3.0 * math.sqrt(shape[0] / shape[1])
        assert torch.allclose(s, torch.full_like(s, target), atol=1e-4)
        assert rms_to_rms(W).item() == pytest.approx(3.0, rel=1e-5)
    W = torch.empty(8, 32)
    init_on_ball_("spectral_max", W)
    assert torch.allclose(torch.linalg.svdvals(W), torch.ones(8), atol=1e-5)


def test_init_sign_colnorm_rownorm_bias_on_ball():
    W = torch.empty(6, 40)
    init_on_ball_("sign", W, scale=10.0)
    assert torch.allclose(W.abs(), torch.full_like(W, 10.0 / 40))
    assert (W > 0).any() and (W < 0).any()
    assert l1_to_inf(W).item() == pytest.approx(0.25)

    W = torch.empty(16, 50)
    init_on_ball_("colnorm", W, scale=2.0)
    assert torch.allclose(W.norm(dim=0), torch.full((50,), 2.0 * 4.0), atol=1e-5)
    assert l1_to_rms(W).item() == pytest.approx(2.0, rel=1e-6)

    W = torch.empty(50, 16)
    init_on_ball_("rownorm", W, scale=7.0)
    assert torch.allclose(W.norm(dim=1), torch.full((50,), 7.0 / 4.0), atol=1e-5)
    assert rms_to_inf(W).item() == pytest.approx(7.0, rel=1e-6)

    w = torch.ones(9)
    init_on_ball_("bias_rms", w)
    assert torch.equal(w, torch.zeros(9))


def test_init_batched_and_bf16():
    W = torch.empty(4, 8, 24, dtype=torch.bfloat16)
    init_on_ball_("spectral", W, scale=2.0)
    s = torch.linalg.svdvals(W.float())
    assert torch.allclose(s, torch.full_like(s, 2.0 * math.sqrt(8 / 24)), rtol=2e-2)
    # Each slice its own random matrix, not one repeated.
    assert not torch.equal(W[0], W[1])


def test_init_reproducible_with_generator():
    W1, W2 = torch.empty(8, 8), torch.empty(8, 8)
    init_on_ball_("rownorm", W1, generator=torch.Generator().manual_seed(3))
    init_on_ball_("rownorm", W2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(W1, W2)


def test_as_matrix_views():
    emb = torch.zeros(10, 4)  # (vocab, d): the map is d x vocab
    assert as_matrix(emb, transposed=True).shape == (4, 10)
    as_matrix(emb, transposed=True)[1, 2] = 5.0  # writes through
    assert emb[2, 1] == 5.0
    conv = torch.zeros(8, 3, 2, 2)
    assert as_matrix(conv).shape == (8, 12)
    assert as_matrix(conv, stacked=True).shape == conv.shape
    u = torch.ones(4, 10)
    assert from_matrix(u, emb, transposed=True).shape == emb.shape
    assert from_matrix(torch.ones(8, 12), conv).shape == conv.shape


def test_l2_norms_both_memory_layouts():
    G = _randn(2, 9, 7)
    for dim in (-1, -2):
        for X in (G, G.mT):
            assert torch.allclose(l2_norms(X, dim), X.norm(dim=dim, keepdim=True), atol=1e-6)
