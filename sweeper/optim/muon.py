"""Muon for hidden matrices, AdamW for everything else, in one optimizer object.

Muon (groups with `use_muon=True`):
    buf <- beta buf + (1 - beta) g
    u    = (1 - beta) g + beta buf        (Nesterov; plain: u = buf)
    u    = NS5(u) * scale(d_out, d_in)
    W   <- W (1 - lr wd) - lr u

AdamW (groups with `use_muon=False`: embeddings, the head, vectors) is adamw.py's update
(torch's AdamW, in torch's state layout), run on those groups' state, so the user steps (and
checkpoints) a single object. Either kind's lr may be a tensor of per-member lrs for stacked
parameters (a learning-rate bundle).

`Muon(model.parameters())` is refused: which matrices are hidden (Muon) and which are the
embedding or head (AdamW, by the reference) is a model's structure, not a shape;
`build_optimizer("muon", model, lr)` groups by `param_roles(model)`.

`torch.optim.Muon` computes the same Muon step (`tests/test_optim_ecosystem.py` checks it): its
`adjust_lr_fn` None / "original" is scale_convention "keller", "match_rms_adamw" is
"moonlight"; its weight_decay defaults to 0.1, ours to 0. Its Newton-Schulz runs in bfloat16
on every device; ours in float32 off CUDA (`lmo.newton_schulz`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sweeper.optim.adamw import adamw_update_
from sweeper.optim.lmo import as_matrix, descend_, from_matrix, newton_schulz, per_member
from sweeper.optim.roles import param_label

SCALE_CONVENTIONS = ("keller", "speedrun", "moonlight")


def muon_scale(d_out: int, d_in: int, convention: str = "keller") -> float:
    """The factor on NS5's output.

    keller:    max(1, d_out/d_in)^0.5   (KellerJordan/Muon)
    speedrun:  sqrt(max(d_out, d_in))   (the 2024 speedrun)
    moonlight: 0.2 sqrt(max(d_out, d_in)), which matches AdamW's update RMS so AdamW's lr and
               weight decay carry over.
    """
    if convention == "keller":
        return max(1.0, d_out / d_in) ** 0.5
    if convention == "speedrun":
        return math.sqrt(max(d_out, d_in))
    if convention == "moonlight":
        return 0.2 * math.sqrt(max(d_out, d_in))
    raise ValueError(
        f"unknown scale_convention {convention!r}; choose from {', '.join(SCALE_CONVENTIONS)}"
    )


class Muon(torch.optim.Optimizer):
    """Muon + AdamW. Every param group must say `use_muon` (True / False).

    Muon group keys: lr, momentum, nesterov, weight_decay, scale_convention, ns_steps,
    transposed, stacked. AdamW group keys: lr (defaults to `adam_lr`), betas
    (`adam_betas`), eps (`adam_eps`), weight_decay (`adam_weight_decay`).
    Both kinds keep their step size in `lr`, so lr schedulers treat them alike. `defaults`
    is empty (the kinds differ), so momentum-cycling schedulers (OneCycleLR, CyclicLR) refuse
    it: one `momentum` or `betas` written into every group fits only one kind.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale_convention: str = "keller",
        ns_steps: int = 5,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        adam_weight_decay: float = 0.0,
    ) -> None:
        muon_scale(1, 1, scale_convention)  # validate early
        self._muon_defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scale_convention=scale_convention,
            ns_steps=ns_steps,
            transposed=False,
            stacked=False,
        )
        self._adam_defaults = dict(
            lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps, weight_decay=adam_weight_decay
        )
        # Empty base defaults: the two kinds of group take different keys (add_param_group).
        super().__init__(params, {})

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy keep both kinds' defaults
        state = super().__getstate__()
        return {
            **state,
            "_muon_defaults": self._muon_defaults,
            "_adam_defaults": self._adam_defaults,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError(
                "Muon needs param groups (dicts) that each say use_muon=True (hidden matrices) "
                "or use_muon=False (embeddings, head, vectors: AdamW); "
                "sweeper.optim.build_optimizer('muon', model, lr) builds them from the model"
            )
        group = dict(param_group)
        defaults = self._muon_defaults if group["use_muon"] else self._adam_defaults
        for key, value in defaults.items():
            group.setdefault(key, value)
        if group["use_muon"]:
            muon_scale(1, 1, group["scale_convention"])
        super().add_param_group(group)
        if group["use_muon"]:  # fail here, not with a shape error at the first step
            for i, p in enumerate(group["params"]):
                if p.ndim < 2:
                    self.param_groups.pop()
                    raise ValueError(
                        f"a use_muon=True group holds {param_label(group, i)}: Muon "
                        "orthogonalizes matrices only. Put vectors (biases, norm gains), and by "
                        "the reference the embedding and the head, in a use_muon=False (AdamW) "
                        "group, or use sweeper.optim.build_optimizer('muon', model, lr), which "
                        "groups by param_roles(model)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adam_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        transposed, stacked = group["transposed"], group["stacked"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1.0 - beta)
            u = g.lerp(buf, beta) if group["nesterov"] else buf

            M = as_matrix(u, transposed, stacked)
            d_out, d_in = M.shape[-2:]
            X = newton_schulz(M, group["ns_steps"])
            if wd:
                p.mul_(1.0 - per_member(lr, p) * wd)
            scale = muon_scale(d_out, d_in, group["scale_convention"])
            descend_(p, from_matrix(X, p, transposed), lr * scale)

    def _adam_step(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None:
                adamw_update_(
                    p, p.grad, self.state[p], group["lr"], group["betas"], group["eps"],
                    group["weight_decay"],
                )  # fmt: skip
