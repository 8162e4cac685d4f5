"""Operator norms of a weight `W (d_out, d_in)`: the quantities a sweep logs.

Each is batched over leading dims (a stack `(K, d_out, d_in)` gives K norms) and returns a
float32 tensor. Pass `W.mT` for a weight stored transposed, like `nn.Embedding.weight`.

| function     | definition                                | geometry                     |
| ------------ | ----------------------------------------- | ---------------------------- |
| `rms_to_rms` | sqrt(d_in / d_out) * sigma_max(W)         | hidden layers (Spectral)     |
| `rms_to_inf` | sqrt(d_in) * max_i ||W[i, :]||_2          | output layer (RowNorm)       |
| `l1_to_rms`  | max_j ||W[:, j]||_2 / sqrt(d_out)         | one-hot input (ColNorm)      |
| `l1_to_inf`  | max_ij |W_ij|                             | Sign                         |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sweeper.optim.lmo import l2_norms


def _matrix(W: Tensor) -> tuple[Tensor, int, int]:
    if W.ndim < 2:
        raise ValueError(f"an operator norm needs a matrix, got shape {tuple(W.shape)}")
    # Detached float32: logging a norm must neither build a graph nor lose bf16 precision.
    return W.detach().float(), W.shape[-2], W.shape[-1]


def rms_to_rms(W: Tensor) -> Tensor:
    """sqrt(d_in/d_out) * sigma_max(W), sigma_max exact (an SVD, not a power iteration)."""
    W, d_out, d_in = _matrix(W)
    return torch.linalg.matrix_norm(W, ord=2) * math.sqrt(d_in / d_out)


def rms_to_inf(W: Tensor) -> Tensor:
    """sqrt(d_in) * the largest row l2 norm: the norm-transfer quantity of the readout."""
    W, _, d_in = _matrix(W)
    return l2_norms(W, -1).squeeze(-1).amax(dim=-1) * math.sqrt(d_in)


def l1_to_rms(W: Tensor) -> Tensor:
    """The largest column l2 norm / sqrt(d_out): the largest RMS of any column."""
    W, d_out, _ = _matrix(W)
    return l2_norms(W, -2).squeeze(-2).amax(dim=-1) / math.sqrt(d_out)


def l1_to_inf(W: Tensor) -> Tensor:
    """The largest absolute entry."""
    W, _, _ = _matrix(W)
    return W.abs().amax(dim=(-2, -1))
