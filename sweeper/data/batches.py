"""Batches: random training windows in a seed-fixed order, and one fixed validation set.

The order of training batches depends on the seed only, so trials that differ in lr, width or
optimizer see exactly the same tokens in the same order: differences in loss are the
optimizer's, not the sampler's. The validation set depends on nothing but its shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sweeper.data.sources import Data, load_data
from sweeper.data.tokens import DataError, TokenArray
from sweeper.spec import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]


def _windows(tokens: TokenArray, starts: np.ndarray, seq_len: int, vocab_size: int) -> Batch:
    """(x, y) int64 tensors of shape (len(starts), seq_len); y is x shifted by one token."""
    if isinstance(tokens, np.ndarray):
        buf = tokens[starts[:, None] + np.arange(seq_len + 1)]  # one gather, even on a memmap
    else:
        buf = np.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    buf = np.ascontiguousarray(buf, dtype=np.int64)
    # Every batch is checked: an id past the vocabulary would be an IndexError on CPU but a
    # device-side assert on CUDA, which kills the whole worker.
    top = int(buf.max())
    if top >= vocab_size:
        raise DataError(f"token id {top} >= vocab_size {vocab_size} in the data")
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _need(tokens: TokenArray, seq_len: int, what: str, hint: str = "") -> int:
    """len(tokens), which must hold one window of seq_len tokens and its next-token targets."""
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"{what} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}{hint}")
    return n


def check_length(cfg: DataConfig, seq_len: int) -> None:
    """Refuse data too short for trials of seq_len tokens, before any trial runs.

    Both splits must hold seq_len + 1 tokens, as train_batches and val_batches need; without
    this check a short file fails every trial at run time. Cheap: load_data memory-maps the
    files and is cached per process, so after fingerprint(cfg) it reads nothing more.
    Raises DataError naming the file, its split's token count and what is needed.
    """
    data = load_data(cfg)
    _need(
        data.train,
        seq_len,
        f"{data.source}: the training split",
        "; use more data or a smaller model.seq_len",
    )
    # Without val_shards the validation split is the tail of the data, val_fraction of it.
    if cfg.val_shards is None:
        hint = "; use more data, a smaller model.seq_len or a larger data.val_fraction"
    else:
        hint = "; use more validation data or a smaller model.seq_len"
    _need(data.val, seq_len, f"{data.source}: the validation split", hint)


def train_batches(data: Data, batch_size: int, seq_len: int, seed: int) -> Iterator[Batch]:
    """An endless iterator of (x, y) training batches at offsets drawn from PCG64(seed)."""
    n = _need(data.train, seq_len, f"{data.source}: the training split")
    rng = np.random.Generator(np.random.PCG64(seed % 2**64))

    def batches() -> Iterator[Batch]:
        while True:
            starts = rng.integers(0, n - seq_len, size=batch_size)
            yield _windows(data.train, starts, seq_len, data.vocab_size)

    return batches()


def val_batches(data: Data, batch_size: int, seq_len: int, n: int) -> list[Batch]:
    """n fixed validation batches: n * batch_size windows spread evenly over the split."""
    m = _need(data.val, seq_len, f"{data.source}: the validation split")
    starts = np.linspace(0, m - seq_len - 1, n * batch_size).round().astype(np.int64)
    return [
        _windows(data.val, starts[i * batch_size : (i + 1) * batch_size], seq_len, data.vocab_size)
        for i in range(n)
    ]
