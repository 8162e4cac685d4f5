"""Proxy models sized by width and depth: `build_model(spec)` -> GPT or MLP.

Both take token ids (B, T) and return logits (B, T, vocab), have `loss(idx, targets)`, the
attributes `width` and `depth`, `param_roles() -> {name: role}` and `coord_layers()`, so the
trainer and the optimizers treat them alike.
"""

from __future__ import annotations

from torch import nn

from sweeper.models.gpt import GPT
from sweeper.models.mlp import MLP
from sweeper.spec import TrialSpec


def build_model(spec: TrialSpec) -> nn.Module:
    """The model a TrialSpec describes (on the CPU, initialised from the current torch RNG)."""
    if spec.model == "gpt":
        return GPT(
            vocab_size=spec.vocab_size,
            width=spec.width,
            depth=spec.depth,
            seq_len=spec.seq_len,
            head_dim=spec.head_dim,
            zero_init_out=spec.zero_init_out,
            attn_scale=spec.attn_scale,
        )
    if spec.model == "mlp":
        return MLP(
            vocab_size=spec.vocab_size,
            width=spec.width,
            depth=spec.depth,
            context=spec.mlp_context,
            zero_init_out=spec.zero_init_out,
        )
    raise ValueError(f"unknown model kind {spec.model!r}; choose gpt or mlp")


__all__ = ["GPT", "MLP", "build_model"]
