"""The mixture sampler: shares follow the weights, the same for every rank layout, resumable."""

import json

import numpy as np
import pytest

from moe_cluster.data import MixtureSampler, MixtureSource, WindowSampler, prepare, read_mixture
from tests.data.helpers import documents, train_bpe, write_jsonl

SEQ = 8


def _streams(sizes=(4001, 2501, 1601)):
    """Token streams whose window i of source k starts with 100_000 * k + i * SEQ: a window names itself."""
    return [np.arange(n, dtype=np.int64) + 100_000 * k for k, n in enumerate(sizes)]


def _source_of(row) -> int:
    return int(row[0]) // 100_000


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2)])
def test_weights_hold_over_1000_windows(weights):
    streams = _streams()[: len(weights)]
    sampler = MixtureSampler(streams, weights, SEQ, global_batch=8, rank=0, world_size=1, seed=3)
    counts = np.zeros(len(weights))
    for step in range(125):  # 1,000 windows
        inputs, targets = sampler.next_batch()
        assert inputs.shape == (8, SEQ) and np.array_equal(inputs[:, 1:], targets[:, :-1])
        for row in inputs:
            counts[_source_of(row)] += 1
        # Not only at the end: each source stays within one window of its share at every step.
        assert np.all(np.abs(counts - np.array(weights) * 8 * (step + 1)) < 1 + 1e-9), (step, counts)
    assert np.all(np.abs(counts / 1000 - np.array(weights)) < 0.02)


def test_each_source_is_read_in_a_seeded_order_epoch_after_epoch():
    streams = _streams((81, 4001))  # source 0: 10 windows, so it wraps into new epochs
    sampler = MixtureSampler(streams, [1, 1], SEQ, global_batch=10, rank=0, world_size=1, seed=0)
    seen = [int(row[0]) // SEQ for _ in range(6) for row in sampler.next_batch()[0] if _source_of(row) == 0]
    assert len(seen) == 30 and sampler.state_dict()["source_epochs"][0] == 3
    epochs = [seen[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every window once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    other = MixtureSampler(streams, [1, 1], SEQ, global_batch=10, rank=0, world_size=1, seed=1)
    assert [int(r[0]) for r in other.next_batch()[0]] != [int(r[0]) for r in MixtureSampler(
        streams, [1, 1], SEQ, global_batch=10, rank=0, world_size=1, seed=0).next_batch()[0]]  # fmt: skip


def test_every_rank_layout_reads_the_same_global_batches():
    streams, weights = _streams(), (0.5, 0.3, 0.2)
    batches = {}
    for world in (1, 2, 4):
        samplers = [MixtureSampler(streams, weights, SEQ, 8, r, world, seed=5) for r in range(world)]
        batches[world] = [np.concatenate([s.next_batch()[0].numpy() for s in samplers]) for _ in range(20)]
    for world in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(batches[1], batches[world]))


def test_a_resumed_sampler_continues_bit_identically():
    streams, weights = _streams(), (0.6, 0.25, 0.15)
    a = MixtureSampler(streams, weights, SEQ, 8, 1, 2, seed=9)
    for _ in range(200):  # past the smallest source's first epoch (200 windows)
        a.next_batch()
    state = a.state_dict()
    # A small dict of ints and short lists: what a checkpoint's `extra` carries (and JSON can hold).
    assert set(state) == {"step", "source_epochs", "source_positions"} and json.loads(json.dumps(state)) == state
    assert state["step"] == 200 and state["source_epochs"][2] >= 1
    b = MixtureSampler(streams, weights, SEQ, 8, 1, 2, seed=9)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(100):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_sampler_errors():
    streams = _streams((4001, 5))
    with pytest.raises(ValueError, match=r"data.mixture\[1\] holds 5 tokens .*less than one window"):
        MixtureSampler(streams, [1, 1], SEQ, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="weights must be numbers > 0"):
        MixtureSampler(_streams(), [1, 0, 1], SEQ, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="one weight per stream"):
        MixtureSampler(_streams(), [1, 1], SEQ, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="not divisible by the 3 workers"):
        MixtureSampler(_streams(), [1, 1, 1], SEQ, 8, 0, 3, seed=0)
    mixture = MixtureSampler(_streams(), [1, 1, 1], SEQ, 8, 0, 1, seed=0)
    single = WindowSampler(_streams()[0], SEQ, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="a single corpus's, but this run reads data.mixture"):
        mixture.load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match="a data.mixture's, but this run reads one corpus"):
        single.load_state_dict(mixture.state_dict())
    with pytest.raises(ValueError, match="has 3 mixture sources, data.mixture has 2"):
        MixtureSampler(_streams()[:2], [1, 1], SEQ, 8, 0, 1, seed=0).load_state_dict(mixture.state_dict())


def test_read_mixture_checks_weights_folders_and_tokenizers(tmp_path):
    docs = documents(40)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    write_jsonl(tmp_path / "b.jsonl", docs[20:])
    bpe = train_bpe(tmp_path / "bpe", docs)
    for name, tok in (("a", bpe), ("b", bpe), ("a-bytes", "bytes")):
        prepare(tmp_path / f"{name[0]}.jsonl", tmp_path / name, tokenizer=str(tok), val_every=4)
    merged = read_mixture([MixtureSource(str(tmp_path / "a"), 0.7), MixtureSource(str(tmp_path / "b"), 0.3)])
    assert merged["vocab_size"] == 500 and merged["tokenizer"]["path"] == str(bpe)
    with pytest.raises(ValueError, match=r"data.mixture\[1\].weight must be a number > 0, got 0"):
        read_mixture([MixtureSource(str(tmp_path / "a")), MixtureSource(str(tmp_path / "b"), 0)])
    with pytest.raises(ValueError, match=r"data folder .*missing does not exist"):
        read_mixture([MixtureSource(str(tmp_path / "a")), MixtureSource(str(tmp_path / "missing"))])
    mixed = r"mixes tokenizers: .*/a was prepared with bpe .*sha256 \w+\) but .*a-bytes with 'bytes'"
    with pytest.raises(ValueError, match=mixed):
        read_mixture([MixtureSource(str(tmp_path / "a")), MixtureSource(str(tmp_path / "a-bytes"))])
