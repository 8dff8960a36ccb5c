"""Corpora, .bin memmaps, prepare, and the sampler."""

import json

import numpy as np
import pytest

from moe_cluster.cli import main as cli_main
from moe_cluster.data import WindowSampler, load_bin, prepare, read_meta, stdlib_corpus
from moe_cluster.data.corpus import SAMPLE_CHUNK_TOKENS, SAMPLE_CHUNKS, stdlib_files


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    train = stdlib_corpus("train", max_bytes=300_000)
    val = stdlib_corpus("val", max_bytes=300_000)
    assert train.dtype == np.uint8 and len(train) == len(val) == 300_000
    assert np.array_equal(train, stdlib_corpus("train", max_bytes=300_000))
    assert not np.array_equal(train[:1000], val[:1000])
    assert len(stdlib_files()) > 100
    with pytest.raises(ValueError, match="split must be"):
        stdlib_corpus("test")


def test_stdlib_corpus_prefix_comes_from_the_cache_and_equals_the_files(tmp_path, monkeypatch):
    from moe_cluster.data.corpus import _cache_path, _read_stdlib

    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(tmp_path))
    for split in ("train", "val"):
        first = stdlib_corpus(split, max_bytes=123_457)  # no cache yet: read, and the full split cached
        assert _cache_path(split).is_file()
        again = stdlib_corpus(split, max_bytes=123_457)  # from the cache
        read = _read_stdlib(split, 123_457)  # the files themselves, up to max_bytes
        assert np.array_equal(first, read) and np.array_equal(again, read)
        assert len(stdlib_corpus(split)) == len(_read_stdlib(split, None))


def test_prepare_and_load_bin(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"hello {i} " * 50 + ("~" if i == 3 else ""))
    meta = prepare(src, tmp_path / "out", val_every=4)
    train = load_bin(tmp_path / "out" / "train.bin", vocab_size=257)
    assert train.dtype == np.uint16 and len(train) == meta["tokens"]["train"]
    assert bytes(train[:7].astype(np.uint8)) == b"hello 1"  # f0 went to validation
    assert meta["documents"] == {"train": 3, "val": 2} and meta["skipped"] == {"hidden": 0, "binary": 0}
    # Bytes: ids 0-255, and 256 ends each document, so the largest id written is the EOD.
    assert (meta["vocab_size"], meta["eos_id"], meta["max_token_id"]) == (257, 256, 256)
    assert train.tolist().count(256) == 3 and train[-1] == 256
    assert read_meta(tmp_path / "out") == json.loads((tmp_path / "out" / "meta.json").read_text())
    with pytest.raises(ValueError, match="model.vocab_size=256; raise model.vocab_size to at least 257"):
        load_bin(tmp_path / "out" / "val.bin", vocab_size=256)


def _write_meta(folder, **meta):
    (folder / "meta.json").write_text(json.dumps(meta))


def test_bin_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_bin(tmp_path / "missing.bin", 256)
    path = tmp_path / "train.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="meta.json is missing"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="uint16")
    with pytest.raises(ValueError, match="meta.json has no vocab_size"):  # not a skipped check
        load_bin(path, 256)
    # A GPT-2 vocabulary whose data uses only ids < 256 fits a 256-row embedding...
    _write_meta(tmp_path, dtype="uint16", vocab_size=50257, max_token_id=255)
    assert len(load_bin(path, 256)) == 10
    # ...one with larger ids does not, and neither does one from before max_token_id was recorded.
    _write_meta(tmp_path, dtype="uint16", vocab_size=50257, max_token_id=300)
    with pytest.raises(ValueError, match="ids up to 300 .*model.vocab_size=256; .* at least 301 or re-tokenise"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="uint16", vocab_size=50257)
    with pytest.raises(ValueError, match="ids up to 50256 .* at least 50257"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="uint16", vocab_size=256, max_token_id=256)
    with pytest.raises(ValueError, match=r"max_token_id must be an integer in \[0, vocab_size=256\)"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="uint32", vocab_size=256)
    path.write_bytes(b"\x00" * 6)  # 6 bytes: not whole uint32 tokens
    with pytest.raises(ValueError, match="not a whole number of uint32 tokens"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="float32", vocab_size=256)
    with pytest.raises(ValueError, match="dtype 'float32'"):
        load_bin(path, 256)
    _write_meta(tmp_path, dtype="uint16", vocab_size=256)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="holds no tokens"):
        load_bin(path, 256)


@pytest.mark.parametrize("where", ["first", "last", "only"])
def test_load_bin_catches_data_that_exceeds_its_meta(tmp_path, where):
    # A file larger than the sample (so only evenly spaced chunks are read), or one smaller.
    n = 3 * SAMPLE_CHUNKS * SAMPLE_CHUNK_TOKENS if where != "only" else 1000
    tokens = np.full(n, 7, dtype=np.uint16)
    tokens[{"first": 0, "last": n - 1, "only": 500}[where]] = 200
    tokens.tofile(tmp_path / "train.bin")
    _write_meta(tmp_path, dtype="uint16", vocab_size=256, max_token_id=100)
    with pytest.raises(ValueError, match="train.bin holds token id 200 .* says the largest id is 100.* re-run"):
        load_bin(tmp_path / "train.bin", 256)
    _write_meta(tmp_path, dtype="uint16", vocab_size=256, max_token_id=200)
    assert load_bin(tmp_path / "train.bin", 256)[-1] in (7, 200)


