"""A small GPT trial on the embedded corpus, for tests that build TrialSpecs by hand."""

from __future__ import annotations

from sweeper.data import fingerprint
from sweeper.spec import DataConfig, TrialSpec

STDLIB = DataConfig(corpus="stdlib")


def make_trial(**changes) -> TrialSpec:
    """Width 64, depth 2, 10 steps of 4 x 32 tokens with AdamW on CPU; `changes` override."""
    fields = dict(
        sweep="t",
        model="gpt",
        width=64,
        depth=2,
        seq_len=32,
        head_dim=64,
        zero_init_out=False,
        attn_scale="sqrt",
        mlp_context=4,
        data=STDLIB,
        data_fingerprint=fingerprint(STDLIB),
        vocab_size=256,
        batch_size=4,
        steps=10,
        schedule="constant",
        warmup=0.0,
        warmdown=0.0,
        grad_clip=0.0,
        log_every=5,
        eval_every=10,
        eval_batches=1,
        coord_check=0,
        seed=0,
        optimizer="adamw",
        lr=1e-3,
        device="cpu",
    )
    return TrialSpec(**{**fields, **changes})
