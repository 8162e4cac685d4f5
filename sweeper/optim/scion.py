"""Scion and unconstrained Scion (uScion): steepest descent in a per-layer operator norm.

    d <- (1 - alpha) d + alpha g          (alpha = 1: no buffer, d = g)
    u  = scale * LMO(d)
    Scion  (constrained):    W <- (1 - lr) W - lr u    (a Frank-Wolfe step: W stays in the ball)
    uScion (unconstrained):  W <- W - lr u

Each param group picks its norm (`lmo`, one of `lmo.LMO_NAMES`, or `auto`) and radius
(`scale`); the recommended per-role choice for language models is colnorm -> spectral -> sign
with bias_rms vectors (`build_optimizer("scion", model, lr)` groups a model that way). `auto`,
the default, is the reference code's: spectral for matrices, bias_rms for vectors, so
`Scion(model.parameters())` runs on any model. `init()` puts every matrix on its ball, which is
what makes the constrained method start where it will stay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sweeper.optim.lmo import (
    LMO_NAMES,
    as_matrix,
    descend_,
    from_matrix,
    get_lmo,
    init_on_ball_,
    per_member,
)
from sweeper.optim.roles import param_label

# `auto` picks the norm from the parameter's shape, like the reference code's default norm:
# a vector (bias, norm gain, scalar) has no d_in and d_out, so no operator norm; it takes the
# RMS ball (bias_rms), the norm `param_roles` gives every parameter of fewer than 2 dims.
# Matrices (conv kernels flattened) take spectral, the hidden layers' norm.
AUTO = "auto"


def _lmo_for(name: str, p: Tensor) -> str:
    """The LMO a group's `lmo` setting gives parameter `p` (resolves `auto`)."""
    if name != AUTO:
        return name
    return "bias_rms" if p.ndim < 2 else "spectral"


class Scion(torch.optim.Optimizer):
    """Scion / uScion. Per-group keys (constructor values are the defaults):

    lr (a number, or with `stacked` a tensor of per-member lrs), momentum (Scion's alpha: the
    weight of the new gradient), lmo (default `auto`), scale,
    unconstrained (False: Scion, True: uScion), transposed (weight stored (d_in, d_out), like
    nn.Embedding), stacked (leading dims are K models, not a conv kernel to flatten),
    ns_steps (Newton-Schulz steps of the spectral LMOs), zero_init (see `init`).

    Momentum buffers live in the parameter's dtype, like torch's own optimizers.

    lr schedulers that only set `lr` (LambdaLR, CosineAnnealingLR, LinearLR, OneCycleLR with
    cycle_momentum=False, ...) work as with any optimizer; momentum-cycling ones are refused
    (see `__init__`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.1,
        lmo: str = AUTO,
        scale: float = 1.0,
        unconstrained: bool = False,
        transposed: bool = False,
        stacked: bool = False,
        ns_steps: int = 5,
        zero_init: bool = False,
    ) -> None:
        # `momentum` is alpha = 1 - beta, the weight of the *new* gradient, and is kept out of
        # `defaults` on purpose: torch's momentum-cycling schedulers (OneCycleLR and CyclicLR
        # with cycle_momentum=True) check `defaults` for "momentum" and then write SGD's beta
        # (0.85-0.95) into every group, silently turning alpha 0.1 into 0.95. Without the key
        # they refuse at construction ("optimizer must support momentum or beta1 with
        # `cycle_momentum` option enabled"): pass cycle_momentum=False. Groups still carry it.
        self._momentum = momentum
        defaults = dict(
            lr=lr,
            lmo=lmo,
            scale=scale,
            unconstrained=unconstrained,
            transposed=transposed,
            stacked=stacked,
            ns_steps=ns_steps,
            zero_init=zero_init,
        )
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy keep the alpha default
        return {**super().__getstate__(), "_momentum": self._momentum}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("momentum", self._momentum)
        super().add_param_group(param_group)
        try:  # fail here, not at the first step
            _check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def init(self) -> None:
        """Put every parameter on its LMO's norm ball, times the group's `scale`.

        Groups with the vector LMO (`bias_rms`) are left alone unless `zero_init` is set:
        the reference inits BiasRMS vectors at zero, right for biases but fatal for norm
        gains (a zero gain blocks every signal through the layer).
        """
        for group in self.param_groups:
            for p in group["params"]:
                lmo = _lmo_for(group["lmo"], p)
                if lmo == "bias_rms":
                    if group["zero_init"]:
                        p.zero_()
                    continue
                W = as_matrix(p, group["transposed"], group["stacked"])
                init_on_ball_(lmo, W, scale=group["scale"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, alpha, scale = group["lr"], group["momentum"], group["scale"]
            transposed, stacked = group["transposed"], group["stacked"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if alpha == 1.0:
                    d = p.grad
                else:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    d = state["momentum_buffer"]
                    d.lerp_(p.grad, alpha)  # (1 - alpha) d + alpha g

                lmo = get_lmo(_lmo_for(group["lmo"], p), group["ns_steps"])
                u = lmo(as_matrix(d, transposed, stacked))
                if not group["unconstrained"]:
                    p.mul_(1.0 - per_member(lr, p))
                descend_(p, from_matrix(u, p, transposed), lr * scale)
        return loss


def _check_group(group: dict[str, Any], index: int) -> None:
    name = group["lmo"]
    if name != AUTO and name not in LMO_NAMES:
        raise ValueError(f"unknown lmo {name!r}; choose from {', '.join((AUTO, *LMO_NAMES))}")
    if not 0.0 < group["momentum"] <= 1.0:
        raise ValueError(f"momentum (alpha) must be in (0, 1], got {group['momentum']}")
    if name == AUTO and group["stacked"]:
        raise ValueError(
            "lmo='auto' decides by a parameter's ndim, which a stacked group's leading model "
            "dims blur: name the lmo of a stacked group"
        )
    if name in (AUTO, "bias_rms"):
        return
    for i, p in enumerate(group["params"]):
        if p.ndim < 2:
            raise ValueError(
                f"param group {index} has lmo={name!r}, a matrix norm, but holds "
                f"{param_label(group, i)}, a vector (bias, norm gain or scalar). Give vectors a "
                "group with lmo='bias_rms', leave lmo='auto' (spectral for matrices, bias_rms "
                "for vectors), or build per-role groups with "
                "sweeper.optim.build_optimizer('scion', model, lr) (roles: param_roles(model))"
            )
