"""Token shards researchers already have on disk, memory-mapped, never read in full.

Two formats, told apart by the first int32 of the file:
- nanoGPT (`prepare.py`'s train.bin / val.bin): raw little-endian uint16 tokens, no header.
- modded-nanogpt / llm.c: 256 little-endian int32 (magic 20240520, version 1, token count,
  zeros), then exactly that many uint16 tokens.

A file that does not fit its format is refused with its path in the message. Files are never
hashed in full (a FineWeb shard is 200 MB): the fingerprint covers names, sizes, headers and a
few sampled chunks, which catches a re-tokenised or swapped shard.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.data.tokens import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SAMPLE_TOKENS = 1 << 15  # tokens per sampled chunk (vocab check and fingerprint)
N_SAMPLES = 8  # chunks spread over the file besides its first and last


@dataclass(frozen=True)
class Shard:
    path: Path
    fmt: str  # "raw" (nanoGPT) | "header" (modded-nanogpt / llm.c)
    offset: int  # bytes before the first token
    n_tokens: int

    def tokens(self) -> np.memmap:
        return np.memmap(
            self.path, dtype="<u2", mode="r", offset=self.offset, shape=(self.n_tokens,)
        )


def resolve_glob(pattern: str, what: str) -> list[Path]:
    """The files a glob names, sorted; a DataError when it names none."""
    expanded = os.path.expanduser(pattern)
    paths = sorted(Path(p) for p in glob.glob(expanded) if os.path.isfile(p))
    if not paths:
        if not glob.has_magic(expanded):
            raise DataError(f"{what} {pattern}: no such file")
        raise DataError(f"{what} {pattern}: the glob matches no files")
    return paths


def inspect(path: Path) -> Shard:
    """Read a shard's header and check its size; no token is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as err:
        raise DataError(f"shard {path}: cannot read ({err.strerror or err})") from None
    ints = np.frombuffer(head[: len(head) // 4 * 4], dtype="<i4")
    if len(ints) >= 1 and ints[0] == MAGIC:
        if len(ints) < HEADER_INTS:
            raise DataError(f"shard {path}: truncated header ({size} bytes)")
        if ints[1] != VERSION:
            raise DataError(f"shard {path}: header version {ints[1]}, expected {VERSION}")
        n = int(ints[2])
        expected = HEADER_BYTES + 2 * n
        if n <= 0 or size != expected:
            raise DataError(
                f"shard {path}: header says {n} tokens ({expected} bytes) but the file has "
                f"{size} bytes"
            )
        return Shard(path, "header", HEADER_BYTES, n)
    # A headered shard whose magic is damaged would otherwise pass as raw tokens: its version
    # and token count still match the file size exactly, which raw token data never does.
    if len(ints) == HEADER_INTS and ints[1] == VERSION and size == HEADER_BYTES + 2 * int(ints[2]):
        raise DataError(
            f"shard {path}: bad magic {ints[0]} (expected {MAGIC}); the rest of the header is "
            "that of a modded-nanogpt shard, so the file is corrupt"
        )
    if size == 0:
        raise DataError(f"shard {path}: empty file")
    if size % 2:
        raise DataError(
            f"shard {path}: {size} bytes is not a whole number of uint16 tokens and there is no "
            f"modded-nanogpt header (magic {MAGIC})"
        )
    return Shard(path, "raw", 0, size // 2)


def open_shards(pattern: str, what: str) -> list[Shard]:
    shards = [inspect(p) for p in resolve_glob(pattern, what)]
    formats = {s.fmt for s in shards}
    if len(formats) > 1:
        raw = next(s.path for s in shards if s.fmt == "raw")
        raise DataError(
            f"{what} {pattern}: mixes headered (modded-nanogpt) and raw (nanoGPT) shards, e.g. "
            f"{raw} has no header; a corrupt header is the likely cause"
        )
    return shards


def _sample_starts(n: int) -> list[int]:
    """Where the sampled chunks begin: the start, the end, and N_SAMPLES evenly between."""
    last = max(0, n - SAMPLE_TOKENS)
    return sorted({0, last, *np.linspace(0, last, N_SAMPLES + 2).astype(np.int64).tolist()})


def check_vocab(shard: Shard, vocab_size: int) -> None:
    """Sampled check that tokens fit the vocabulary (the batch sampler checks every batch)."""
    toks = shard.tokens()
    for s in _sample_starts(shard.n_tokens):
        top = int(toks[s : s + SAMPLE_TOKENS].max())
        if top >= vocab_size:
            raise DataError(
                f"shard {shard.path}: token id {top} >= vocab_size {vocab_size} "
                f"(set data.vocab_size, or check the file's format)"
            )


def fingerprint(shards: list[Shard], h: Any) -> None:
    """Feed names, sizes, headers and sampled chunks of the shards into h."""
    for s in shards:
        h.update(f"{s.path.name}|{s.fmt}|{s.n_tokens}|".encode())
        with open(s.path, "rb") as f:
            h.update(f.read(s.offset))
            for start in _sample_starts(s.n_tokens):
                f.seek(s.offset + 2 * start)
                h.update(f.read(2 * SAMPLE_TOKENS))
