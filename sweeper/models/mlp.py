"""The MLP proxy: next-token prediction from a fixed window of previous tokens.

The input is the concatenation of one-hot vectors of the last `context` tokens (the current one
included), so the first layer is a Linear map from context * vocab to width. It is stored as an
`nn.Embedding(context * vocab, width)` indexed by `position * vocab + token` and summed over
positions, which is exactly that Linear map without materialising the one-hot vectors; being an
Embedding, its weight is stored (d_in, d_out) and the optimizers treat it as transposed.

Positions before the start of a sequence read token id 0 (the padding token). Byte 0 never
occurs in text, so for byte-level data the padding is distinguishable from real input; for
token shards id 0 is a real token and the first `context - 1` predictions of each window see it.

Activations are sqrt(2) * relu, the gain the Scion authors recommend: relu halves the second
moment of a symmetric input, the sqrt(2) restores it, so with N(0, 1/fan_in) weights (or
orthogonal ones under Scion) activations keep RMS ~1 at any depth and width. Hidden layers have
biases (the `vector` role), initialised to zero; the head has none, so it is a pure matrix whose
rms->inf norm is the whole readout.

`members=K` builds K MLPs in one (see base.py): every parameter gains a leading dim K and
tokens are (K, B, T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweeper.models.base import Linear, TokenModel, member_ids, stacked_rows

PAD_TOKEN = 0


class ContextEmbedding(nn.Embedding):
    """Sum over positions p of E[p * vocab + token_p]: a Linear map on concatenated one-hots."""

    def __init__(self, vocab_size: int, context: int, width: int, members: int | None = None):
        super().__init__(context * vocab_size, width)
        self.vocab_size, self.context = vocab_size, context
        if members is not None:
            self.weight = nn.Parameter(self.weight.detach().expand(members, -1, -1).clone())

    def forward(self, idx: Tensor) -> Tensor:  # (..., T) -> (..., T, width)
        c = self.context
        padded = F.pad(idx, (c - 1, 0), value=PAD_TOKEN)
        windows = padded.unfold(-1, c, 1)  # (..., T, c): window t ends with token t
        ids = windows + torch.arange(c, device=idx.device) * self.vocab_size
        table = self.weight
        if table.ndim == 3:  # members: each looks up in its own table
            ids, table = member_ids(ids, table.shape[1]), stacked_rows(table)
        # embedding_bag sums the c rows without building a (..., T, c, width) tensor.
        out = F.embedding_bag(ids.reshape(-1, c), table, mode="sum")
        return out.view(*idx.shape, -1)


class MLP(TokenModel):
    def __init__(
        self,
        vocab_size: int,
        width: int,
        depth: int,
        context: int,
        zero_init_out: bool = False,
        members: int | None = None,
    ):
        super().__init__()
        self.vocab_size, self.width, self.depth, self.context = vocab_size, width, depth, context
        self.members = members
        self.wte = ContextEmbedding(vocab_size, context, width, members)
        self.hidden = nn.ModuleList(Linear(width, width, members=members) for _ in range(depth))
        self.lm_head = Linear(width, vocab_size, bias=False, members=members)
        self._init_weights(zero_init_out)

    @torch.no_grad()
    def _init_weights(self, zero_init_out: bool) -> None:
        # Each position contributes one N(0, 1/context) row, so the summed input has variance 1.
        nn.init.normal_(self.wte.weight, std=self.context**-0.5)
        for m in self.hidden:
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            nn.init.zeros_(m.bias)
        # The MLP has no residual blocks; its one output projection is the head.
        if zero_init_out:
            nn.init.zeros_(self.lm_head.weight)
        else:
            nn.init.normal_(self.lm_head.weight, std=self.width**-0.5)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); logits[:, t] sees idx[:, t-c+1 .. t].
        With members, (K, B, T) -> (K, B, T, vocab_size)."""
        x = math.sqrt(2) * F.relu(self.wte(idx))
        for layer in self.hidden:
            x = math.sqrt(2) * F.relu(layer(x))
        return self.lm_head(x)

    def coord_layers(self) -> list[tuple[str, nn.Module]]:
        """Pre-activations of each layer and the logits, from input to output."""
        layers: list[tuple[str, nn.Module]] = [("wte", self.wte)]
        layers += [(f"hidden.{i}", m) for i, m in enumerate(self.hidden)]
        layers.append(("lm_head", self.lm_head))
        return layers
