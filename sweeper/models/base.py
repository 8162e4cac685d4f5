"""What the two proxies share: the loss, parameter roles, and layers that can hold members.

Members. A model built with `members=K` holds K models of one shape in one: every parameter
gets a leading dimension of size K (a (d_out, d_in) matrix becomes (K, d_out, d_in)), inputs
are (K, B, T) and logits (K, B, T, vocab), and each member computes with its own slice only.
A learning-rate bundle trains K trials this way, each step one batched kernel per layer instead
of K small ones (`load_members` below stacks K built models into one). With `members=None` (a plain
trial) the parameters have their usual shapes and the layers are torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """nn.Linear whose weight (d_out, d_in) and bias (d_out) may carry a leading member dim:
    member k maps its own slice x[k] of an input (K, ..., d_in)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, members: int | None = None):
        super().__init__(d_in, d_out, bias=bias)
        if members is not None:
            self.weight = nn.Parameter(self.weight.detach().expand(members, -1, -1).clone())
            if bias:
                self.bias = nn.Parameter(self.bias.detach().expand(members, -1).clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.ndim == 2:
            return F.linear(x, self.weight, self.bias)
        K = self.weight.shape[0]
        y = x.reshape(K, -1, x.shape[-1]) @ self.weight.mT  # one batched matmul
        if self.bias is not None:
            y = y + self.bias[:, None, :]
        return y.view(*x.shape[:-1], -1)


def member_ids(idx: Tensor, rows: int) -> Tensor:
    """Row ids of a stacked lookup table (K * rows, d): member k's id i is k * rows + i."""
    K = idx.shape[0]
    offsets = torch.arange(K, device=idx.device) * rows
    return idx + offsets.view(K, *[1] * (idx.ndim - 1))


def stacked_rows(weight: Tensor) -> Tensor:
    """A member-stacked lookup table (K, rows, d) as one table (K * rows, d)."""
    return weight.reshape(-1, weight.shape[-1])


class TokenModel(nn.Module):
    """A model from token ids (B, T) to logits (B, T, vocab) with `wte` in and `lm_head` out
    (with members: (K, B, T) to (K, B, T, vocab))."""

    members: int | None = None

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats (computed in float32 under autocast); with
        members, one per member, shape (K,)."""
        logits = self(idx)
        if self.members is None:
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        per_token = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        )
        return per_token.view(self.members, -1).mean(-1)

    def param_roles(self) -> dict[str, str]:
        """The optimizers' roles: token embedding in, head out, gains and biases are vectors."""
        lead = 0 if self.members is None else 1
        roles = {}
        for name, p in self.named_parameters():
            if p.ndim - lead < 2:
                roles[name] = "vector"
            elif name == "wte.weight":
                roles[name] = "input"
            elif name == "lm_head.weight":
                roles[name] = "output"
            else:
                roles[name] = "hidden"
        return roles


def load_members(stacked: TokenModel, models: list[TokenModel]) -> TokenModel:
    """`stacked` (built with members=len(models)) holding `models`' weights, member k = models[k]:
    each member starts exactly where its own trial would."""
    state = [m.state_dict() for m in models]
    stacked.load_state_dict({k: torch.stack([s[k] for s in state]) for k in state[0]})
    return stacked
