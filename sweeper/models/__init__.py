"""Proxy models sized by width and depth: `build_model(spec)` -> GPT or MLP.

Both take token ids (B, T) and return logits (B, T, vocab), have `loss(idx, targets)`, the
attributes `width` and `depth`, `param_roles() -> {name: role}` and `coord_layers()`, so the
trainer and the optimizers treat them alike. `build_bundle` puts several built models of one
shape into one model with members (models/base.py).
"""

from __future__ import annotations

from sweeper.models.base import TokenModel, load_members
from sweeper.models.gpt import GPT
from sweeper.models.mlp import MLP
from sweeper.spec import TrialSpec


def build_model(spec: TrialSpec, members: int | None = None) -> TokenModel:
    """The model a TrialSpec describes (on the CPU, initialised from the current torch RNG);
    with `members`, that many of them in one, uninitialised (see `build_bundle`)."""
    if spec.model == "gpt":
        return GPT(
            vocab_size=spec.vocab_size,
            width=spec.width,
            depth=spec.depth,
            seq_len=spec.seq_len,
            head_dim=spec.head_dim,
            zero_init_out=spec.zero_init_out,
            attn_scale=spec.attn_scale,
            members=members,
        )
    if spec.model == "mlp":
        return MLP(
            vocab_size=spec.vocab_size,
            width=spec.width,
            depth=spec.depth,
            context=spec.mlp_context,
            zero_init_out=spec.zero_init_out,
            members=members,
        )
    raise ValueError(f"unknown model kind {spec.model!r}; choose gpt or mlp")


def build_bundle(spec: TrialSpec, models: list[TokenModel]) -> TokenModel:
    """One model whose members are `models` (built from trials of `spec`'s shape), each member
    starting from its model's weights."""
    return load_members(build_model(spec, members=len(models)), models)


__all__ = ["GPT", "MLP", "build_bundle", "build_model"]
