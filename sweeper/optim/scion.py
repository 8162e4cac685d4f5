"""Scion and unconstrained Scion (uScion): steepest descent in a per-layer operator norm.

    d <- (1 - alpha) d + alpha g          (alpha = 1: no buffer, d = g)
    u  = scale * LMO(d)
    Scion  (constrained):    W <- (1 - lr) W - lr u    (a Frank-Wolfe step: W stays in the ball)
    uScion (unconstrained):  W <- W - lr u

Each param group picks its norm (`lmo`, one of `lmo.LMO_NAMES`) and radius (`scale`); the
recommended per-role choice for language models is colnorm -> spectral -> sign with bias_rms
vectors. `init()` puts every matrix on its ball, which is what makes the constrained method
start where it will stay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sweeper.optim.lmo import as_matrix, from_matrix, get_lmo, init_on_ball_


class Scion(torch.optim.Optimizer):
    """Scion / uScion. Per-group keys (constructor values are the defaults):

    lr, momentum (Scion's alpha: the weight of the new gradient), lmo, scale,
    unconstrained (False: Scion, True: uScion), transposed (weight stored (d_in, d_out), like
    nn.Embedding), stacked (leading dims are K models, not a conv kernel to flatten),
    ns_steps (Newton-Schulz steps of the spectral LMOs), zero_init (see `init`).

    Momentum buffers live in the parameter's dtype, like torch's own optimizers.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.1,
        lmo: str = "spectral",
        scale: float = 1.0,
        unconstrained: bool = False,
        transposed: bool = False,
        stacked: bool = False,
        ns_steps: int = 5,
        zero_init: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            lmo=lmo,
            scale=scale,
            unconstrained=unconstrained,
            transposed=transposed,
            stacked=stacked,
            ns_steps=ns_steps,
            zero_init=zero_init,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:  # fail at construction, not at the first step
            get_lmo(group["lmo"])
            if not 0.0 < group["momentum"] <= 1.0:
                raise ValueError(f"momentum (alpha) must be in (0, 1], got {group['momentum']}")

    @torch.no_grad()
    def init(self) -> None:
        """Put every parameter on its LMO's norm ball, times the group's `scale`.

        Groups with the vector LMO (`bias_rms`) are left alone unless `zero_init` is set:
        the reference inits BiasRMS vectors at zero, right for biases but fatal for norm
        gains (a zero gain blocks every signal through the layer).
        """
        for group in self.param_groups:
            for p in group["params"]:
                if group["lmo"] == "bias_rms":
                    if group["zero_init"]:
                        p.zero_()
                    continue
                W = as_matrix(p, group["transposed"], group["stacked"])
                init_on_ball_(group["lmo"], W, scale=group["scale"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lmo = get_lmo(group["lmo"], group["ns_steps"])
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

                u = lmo(as_matrix(d, transposed, stacked))
                if not group["unconstrained"]:
                    p.mul_(1.0 - lr)
                p.add_(from_matrix(u, p, transposed), alpha=-lr * scale)
        return loss
