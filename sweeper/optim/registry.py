"""Build any of the project's optimizers by name for a model, with per-role settings.

    opt = build_optimizer("scion", model, lr=2**-6, scale_output=16.0)
    if hasattr(opt, "init"):
        opt.init()          # Scion, uScion and adamw-mup re-initialise the weights

Every optimizer takes the per-role lr multipliers lr_input, lr_hidden, lr_output, lr_vector
(default 1.0), and the hyperparameters `accepted_hparams(name)` lists. All of them are plain
scalars (betas are `beta1`, `beta2`), so a sweep grid can put any of them on an axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sweeper.optim.adamw import AdamW, MuPAdamW, adamw_param_groups
from sweeper.optim.lmo import LMO_NAMES
from sweeper.optim.moga import MOGA
from sweeper.optim.muon import SCALE_CONVENTIONS, Muon
from sweeper.optim.roles import ROLES, ParamRole, param_roles
from sweeper.optim.scion import Scion

OPTIMIZER_NAMES = (
    "adamw",
    "adamw-mup",
    "adamw-rescaled",
    "muon",
    "scion",
    "uscion",
    "moga-row",
    "moga-col",
)

_LR_MULTS: dict[str, Any] = {f"lr_{role}": 1.0 for role in ROLES}

_ADAMW = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)

# Scion defaults are the reference's shallow-GPT width scan (untied, one-hot input).
_SCION = dict(
    momentum=0.1,
    lmo_input="colnorm",
    lmo_hidden="spectral",
    lmo_output="sign",
    scale_input=1.0,
    scale_hidden=3.0,
    scale_output=10.0,
    scale_vector=1.0,
    ns_steps=5,
)

_MOGA = dict(beta=0.95, p=2.0, weight_decay=0.1, head_fan_factor=True)

_HPARAMS: dict[str, dict[str, Any]] = {
    "adamw": {**_ADAMW, **_LR_MULTS},
    "adamw-mup": {**_ADAMW, "width_mult": None, "base_width": 64, **_LR_MULTS},
    "adamw-rescaled": {**_ADAMW, **_LR_MULTS},
    "muon": dict(
        momentum=0.95,
        nesterov=True,
        weight_decay=0.0,
        scale_convention="keller",
        ns_steps=5,
        adam_lr=3e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-10,
        adam_weight_decay=0.0,
        **_LR_MULTS,
    ),
    "scion": {**_SCION, **_LR_MULTS},
    "uscion": {**_SCION, **_LR_MULTS},
    "moga-row": {**_MOGA, **_LR_MULTS},
    "moga-col": {**_MOGA, **_LR_MULTS},
}


def accepted_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters `build_optimizer(name, ...)` accepts, with their defaults."""
    _check_name(name)
    return dict(_HPARAMS[name])


def build_optimizer(
    name: str, model: nn.Module, lr: float | torch.Tensor, **hparams: Any
) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZER_NAMES) over `model`'s trainable parameters.

    Parameters are grouped by role (`param_roles(model)`), each group with its own lr
    (`lr * lr_<role>`) and settings; unknown names or hyperparameters raise ValueError.
    For muon, `lr` is Muon's (hidden matrices) and `adam_lr` AdamW's (everything else).

    A model whose parameters carry a leading member dim (K models in one, declared by
    `model.members = K`) gets stacked groups, and `lr` may then be a tensor of K lrs.
    """
    _check_name(name)
    unknown = sorted(set(hparams) - set(_HPARAMS[name]))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; "
            f"accepted: {', '.join(_HPARAMS[name])}"
        )
    h = {**_HPARAMS[name], **hparams}
    roles = param_roles(model)
    if not roles:
        raise ValueError("the model has no trainable parameters")
    h["stacked"] = getattr(model, "members", None) is not None
    return _BUILDERS[name](name, model, roles, lr, h)


def _check_name(name: str) -> None:
    if name not in _HPARAMS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")


def _by_role(roles: list[ParamRole]) -> dict[tuple[str, bool], list[nn.Parameter]]:
    """Parameters grouped by (role, transposed), in the order input, hidden, output, vector."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for role in ROLES:
        for pr in roles:
            if pr.role == role:
                groups.setdefault((role, pr.transposed), []).append(pr.param)
    return groups


def _lr_mults(h: dict[str, Any]) -> dict[str, float]:
    return {role: h[f"lr_{role}"] for role in ROLES}


