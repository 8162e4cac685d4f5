"""Operator norms against direct numpy / loop computations of the reference definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sweeper.optim import l1_to_inf, l1_to_rms, rms_to_inf, rms_to_rms

torch.set_num_threads(1)


def _W(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _direct(name: str, W: np.ndarray) -> float:
    d_out, d_in = W.shape
    if name == "rms_to_rms":
        return math.sqrt(d_in / d_out) * np.linalg.svd(W, compute_uv=False).max()
    if name == "rms_to_inf":
        return math.sqrt(d_in) * max(math.sqrt(sum(x * x for x in row)) for row in W)
    if name == "l1_to_rms":
        return max(math.sqrt(sum(x * x for x in col)) for col in W.T) / math.sqrt(d_out)
    return max(abs(x) for row in W for x in row)


NORMS = {
    "rms_to_rms": rms_to_rms,
    "rms_to_inf": rms_to_inf,
    "l1_to_rms": l1_to_rms,
    "l1_to_inf": l1_to_inf,
}


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 5)])
def test_norm_matches_definition(name, shape):
    W = _W(*shape)
    got = NORMS[name](W)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(_direct(name, W.double().numpy()), rel=1e-5)


@pytest.mark.parametrize("name", NORMS)
def test_norm_batched(name):
    W = _W(2, 3, 6, 9)
    got = NORMS[name](W)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(_direct(name, W[i, j].double().numpy()), 1e-5)


@pytest.mark.parametrize("name", NORMS)
def test_norm_bf16_and_grad_free(name):
    W = _W(8, 4).bfloat16().requires_grad_()
    got = NORMS[name](W)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert got.item() == pytest.approx(_direct(name, W.detach().double().numpy()), rel=1e-5)


def test_norm_identities():
    # An orthogonal square matrix has rms_to_rms exactly 1; a +-1/d_in sign matrix has
    # rms_to_inf 1 (each row's l2 norm is 1/sqrt(d_in)).
    Q, _ = torch.linalg.qr(_W(16, 16))
    assert rms_to_rms(Q).item() == pytest.approx(1.0, abs=1e-5)
    S = torch.sign(_W(5, 16)) / 16
    assert rms_to_inf(S).item() == pytest.approx(1.0, abs=1e-6)
    assert l1_to_inf(S).item() == pytest.approx(1 / 16)


def test_norm_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        rms_to_inf(torch.ones(3))
