"""AdamW, and its three parameterizations as per-role learning rates.

    m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2      (t-th step)
    W <- W (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

which is `torch.optim.AdamW`'s update (the same operations in the same order), written out so
that `lr` may also be a tensor of per-member lrs for stacked parameters (a learning-rate
bundle: member k of a (K, ...) parameter steps with lr[k]; torch's takes one number).

    sp        one lr for every parameter (the optimal lr drifts ~1/width for hidden layers)
    mup       muP for Adam (Tensor Programs V, table 3): input and vectors `lr`, hidden and
              output `lr / width_mult`; `MuPAdamW.init()` re-initialises muP-style
    rescaled  MOGA's rescaled AdamW ((1,mean) -> (inf,mean) geometry): each matrix `lr / d_in`

Every group carries `role` and `transposed`, so `init()` and loggers can tell layers apart.
Weight decay (decoupled, `W <- W (1 - lr wd)`) applies to matrices only, never to vectors:
decaying a norm gain towards zero fights the normalization it exists for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from sweeper.optim.lmo import as_matrix, descend_, per_member
from sweeper.optim.roles import ROLES, ParamRole

PARAMETERIZATIONS = ("sp", "mup", "rescaled")


def _fan_in(pr: ParamRole, stacked: bool) -> int:
    # A one-hot lookup (vocab, d) is the map vocab -> d: its fan-in is the vocabulary.
    return as_matrix(pr.param, pr.transposed, stacked).shape[-1]


def adamw_update_(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of parameter `p` with gradient `g`, its moments kept in `state` (torch's
    layout: `step`, `exp_avg`, `exp_avg_sq`)."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    t = float(state["step"])
    beta1, beta2 = betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    lr = per_member(lr, p)
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    if isinstance(lr, Tensor):
        descend_(p, m / denom, lr / (1 - beta1**t))
    else:  # torch's own fused form, so that one lr gives torch's numbers exactly
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


class AdamW(torch.optim.Optimizer):
    """AdamW (the update above) over param groups; `lr` a float or, for stacked parameters,
    a tensor of per-member lrs."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update_(
                        p, p.grad, self.state[p], group["lr"], group["betas"], group["eps"],
                        group["weight_decay"],
                    )  # fmt: skip
        return loss


def adamw_param_groups(
    roles: Iterable[ParamRole],
    lr: float,
    parameterization: str = "sp",
    width_mult: float = 1.0,
    weight_decay: float = 0.0,
    lr_mults: Mapping[str, float] | None = None,
    stacked: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for AdamW: one per (role, transposed), or per matrix for `rescaled` (each
    matrix has its own d_in). `lr_mults` maps role -> lr multiplier; `stacked`: parameters
    carry a leading member dim."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; choose from {PARAMETERIZATIONS}"
        )
    mults = {role: 1.0 for role in ROLES} | dict(lr_mults or {})
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for pr in roles:
        role_lr = lr * mults[pr.role]
        if parameterization == "mup" and pr.role in ("hidden", "output"):
            role_lr /= width_mult
        key: tuple[Any, ...] = (pr.role, pr.transposed)
        # The input layer keeps the plain lr, as MOGA's reference moves the embedding with the
        # plain lr (Adam there is close to its sign update); vectors have no d_in.
        if parameterization == "rescaled" and pr.role in ("hidden", "output"):
            role_lr /= _fan_in(pr, stacked)
            key = (*key, id(pr.param))
        if key not in groups:
            groups[key] = dict(
                params=[],
                lr=role_lr,
                role=pr.role,
                transposed=pr.transposed,
                weight_decay=0.0 if pr.role == "vector" else weight_decay,
            )
        groups[key]["params"].append(pr.param)
    return list(groups.values())


class MuPAdamW(AdamW):
    """AdamW over `adamw_param_groups(..., "mup")`, plus the muP init."""

    @torch.no_grad()
    def init(self) -> None:
        """Re-initialise muP-style: N(0, 1/fan_in) for input and hidden matrices,
        N(0, 1/fan_in^2) for the output; vectors (norm gains, biases) are left as they are.

        For a token embedding the fan-in is the vocabulary (one-hot inputs), which keeps the
        embedding's output scale independent of width, as muP requires.
        """
        for group in self.param_groups:
            role = group["role"]
            if role == "vector":
                continue
            for p in group["params"]:
                fan_in = as_matrix(p, group["transposed"]).shape[-1]
                std = 1.0 / fan_in if role == "output" else fan_in**-0.5
                p.normal_(0.0, std)
