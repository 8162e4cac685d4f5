"""MOGA: steepest descent in mean-normalized operator norms (row / column normalization).

Momentum (normalization acts on it, not on the gradient):
    buf <- beta buf + (1 - beta) g
Decoupled weight decay:  W <- W (1 - lr wd)
Then per group `rule`, for M = buf viewed as (d_out, d_in):
    row  ((p,mean) -> inf):  row i of M -> sign(M_i) |M_i|^(p-1) / ||M_i||_p^(p-1),
                             times lr * d_in^(-1/p)   (p = 2: unit rows times lr / sqrt(d_in))
    col  (1 -> (2,mean)):    each column of M to unit l2, times lr * sqrt(d_out) / d_in
    sign:                    sign(M) times the plain lr   (token embeddings and vectors)

The width factors are the point: with them the mean-normalized norms compose layer by layer,
so one lr fits every width. `fan_factor=False` drops the row rule's d_in^(-1/p): the
reference code does that on the untied head, which the theory says leaks width dependence,
so it is kept as an ablation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sweeper.optim.lmo import as_matrix, descend_, l2_norms, per_member

RULES = ("row", "col", "sign")

_EPS = 1e-8


class MOGA(torch.optim.Optimizer):
    """Row / column normalized momentum. Per-group keys (constructor values are defaults):

    lr (a number, or with `stacked` a tensor of per-member lrs), beta (momentum), rule ("row",
    "col" or "sign"), p (the row rule's norm; col is q=2),
    fan_factor (the row rule's d_in^(-1/p)), weight_decay (decoupled), transposed, stacked.
    1-D parameters always take the sign rule, so `MOGA(model.parameters())` runs on any model.
    The momentum is `beta`, a key momentum-cycling schedulers (OneCycleLR, CyclicLR) do not
    know, so they refuse it: pass them cycle_momentum=False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        beta: float = 0.95,
        rule: str = "row",
        p: float = 2.0,
        fan_factor: bool = True,
        weight_decay: float = 0.1,
        transposed: bool = False,
        stacked: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            rule=rule,
            p=p,
            fan_factor=fan_factor,
            weight_decay=weight_decay,
            transposed=transposed,
            stacked=stacked,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rule"] not in RULES:
                raise ValueError(f"unknown MOGA rule {group['rule']!r}; choose from {RULES}")
            if group["p"] < 1:
                raise ValueError(f"MOGA needs p >= 1, got {group['p']}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, beta, wd, rule = group["lr"], group["beta"], group["weight_decay"], group["rule"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1.0 - beta)
                if wd:
                    p.mul_(1.0 - per_member(lr, p) * wd)

                if rule == "sign" or p.ndim < 2:
                    descend_(p, torch.sign(buf), lr)
                    continue
                # Matrix views of both, so the transposed / flattened update writes through.
                M = as_matrix(buf, group["transposed"], group["stacked"])
                W = as_matrix(p, group["transposed"], group["stacked"])
                d_out, d_in = M.shape[-2:]
                if rule == "row":
                    numer, denom = _row_normalizer(M, group["p"])
                    factor = d_in ** (-1.0 / group["p"]) if group["fan_factor"] else 1.0
                else:  # col
                    numer = M
                    denom = l2_norms(M, -2) + _EPS
                    factor = math.sqrt(d_out) / d_in
                # W -= lr * factor * numer / denom (denom broadcasts); one fused pass for one lr.
                if isinstance(lr, Tensor):
                    descend_(W, numer / denom, lr * factor)
                else:
                    W.addcdiv_(numer, denom, value=-lr * factor)
        return loss


def _row_normalizer(M: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(numerator, per-row denominator) of the l_p row normalization: the dual map of l_p."""
    if p == 2.0:
        return M, l2_norms(M, -1) + _EPS
    norm = torch.linalg.vector_norm(M, ord=p, dim=-1, keepdim=True)
    return torch.sign(M) * M.abs().pow(p - 1), norm.pow(p - 1) + _EPS
