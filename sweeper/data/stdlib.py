"""The embedded corpus: the Python standard library's own sources, byte-level.

Every machine that runs sweeper has a Python, so this corpus needs no download and no files of
the user's. It is the `.py` files under `sysconfig.get_paths()["stdlib"]` in sorted order (test
suites, site-packages and the machine-specific `_sysconfigdata*` skipped), capped at CAP_BYTES,
split by file: every k-th file goes to validation (k = round(1 / val_fraction)), so validation
text comes from the same mix of modules as training text but never from a file seen in training.

The built corpus is cached on disk (one file, written atomically) so that each trial, in
whatever worker process, memory-maps it instead of re-reading ~700 files:

    header: b"SWPCORP1" | n_train uint64 | n_val uint64 | fingerprint (16 ascii hex bytes)
    body:   n_train training bytes, then n_val validation bytes
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

CORPUS_VERSION = 1  # bump when the selection or layout changes: old caches are then ignored
CAP_BYTES = 12 * 2**20
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MAGIC = b"SWPCORP1"
HEADER = struct.Struct("<8sQQ16s")


def cache_dir() -> Path:
    """$SWEEPER_CACHE_DIR, else $XDG_CACHE_HOME/sweeper, else ~/.cache/sweeper."""
    if os.environ.get("SWEEPER_CACHE_DIR"):
        return Path(os.environ["SWEEPER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sweeper"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """The corpus's files relative to root, in a stable (posix path) order, before the cap."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped trees.
        dirnames[:] = [
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-"))
        ]
        rel = Path(dirpath).relative_to(root)
        found += [
            rel / f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    return sorted(found, key=lambda p: p.as_posix())


def val_stride(val_fraction: float) -> int:
    return max(2, round(1 / val_fraction))


def build(root: Path, stride: int) -> tuple[bytes, bytes]:
    """(train bytes, validation bytes): sorted files up to CAP_BYTES, every stride-th to val."""
    train, val = [], []
    total = 0
    for i, rel in enumerate(source_files(root)):
        blob = (root / rel).read_bytes()
        if total + len(blob) > CAP_BYTES:
            break  # a prefix of the sorted list: the same files on every run
        total += len(blob)
        (val if i % stride == stride - 1 else train).append(blob)
    return b"".join(train), b"".join(val)


def corpus_fingerprint(train: bytes, val: bytes) -> str:
    h = hashlib.sha256()
    h.update(struct.pack("<QQ", len(train), len(val)))  # the split is part of the data
    h.update(train)
    h.update(val)
    return h.hexdigest()[:16]


def cache_path(root: Path, stride: int) -> Path:
    # The same Python version at another path (a venv's base, a distro build) may carry a
    # patched stdlib, so the path is part of the key; the fingerprint catches the rest.
    version = ".".join(map(str, sys.version_info[:3]))
    key = hashlib.sha256(f"{CORPUS_VERSION}|{root}|{version}|{stride}".encode()).hexdigest()[:12]
    return cache_dir() / f"stdlib-{version}-{key}.bin"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic, n_train, n_val, fp = HEADER.unpack(f.read(HEADER.size))
    except (OSError, struct.error):
        return None
    if magic != MAGIC or size != HEADER.size + n_train + n_val:
        return None  # half-written by an older version or truncated: rebuild
    body = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER.size)
    return body[:n_train], body[n_train:], fp.decode()


def _write_cache(path: Path, train: bytes, val: bytes, fp: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name + rename: concurrent workers building at once never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(MAGIC, len(train), len(val), fp.encode()))
            f.write(train)
            f.write(val)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the corpus is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(val_fraction: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(train uint8 array, val uint8 array, fingerprint), from the disk cache when possible."""
    root = stdlib_root()
    stride = val_stride(val_fraction)
    path = cache_path(root, stride)
    cached = _read_cache(path)
    if cached is not None:
        return cached
    train, val = build(root, stride)
    if not train or not val:
        from sweeper.data.tokens import DataError

        raise DataError(f"corpus stdlib: too few .py files under {root}")
    fp = corpus_fingerprint(train, val)
    try:
        _write_cache(path, train, val, fp)
    except OSError:
        pass  # a read-only home: use the corpus from memory, rebuild next process
    else:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    return np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), fp
