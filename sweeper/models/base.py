"""What the two proxies share: the loss, and parameter roles read off their layer names."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TokenModel(nn.Module):
    """A model from token ids (B, T) to logits (B, T, vocab) with `wte` in and `lm_head` out."""

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats (computed in float32 under autocast)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def param_roles(self) -> dict[str, str]:
        """The optimizers' roles: token embedding in, head out, gains and biases are vectors."""
        roles = {}
        for name, p in self.named_parameters():
            if p.ndim < 2:
                roles[name] = "vector"
            elif name == "wte.weight":
                roles[name] = "input"
            elif name == "lm_head.weight":
                roles[name] = "output"
            else:
                roles[name] = "hidden"
        return roles
