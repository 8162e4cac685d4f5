"""Data sources: the embedded corpus, a text file, or token shards -> `Data`.

`load_data(cfg)` is called once per trial, in whatever worker process runs it, and
`fingerprint(cfg)` once per sweep by the controller; both are cached per process, keyed on the
config and on the size and mtime of the files it names (so an edited file is noticed).
Nothing here ever touches the network.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweeper.data import shards as shard_io
from sweeper.data import stdlib
from sweeper.data.tokens import DataError, TokenArray, as_tokens, split_tail
from sweeper.spec import DataConfig


@dataclass(frozen=True, eq=False)
class Data:
    """Training and validation tokens (1-D arrays of ids < vocab_size) and their fingerprint."""

    train: TokenArray
    val: TokenArray
    vocab_size: int
    fingerprint: str  # 16 hex digits; part of every trial id
    source: str  # DataConfig.describe()

    def __repr__(self) -> str:
        return (
            f"Data({self.source}, train={len(self.train)}, val={len(self.val)}, "
            f"vocab={self.vocab_size}, fingerprint={self.fingerprint})"
        )


_CACHE: dict[tuple, Data] = {}


def load_data(cfg: DataConfig) -> Data:
    """The tokens a DataConfig names. Raises DataError (naming the file) when they are unusable."""
    key = (cfg, _signature(cfg))
    data = _CACHE.get(key)
    if data is None:
        if cfg.corpus is not None:
            data = _load_stdlib(cfg)
        elif cfg.text is not None:
            data = _load_text(cfg)
        else:
            data = _load_shards(cfg)
        _CACHE[key] = data
    return data


def fingerprint(cfg: DataConfig) -> str:
    """A short hash of the data's bytes (the controller calls this once per sweep)."""
    return load_data(cfg).fingerprint


def _signature(cfg: DataConfig) -> tuple:
    """What must not have changed for a cached Data to be reused: the files' sizes and mtimes."""
    patterns = [p for p in (cfg.text, cfg.shards, cfg.val_shards) if p is not None]
    sig = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            try:
                st = os.stat(path)
            except OSError:
                continue
            sig.append((path, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _check_bytes_vocab(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    # Bytes are < 256 by construction; only a vocabulary smaller than that needs a look.
    if vocab_size < 256 and len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(f"{what}: byte {int(tokens.max())} >= vocab_size {vocab_size}")


def _load_stdlib(cfg: DataConfig) -> Data:
    train, val, fp = stdlib.load(cfg.val_fraction)
    vocab = cfg.resolved_vocab_size
    _check_bytes_vocab(train, vocab, "corpus stdlib")
    _check_bytes_vocab(val, vocab, "corpus stdlib")
    return Data(train, val, vocab, fp, cfg.describe())


def _load_text(cfg: DataConfig) -> Data:
    assert cfg.text is not None
    path = Path(os.path.expanduser(cfg.text))
    if not path.is_file():
        raise DataError(f"text {cfg.text}: no such file")
    size = path.stat().st_size
    n_val = int(size * cfg.val_fraction)
    if n_val < 2 or size - n_val < 2:
        raise DataError(f"text {cfg.text}: {size} bytes is too small to split train/validation")
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    _check_bytes_vocab(tokens, cfg.resolved_vocab_size, f"text {cfg.text}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return Data(
        tokens[: size - n_val],
        tokens[size - n_val :],
        cfg.resolved_vocab_size,
        h.hexdigest()[:16],
        cfg.describe(),
    )


def _load_shards(cfg: DataConfig) -> Data:
    assert cfg.shards is not None
    vocab = cfg.resolved_vocab_size
    train_shards = shard_io.open_shards(cfg.shards, "shards")
    val_shards = shard_io.open_shards(cfg.val_shards, "val_shards") if cfg.val_shards else []
    shared = {s.path.resolve() for s in train_shards} & {s.path.resolve() for s in val_shards}
    if shared:
        raise DataError(
            f"shards {cfg.shards} and val_shards {cfg.val_shards} share files "
            f"(e.g. {sorted(shared)[0]}): validation tokens would be trained on"
        )
    for s in train_shards + val_shards:
        shard_io.check_vocab(s, vocab)

    h = hashlib.sha256(b"shards|")
    shard_io.fingerprint(train_shards, h)
    h.update(b"|val|")
    shard_io.fingerprint(val_shards, h)

    parts = [s.tokens() for s in train_shards]
    if val_shards:
        train, val = as_tokens(parts), as_tokens([s.tokens() for s in val_shards])
    else:
        total = sum(len(p) for p in parts)
        n_val = int(total * cfg.val_fraction)
        if n_val < 2 or total - n_val < 2:
            raise DataError(
                f"shards {cfg.shards}: {total} tokens are too few to hold out validation"
            )
        train, val = split_tail(parts, n_val)
    return Data(train, val, vocab, h.hexdigest()[:16], cfg.describe())