def _build_adamw(
    name: str, model: nn.Module, roles: list[ParamRole], lr: float, h: dict[str, Any]
) -> torch.optim.Optimizer:
    kind = {"adamw": "sp", "adamw-mup": "mup", "adamw-rescaled": "rescaled"}[name]
    width_mult = 1.0
    if kind == "mup":
        width_mult = h["width_mult"] or _width(model, roles) / h["base_width"]
    groups = adamw_param_groups(
        roles,
        lr,
        kind,
        width_mult,
        weight_decay=h["weight_decay"],
        lr_mults=_lr_mults(h),
        stacked=h["stacked"],
    )
    cls = MuPAdamW if kind == "mup" else AdamW
    return cls(groups, lr=lr, betas=(h["beta1"], h["beta2"]), eps=h["eps"])


def _width(model: nn.Module, roles: list[ParamRole]) -> float:
    """`model.width`, else the input layer's output dim (the residual width of a GPT)."""
    width = getattr(model, "width", None)
    if width is not None:
        return float(width)
    for pr in roles:
        if pr.role == "input":
            return float(pr.param.shape[-1] if pr.transposed else pr.param.shape[-2])
    raise ValueError("adamw-mup needs width_mult, a model.width, or an input layer to infer it")


def _build_muon(
    name: str, model: nn.Module, roles: list[ParamRole], lr: float, h: dict[str, Any]
) -> torch.optim.Optimizer:
    mults = _lr_mults(h)
    groups = []
    for (role, transposed), params in _by_role(roles).items():
        if role == "hidden":
            groups.append(
                dict(
                    params=params,
                    use_muon=True,
                    lr=lr * mults[role],
                    role=role,
                    transposed=transposed,
                    stacked=h["stacked"],
                )
            )
        else:
            wd = 0.0 if role == "vector" else h["adam_weight_decay"]
            groups.append(
                dict(
                    params=params,
                    use_muon=False,
                    lr=h["adam_lr"] * mults[role],
                    role=role,
                    transposed=transposed,
                    weight_decay=wd,
                )
            )
    if h["scale_convention"] not in SCALE_CONVENTIONS:
        raise ValueError(
            f"unknown scale_convention {h['scale_convention']!r}; "
            f"choose from {', '.join(SCALE_CONVENTIONS)}"
        )
    return Muon(
        groups,
        lr=lr,
        momentum=h["momentum"],
        nesterov=h["nesterov"],
        weight_decay=h["weight_decay"],
        scale_convention=h["scale_convention"],
        ns_steps=h["ns_steps"],
        adam_lr=h["adam_lr"],
        adam_betas=(h["adam_beta1"], h["adam_beta2"]),
        adam_eps=h["adam_eps"],
        adam_weight_decay=h["adam_weight_decay"],
    )


def _build_scion(
    name: str, model: nn.Module, roles: list[ParamRole], lr: float, h: dict[str, Any]
) -> torch.optim.Optimizer:
    mults = _lr_mults(h)
    lmos = {
        "input": h["lmo_input"],
        "hidden": h["lmo_hidden"],
        "output": h["lmo_output"],
        "vector": "bias_rms",
    }
    for role, lmo in lmos.items():
        if lmo not in LMO_NAMES:
            raise ValueError(f"unknown lmo_{role} {lmo!r}; choose from {', '.join(LMO_NAMES)}")
    groups = [
        dict(
            params=params,
            lr=lr * mults[role],
            lmo=lmos[role],
            scale=h[f"scale_{role}"],
            transposed=transposed,
            stacked=h["stacked"],
            role=role,
        )
        for (role, transposed), params in _by_role(roles).items()
    ]
    return Scion(
        groups,
        lr=lr,
        momentum=h["momentum"],
        unconstrained=name == "uscion",
        ns_steps=h["ns_steps"],
    )


def _build_moga(
    name: str, model: nn.Module, roles: list[ParamRole], lr: float, h: dict[str, Any]
) -> torch.optim.Optimizer:
    mults = _lr_mults(h)
    # Hidden matrices take the named rule; the head is row-normalized in both variants (the
    # readout's geometry is ->inf), with or without its fan factor; embeddings and vectors
    # move by sign(momentum), as in the reference code.
    rules = {
        "input": "sign",
        "hidden": name.removeprefix("moga-"),
        "output": "row",
        "vector": "sign",
    }
    groups = []
    for (role, transposed), params in _by_role(roles).items():
        groups.append(
            dict(
                params=params,
                lr=lr * mults[role],
                rule=rules[role],
                fan_factor=h["head_fan_factor"] if role == "output" else True,
                weight_decay=0.0 if role == "vector" else h["weight_decay"],
                transposed=transposed,
                stacked=h["stacked"],
                role=role,
            )
        )
    return MOGA(groups, lr=lr, beta=h["beta"], p=h["p"], weight_decay=h["weight_decay"])


_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _build_adamw,
    "adamw-mup": _build_adamw,
    "adamw-rescaled": _build_adamw,
    "muon": _build_muon,
    "scion": _build_scion,
    "uscion": _build_scion,
    "moga-row": _build_moga,
    "moga-col": _build_moga,
}
