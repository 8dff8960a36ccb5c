"""Corpora, .bin memmaps, prepare, and the sampler."""

import json

import numpy as np
import pytest

from moe_cluster.data import WindowSampler, load_bin, prepare, stdlib_corpus
from moe_cluster.data.corpus import stdlib_files


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    train = stdlib_corpus("train", max_bytes=300_000)
    val = stdlib_corpus("val", max_bytes=300_000)
    assert train.dtype == np.uint8 and len(train) == len(val) == 300_000
    assert np.array_equal(train, stdlib_corpus("train", max_bytes=300_000))
    assert not np.array_equal(train[:1000], val[:1000])
    assert len(stdlib_files()) > 100
    with pytest.raises(ValueError, match="split must be"):
        stdlib_corpus("test")


def test_prepare_and_load_bin(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"hello {i} " * 50)
    meta = prepare(src, tmp_path / "out", val_every=4)
    train = load_bin(tmp_path / "out" / "train.bin", vocab_size=256)
    assert train.dtype == np.uint16 and len(train) == meta["tokens"]["train"]
    assert bytes(train[:7].astype(np.uint8)) == b"hello 1"  # f0 went to validation


def test_bin_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_bin(tmp_path / "missing.bin", 256)
    path = tmp_path / "train.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="meta.json is missing"):
        load_bin(path, 256)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 256}))
    path.write_bytes(b"\x00" * 6)  # 6 bytes: not whole uint32 tokens
    with pytest.raises(ValueError, match="not a whole number of uint32 tokens"):
        load_bin(path, 256)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50257}))
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        load_bin(path, 256)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "float32", "vocab_size": 256}))
    with pytest.raises(ValueError, match="dtype 'float32'"):
        load_bin(path, 256)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 256}))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="holds no tokens"):
        load_bin(path, 256)


def test_sampler_covers_an_epoch_once_across_ranks_and_resumes():
    tokens = np.arange(1001, dtype=np.int64)
    seq, batch = 10, 8  # 100 windows: 12 full global batches per epoch, 4 windows dropped
    for world in (1, 2, 4):
        samplers = [WindowSampler(tokens, seq, batch, r, world, seed=7) for r in range(world)]
        seen = [int(i) for _ in range(12) for s in samplers for i in s.next_indices()]
        assert len(seen) == len(set(seen)) == 96  # nothing repeated, nothing skipped but the tail
        if world == 1:
            epoch0 = seen
        assert sorted(seen) == sorted(epoch0)  # the same windows whatever the world size
        nxt = [s.next_indices() for s in samplers]  # first batch of epoch 1
        assert all(s.epoch == 1 for s in samplers)

    a = WindowSampler(tokens, seq, batch, 0, 1, seed=7)
    for _ in range(5):
        a.next_batch()
    b = WindowSampler(tokens, seq, batch, 0, 1, seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(10):  # across the epoch boundary too
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    x, y = a.next_batch()
    assert x.shape == (8, 10) and np.array_equal(x[:, 1:], y[:, :-1])


def test_sampler_errors():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        WindowSampler(np.zeros(50), seq_len=10, global_batch=8, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="not divisible by the 3 workers"):
        WindowSampler(np.zeros(5000), seq_len=10, global_batch=8, rank=0, world_size=3, seed=0)
