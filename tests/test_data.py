"""Data sources: shard formats and their errors, text files, the stdlib corpus, batch order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sweeper.data import (
    ConcatTokens,
    DataError,
    check_length,
    fingerprint,
    load_data,
    train_batches,
    val_batches,
)
from sweeper.data import stdlib as stdlib_corpus
from sweeper.data.shards import HEADER_INTS, MAGIC
from sweeper.spec import DataConfig

torch.set_num_threads(1)


def write_raw(path, tokens) -> None:
    np.asarray(tokens, dtype="<u2").tofile(path)


def write_headered(path, tokens, magic=MAGIC, version=1, count=None) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def tokens(n, seed=0, vocab=1000):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("writer", [write_raw, write_headered])
def test_shards_in_either_format_load_the_same_tokens(tmp_path, writer):
    a, b = tokens(3000, 1), tokens(2000, 2)
    writer(tmp_path / "s_000.bin", a)
    writer(tmp_path / "s_001.bin", b)
    data = load_data(DataConfig(shards=str(tmp_path / "s_*.bin"), val_fraction=0.1))
    everything = np.concatenate([a, b])
    assert data.vocab_size == 50304
    assert len(data.train) == 4500 and len(data.val) == 500  # the tail is held out
    assert np.array_equal(data.train[0 : len(data.train)], everything[:4500])
    assert np.array_equal(data.val[0:500], everything[4500:])


def test_both_formats_have_the_same_content_but_different_fingerprints(tmp_path):
    t = tokens(4000)
    (tmp_path / "raw").mkdir()
    (tmp_path / "hdr").mkdir()
    write_raw(tmp_path / "raw" / "x.bin", t)
    write_headered(tmp_path / "hdr" / "x.bin", t)
    raw = load_data(DataConfig(shards=str(tmp_path / "raw" / "*.bin")))
    hdr = load_data(DataConfig(shards=str(tmp_path / "hdr" / "*.bin")))
    assert np.array_equal(raw.train[0:100], hdr.train[0:100])
    assert raw.fingerprint != hdr.fingerprint  # the header is part of what is hashed


def test_val_shards(tmp_path):
    write_headered(tmp_path / "fineweb_train_000001.bin", tokens(5000, 1))
    write_headered(tmp_path / "fineweb_val_000000.bin", tokens(700, 2))
    cfg = DataConfig(
        shards=str(tmp_path / "fineweb_train_*.bin"),
        val_shards=str(tmp_path / "fineweb_val_*.bin"),
    )
    data = load_data(cfg)
    assert len(data.train) == 5000 and len(data.val) == 700
    assert np.array_equal(data.val[0:700], tokens(700, 2))
    overlapping = DataConfig(
        shards=str(tmp_path / "fineweb_*.bin"), val_shards=str(tmp_path / "fineweb_val_*.bin")
    )
    with pytest.raises(DataError, match="share files"):
        load_data(overlapping)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (dict(magic=20240521), "bad magic"),
        (dict(version=2), "version 2"),
        (dict(count=999), "header says 999 tokens"),
    ],
)
def test_a_corrupt_header_names_the_file(tmp_path, corrupt, message):
    path = tmp_path / "fineweb_train_000002.bin"
    write_headered(tmp_path / "fineweb_train_000001.bin", tokens(1000))
    write_headered(path, tokens(1000), **corrupt)
    with pytest.raises(DataError, match=message) as err:
        load_data(DataConfig(shards=str(tmp_path / "*.bin")))
    assert str(path) in str(err.value)


def test_truncated_shard_and_odd_raw_size(tmp_path):
    path = tmp_path / "a.bin"
    write_headered(path, tokens(1000))
    with open(path, "r+b") as f:
        f.truncate(1024 + 1500)
    with pytest.raises(DataError, match="header says 1000 tokens") as err:
        load_data(DataConfig(shards=str(path)))
    assert str(path) in str(err.value)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="whole number of uint16") as err:
        load_data(DataConfig(shards=str(odd)))
    assert str(odd) in str(err.value)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(DataConfig(shards=str(tmp_path / "nope.bin")))
    with pytest.raises(DataError, match="matches no files"):
        load_data(DataConfig(shards=str(tmp_path / "*.bin")))
    with pytest.raises(DataError, match="no such file"):
        fingerprint(DataConfig(text=str(tmp_path / "nope.txt")))


def test_tokens_outside_the_vocabulary(tmp_path):
    t = tokens(5000, vocab=300)
    write_raw(tmp_path / "a.bin", t)
    with pytest.raises(DataError, match=r"token id \d+ >= vocab_size 256") as err:
        load_data(DataConfig(shards=str(tmp_path / "a.bin"), vocab_size=256))
    assert "a.bin" in str(err.value)
    assert load_data(DataConfig(shards=str(tmp_path / "a.bin"), vocab_size=300)).vocab_size == 300


def test_mixed_formats_in_one_glob(tmp_path):
    write_headered(tmp_path / "a.bin", tokens(1000))
    write_raw(tmp_path / "b.bin", tokens(1000))
    with pytest.raises(DataError, match="mixes headered"):
        load_data(DataConfig(shards=str(tmp_path / "*.bin")))


def test_concat_tokens_slices_across_parts():
    parts = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 20)]
    c = ConcatTokens(parts)
    assert len(c) == 20
    for a, b in [(0, 20), (3, 9), (5, 8), (7, 8), (4, 17), (19, 20)]:
        assert np.array_equal(c[a:b], np.arange(a, b))


def test_multi_shard_batches_cross_file_boundaries(tmp_path):
    write_raw(tmp_path / "a.bin", np.arange(0, 100))
    write_raw(tmp_path / "b.bin", np.arange(100, 200))
    data = load_data(DataConfig(shards=str(tmp_path / "*.bin"), vocab_size=256, val_fraction=0.2))
    assert isinstance(data.train, ConcatTokens)
    for x, y in [next(train_batches(data, 64, 16, seed=s)) for s in range(3)]:
        # Every window is consecutive ids, whichever file(s) it came from.
        assert torch.equal(x[:, 1:], x[:, :-1] + 1) and torch.equal(y, x + 1)
    assert data.val[0:40].tolist() == list(range(160, 200))


# --------------------------------------------------------------------------- text


def test_text_file_is_byte_level_with_the_tail_held_out(tmp_path):
    path = tmp_path / "book.txt"
    text = ("the quick brown fox jumps over the lazy dog. " * 200).encode()
    path.write_bytes(text)
    data = load_data(DataConfig(text=str(path), val_fraction=0.1))
    n_val = int(len(text) * 0.1)
    assert data.vocab_size == 256
    assert bytes(data.val[0:n_val]) == text[-n_val:]
    assert bytes(data.train[0 : len(data.train)]) == text[:-n_val]
    fp = fingerprint(DataConfig(text=str(path), val_fraction=0.1))
    path.write_bytes(text[:-5] + b"cats.")  # same size, new bytes
    os.utime(path, ns=(1, 1))  # and a different mtime: the per-process cache notices
    assert fingerprint(DataConfig(text=str(path), val_fraction=0.1)) != fp


def test_text_too_small(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abc")
    with pytest.raises(DataError, match="too small"):
        load_data(DataConfig(text=str(path)))


# --------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_is_python_source_and_its_fingerprint_is_stable(tmp_path, monkeypatch):
    cfg = DataConfig(corpus="stdlib")
    data = load_data(cfg)
    assert data.vocab_size == 256
    assert 4e6 < len(data.train) + len(data.val) <= stdlib_corpus.CAP_BYTES
    assert 0.02 < len(data.val) / len(data.train) < 0.1
    assert b"def " in bytes(data.train[0:200_000])
    fp = fingerprint(cfg)
    assert fp == data.fingerprint and len(fp) == 16
    # Built again from scratch into an empty cache (as a fresh worker machine would): the same.
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path))
    train, val, fp2 = stdlib_corpus.load(cfg.val_fraction)
    assert fp2 == fp
    assert list(tmp_path.glob("stdlib-*.bin"))  # cached for the next process
    assert stdlib_corpus.load(cfg.val_fraction)[2] == fp  # read back from the cache
    assert np.array_equal(train[:1000], data.train[:1000])


def test_stdlib_split_is_by_file_and_follows_val_fraction():
    a = load_data(DataConfig(corpus="stdlib"))
    b = load_data(DataConfig(corpus="stdlib", val_fraction=0.1))
    assert len(b.val) > 1.5 * len(a.val)
    assert a.fingerprint != b.fingerprint


# --------------------------------------------------------------------------- batches


def test_batch_order_depends_on_the_seed_only():
    data = load_data(DataConfig(corpus="stdlib"))
    first = [next(train_batches(data, 4, 32, seed=7)) for _ in range(2)]
    again = train_batches(data, 4, 32, seed=7)
    other = train_batches(data, 4, 32, seed=8)
    x0, y0 = next(again)
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][0], x0)
    assert x0.dtype == torch.int64 and x0.shape == (4, 32)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # y is x shifted by one
    assert not torch.equal(next(other)[0], x0)
    assert not torch.equal(next(again)[0], x0)  # the stream moves on


def test_validation_set_is_fixed():
    data = load_data(DataConfig(corpus="stdlib"))
    a = val_batches(data, 8, 64, n=3)
    b = val_batches(data, 8, 64, n=3)
    assert len(a) == 3 and a[0][0].shape == (8, 64)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Spread over the whole split: the first window starts at 0, the last ends at its end.
    assert bytes(a[0][0][0].numpy().astype(np.uint8)) == bytes(data.val[0:64])
    assert a[-1][1][-1, -1] == int(data.val[len(data.val) - 1 : len(data.val)][0])


def test_too_short_for_the_sequence(tmp_path):
    write_raw(tmp_path / "a.bin", tokens(200))
    data = load_data(DataConfig(shards=str(tmp_path / "a.bin"), val_fraction=0.1))
    with pytest.raises(DataError, match="fewer than seq_len"):
        val_batches(data, 2, 64, 1)
    with pytest.raises(DataError, match="fewer than seq_len"):
        train_batches(data, 2, 500, 0)


# --------------------------------------------------------------------------- check_length


def test_check_length_refuses_a_text_file_too_short_for_a_sequence(tmp_path):
    # Such a file used to fail every trial at run time; plan() can now refuse it up front.
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * 100)  # 95 training bytes, 5 held out at val_fraction 0.05
    cfg = DataConfig(text=str(path))
    with pytest.raises(DataError) as err:
        check_length(cfg, seq_len=128)
    assert str(err.value) == (
        f"text:{path}: the training split has 95 tokens, fewer than seq_len + 1 = 129; "
        "use more data or a smaller model.seq_len"
    )
    with pytest.raises(
        DataError, match=r"the validation split has 5 tokens, .* = 9; .*val_fraction"
    ):
        check_length(cfg, seq_len=8)
    check_length(cfg, seq_len=4)  # 5 tokens: one window of 4 and its targets


def test_check_length_with_validation_shards(tmp_path):
    write_raw(tmp_path / "train.bin", tokens(1000))
    write_raw(tmp_path / "val.bin", tokens(50))
    cfg = DataConfig(shards=str(tmp_path / "train.bin"), val_shards=str(tmp_path / "val.bin"))
    check_length(cfg, seq_len=49)
    with pytest.raises(DataError, match=r"val:.*val.bin: the validation split has 50 tokens"):
        check_length(cfg, seq_len=50)
    with pytest.raises(DataError, match=r"training split has 1000 tokens"):
        check_length(cfg, seq_len=1000)


def test_check_length_agrees_with_the_batch_samplers(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(32, 127)) * 20)  # 1900 bytes: 1805 train, 95 validation
    cfg = DataConfig(text=str(path))
    data = load_data(cfg)
    check_length(cfg, seq_len=94)  # accepted: both samplers work
    next(train_batches(data, 2, 94, seed=0))
    val_batches(data, 2, 94, n=1)
    with pytest.raises(DataError):
        check_length(cfg, seq_len=95)
    with pytest.raises(DataError):
        val_batches(data, 2, 95, n=1)


def test_check_length_of_the_stdlib_corpus():
    check_length(DataConfig(corpus="stdlib"), seq_len=4096)
