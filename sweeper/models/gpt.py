"""The GPT proxy: a small decoder-only transformer whose shape is a function of its width.

Modern nanoGPT style: untied token embedding and head, RMSNorm (pre-norm), rotary position
embeddings, a relu^2 MLP of 4x width, no biases. Only the width is swept, so everything else is
either fixed (head_dim) or derived from it (heads, MLP size), which keeps a width scan a pure
scan of one variable.

Initialisation is the standard parameterisation (SP) that width-transfer studies start from:
hidden and output matrices N(0, 1/fan_in), the token embedding N(0, 1) (its fan-in as a map on
one-hot vectors is 1). Optimizers with their own geometry re-initialise (Scion puts weights on
its norm ball, adamw-mup re-initialises muP-style) through their `init()`.

`members=K` builds K GPTs in one (see base.py): every parameter gains a leading dim K, tokens
are (K, B, T), and attention runs the K * B sequences as one batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweeper.models.base import Linear, TokenModel, member_ids, stacked_rows


class RMSNorm(nn.Module):
    """x / rms(x) times a learned gain (a `vector` parameter, initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-6, members: int | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim) if members is None else torch.ones(members, dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.ndim == 1:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        gain = self.weight.view(self.weight.shape[0], *[1] * (x.ndim - 2), -1)
        return F.rms_norm(x, (x.size(-1),), eps=self.eps) * gain


class Embedding(nn.Embedding):
    """nn.Embedding whose table (vocab, d) may carry a leading member dim: member k looks its
    tokens idx[k] up in its own table."""

    def __init__(self, vocab_size: int, width: int, members: int | None = None):
        super().__init__(vocab_size, width)
        if members is not None:
            self.weight = nn.Parameter(self.weight.detach().expand(members, -1, -1).clone())

    def forward(self, idx: Tensor) -> Tensor:
        if self.weight.ndim == 2:
            return F.embedding(idx, self.weight)
        return F.embedding(member_ids(idx, self.weight.shape[1]), stacked_rows(self.weight))


class Rotary(nn.Module):
    """Rotary position embedding (half-split form) for heads of size head_size."""

    def __init__(self, head_size: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_size}")
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Buffers, not parameters: they move with .to(device) but no optimizer sees them.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, T, head_size)
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(
        self, width: int, head_dim: int, seq_len: int, attn_scale: str, members: int | None
    ):
        super().__init__()
        # Heads keep a fixed size as width grows (more heads, not bigger ones); a width below
        # head_dim gets a single head of size width.
        self.head_size = min(head_dim, width)
        self.n_head = max(1, width // head_dim)
        inner = self.n_head * self.head_size
        # q, k, v as separate matrices rather than one fused (3*inner, width) matrix: the
        # spectral optimizers (Muon, Scion) orthogonalise per matrix, and q, k, v are three maps.
        self.c_q = Linear(width, inner, bias=False, members=members)
        self.c_k = Linear(width, inner, bias=False, members=members)
        self.c_v = Linear(width, inner, bias=False, members=members)
        self.c_proj = Linear(inner, width, bias=False, members=members)
        self.rotary = Rotary(self.head_size, seq_len)
        if attn_scale == "sqrt":
            self.scale = 1.0 / math.sqrt(self.head_size)
        elif attn_scale == "mup":  # muP: q.k grows like d_head once q and k align in training
            self.scale = 1.0 / self.head_size
        else:
            raise ValueError(f"attn_scale must be 'sqrt' or 'mup', got {attn_scale!r}")

    def forward(self, x: Tensor) -> Tensor:  # (..., T, width): every sequence of every member
        *lead, T, _ = x.shape
        q, k, v = (
            c(x).view(-1, T, self.n_head, self.head_size).transpose(1, 2)
            for c in (self.c_q, self.c_k, self.c_v)
        )
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(*lead, T, -1))


class MLP(nn.Module):
    def __init__(self, width: int, members: int | None):
        super().__init__()
        self.c_fc = Linear(width, 4 * width, bias=False, members=members)
        self.c_proj = Linear(4 * width, width, bias=False, members=members)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(
        self, width: int, head_dim: int, seq_len: int, attn_scale: str, members: int | None
    ):
        super().__init__()
        self.norm1 = RMSNorm(width, members=members)
        self.attn = CausalSelfAttention(width, head_dim, seq_len, attn_scale, members)
        self.norm2 = RMSNorm(width, members=members)
        self.mlp = MLP(width, members)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(TokenModel):
    def __init__(
        self,
        vocab_size: int,
        width: int,
        depth: int,
        seq_len: int,
        head_dim: int = 64,
        zero_init_out: bool = False,
        attn_scale: str = "sqrt",
        members: int | None = None,
    ):
        super().__init__()
        self.vocab_size, self.width, self.depth, self.seq_len = vocab_size, width, depth, seq_len
        self.members = members
        self.wte = Embedding(vocab_size, width, members)
        self.blocks = nn.ModuleList(
            Block(width, head_dim, seq_len, attn_scale, members) for _ in range(depth)
        )
        self.norm_f = RMSNorm(width, members=members)
        self.lm_head = Linear(width, vocab_size, bias=False, members=members)
        self._init_weights(zero_init_out)

    @torch.no_grad()
    def _init_weights(self, zero_init_out: bool) -> None:
        nn.init.normal_(self.wte.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features**-0.5)
        if zero_init_out:
            # Each block then starts as the identity on the residual stream.
            for block in self.blocks:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); with members (K, B, T) -> (K, B, T, V)."""
        if idx.size(-1) > self.seq_len:
            raise ValueError(f"sequence of {idx.size(-1)} tokens > seq_len {self.seq_len}")
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))

    def coord_layers(self) -> list[tuple[str, nn.Module]]:
        """The layers whose outputs a coord check follows, from input to output."""
        layers: list[tuple[str, nn.Module]] = [("wte", self.wte)]
        for i, block in enumerate(self.blocks):
            layers += [(f"blocks.{i}.attn", block.attn), (f"blocks.{i}.mlp", block.mlp)]
        layers.append(("lm_head", self.lm_head))
        return layers
