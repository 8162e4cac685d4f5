"""Token arrays: what a data source hands to the batch sampler.

A source yields 1-D arrays of token ids: a numpy array or memmap (uint8 for bytes, uint16 for
shards), or, when the tokens live in several shard files, a `ConcatTokens` that stitches the
memmaps together without reading them. Both support `len()` and `tokens[a:b]` (a numpy copy of
that window), which is all the sampler needs.
"""

from __future__ import annotations

import bisect

import numpy as np


class DataError(ValueError):
    """Data that cannot be used: a missing or corrupt file, tokens outside the vocabulary, ...

    The message names the file (or glob) at fault.
    """


class ConcatTokens:
    """Several 1-D token arrays read as one, without copying them (memmaps stay on disk)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p) > 0]
        if not self.parts:
            raise ValueError("ConcatTokens needs at least one non-empty part")
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ConcatTokens supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        pieces = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            lo = start - self.starts[i]
            hi = min(stop, self.starts[i + 1]) - self.starts[i]
            pieces.append(np.asarray(self.parts[i][lo:hi]))
            start = self.starts[i] + hi
            i += 1
        return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)

    def __repr__(self) -> str:
        return f"ConcatTokens({len(self.parts)} parts, {len(self)} tokens)"


TokenArray = np.ndarray | ConcatTokens


def split_tail(parts: list[np.ndarray], n_tail: int) -> tuple[TokenArray, TokenArray]:
    """(head, tail) of the concatenation of `parts`, the tail holding the last n_tail tokens."""
    total = sum(len(p) for p in parts)
    cut = total - n_tail
    head: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    pos = 0
    for p in parts:
        lo, hi = pos, pos + len(p)
        if hi <= cut:
            head.append(p)
        elif lo >= cut:
            tail.append(p)
        else:  # slicing a memmap is a view: nothing is read
            head.append(p[: cut - lo])
            tail.append(p[cut - lo :])
        pos = hi
    return as_tokens(head), as_tokens(tail)


def as_tokens(parts: list[np.ndarray]) -> TokenArray:
    """One array when there is one part (the common case), else a ConcatTokens."""
    parts = [p for p in parts if len(p) > 0]
    if len(parts) == 1:
        return parts[0]
    return ConcatTokens(parts)
