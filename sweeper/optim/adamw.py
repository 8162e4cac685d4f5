"""AdamW in three parameterizations: per-role learning rates on top of `torch.optim.AdamW`.

    sp        one lr for every parameter (the optimal lr drifts ~1/width for hidden layers)
    mup       muP for Adam (Tensor Programs V, table 3): input and vectors `lr`, hidden and
              output `lr / width_mult`; `MuPAdamW.init()` re-initialises muP-style
    rescaled  MOGA's rescaled AdamW ((1,mean) -> (inf,mean) geometry): each matrix `lr / d_in`

Every group carries `role` and `transposed`, so `init()` and loggers can tell layers apart.
Weight decay (decoupled, `W <- W (1 - lr wd)`) applies to matrices only, never to vectors:
decaying a norm gain towards zero fights the normalization it exists for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sweeper.optim.lmo import as_matrix
from sweeper.optim.roles import ROLES, ParamRole

PARAMETERIZATIONS = ("sp", "mup", "rescaled")


def _fan_in(pr: ParamRole) -> int:
    # A one-hot lookup (vocab, d) is the map vocab -> d: its fan-in is the vocabulary.
    return as_matrix(pr.param, pr.transposed).shape[-1]


def adamw_param_groups(
    roles: Iterable[ParamRole],
    lr: float,
    parameterization: str = "sp",
    width_mult: float = 1.0,
    weight_decay: float = 0.0,
    lr_mults: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for torch.optim.AdamW: one per (role, transposed), or per matrix for
    `rescaled` (each matrix has its own d_in). `lr_mults` maps role -> lr multiplier."""
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
            role_lr /= _fan_in(pr)
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


class MuPAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over `adamw_param_groups(..., "mup")`, plus the muP init."""

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