def test_read_meta(tmp_path):
    with pytest.raises(ValueError, match="data folder .*nothing does not exist; .*moe-cluster prepare"):
        read_meta(tmp_path / "nothing")
    for name in ("train.bin", "val.bin"):
        with pytest.raises(ValueError, match=f"{name} is missing; .*moe-cluster prepare"):
            read_meta(tmp_path)
        np.zeros(4, dtype=np.uint16).tofile(tmp_path / name)
    with pytest.raises(ValueError, match="meta.json is missing"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json cannot be read"):
        read_meta(tmp_path)
    _write_meta(tmp_path, dtype="uint16", vocab_size=0)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1, got 0"):
        read_meta(tmp_path)
    _write_meta(tmp_path, dtype="uint16", max_token_id=3)
    with pytest.raises(ValueError, match="meta.json has no vocab_size.*moe-cluster prepare"):
        read_meta(tmp_path)
    _write_meta(tmp_path, dtype="uint16", vocab_size=100_000, max_token_id=70_000)
    with pytest.raises(ValueError, match="max_token_id=70000 does not fit in uint16"):
        read_meta(tmp_path)
    _write_meta(tmp_path, dtype="uint16", vocab_size=50257)  # written before max_token_id existed
    assert read_meta(tmp_path)["max_token_id"] == 50256


def test_prepare_skips_hidden_and_binary_files(tmp_path, capsys):
    src = tmp_path / "src"
    for name, data in {
        "a.txt": b"alpha " * 20, "b.py": b"beta = 2\n" * 20, "sub/c.md": b"gamma " * 20,
        ".env": b"SECRET=hidden", ".git/config": b"[core]", "sub/.cache/x.txt": b"cached",
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "late.bin": b"x" * 9000 + b"\x00",
    }.items():  # fmt: skip
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    meta = prepare(src, tmp_path / "out", val_every=3)
    # late.bin's NUL is past the first 8 KiB: it counts as text, as it would for git.
    assert meta["skipped"] == {"hidden": 3, "binary": 1} and meta["documents"] == {"train": 2, "val": 2}
    ids = np.concatenate([load_bin(tmp_path / "out" / f"{s}.bin", 257) for s in ("train", "val")])
    text = bytes(ids[ids != 256].astype(np.uint8))
    assert b"alpha" in text and b"gamma" in text
    assert not any(secret in text for secret in (b"SECRET", b"[core]", b"cached", b"PNG"))
    assert cli_main(["prepare", str(src), str(tmp_path / "out2"), "--val-every", "3"]) == 0
    assert "skipped 3 hidden and 1 binary files" in capsys.readouterr().out


def test_prepare_refuses_a_corpus_too_small_to_split(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "only.txt").write_text("the one text file")
    (src / ".hidden.txt").write_text("not used")
    (src / "blob").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"holds 1 document\(s\) in 1 file\(s\) \(skipped 1 hidden and 1 binary\)"):
        prepare(src, out)
    assert not out.exists()  # nothing written, and no split that reuses text
    (src / "two.txt").write_text("a second one")
    with pytest.raises(ValueError, match="--val-every must be >= 2"):
        prepare(src, out, val_every=1)
    assert cli_main(["prepare", str(src), str(out), "--val-every", "1"]) == 2
    assert "--val-every must be >= 2" in capsys.readouterr().err
    assert not out.exists()
    meta = prepare(src, out, val_every=2)
    assert meta["documents"] == {"train": 1, "val": 1}
    val, train = load_bin(out / "val.bin", 257), load_bin(out / "train.bin", 257)
    assert val.tolist() == [*b"the one text file", 256] and train.tolist() == [*b"a second one", 256]  # "only" < "two"


@pytest.mark.parametrize("num_windows", [96, 100])
def test_sampler_covers_an_epoch_once_across_ranks(num_windows):
    # 96 windows: exactly 12 global batches of 8, nothing dropped; 100: 12 batches, a tail of 4.
    tokens = np.arange(num_windows * 10 + 1, dtype=np.int64)
    seq, batch = 10, 8
    steps = {}  # world size -> the global batches of two epochs, ranks' shares in rank order
    for world in (1, 2, 4):
        samplers = [WindowSampler(tokens, seq, batch, r, world, seed=7) for r in range(world)]
        steps[world] = [[int(i) for s in samplers for i in s.next_indices()] for _ in range(24)]
        assert [s.epoch for s in samplers] == [1] * world, "24 global batches are 2 epochs of 12"
        assert [len(b) for b in steps[world]] == [batch] * 24
        for epoch in (steps[world][:12], steps[world][12:]):
            seen = [i for b in epoch for i in b]
            assert len(seen) == len(set(seen)) == 96 and set(seen) <= set(range(num_windows))
            if num_windows == 96:
                assert sorted(seen) == list(range(96))  # every window once: nothing skipped
        assert steps[world][:12] != steps[world][12:]  # a new order each epoch
    # Each rank reads its contiguous share of the same global batch, whatever the world size.
    assert steps[2] == steps[1] and steps[4] == steps[1]
    # Over epochs the tail moves: every window is visited.
    one = WindowSampler(tokens, seq, batch, 0, 1, seed=7)
    assert {int(i) for _ in range(12 * 10) for i in one.next_indices()} == set(range(num_windows))
    rows = WindowSampler(tokens, seq, batch, 1, 2, seed=7).next_batch()[0]  # window i is tokens 10i..10i+9
    assert rows[:, 0].tolist() == [10 * i for i in steps[1][0][4:]]


def test_sampler_resumes():
    tokens = np.arange(1001, dtype=np.int64)
    seq, batch = 10, 8
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
