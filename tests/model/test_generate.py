"""KV-cache decoding equals the full causal forward; sampling is seeded."""

import pytest
import torch

from moe_cluster.model import ModelConfig, MoEConfig, Transformer
from moe_cluster.model.generate import KVCache, generate


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=24, dense_hidden_dim=48,
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=24, backend="torch"), **kw,
    )  # fmt: skip
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_forward_equals_the_full_forward(kv_heads):
    model = tiny(n_kv_heads=kv_heads)
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, batch=2)
        # A prefill, one token at a time, then a chunk after cached positions (the shifted mask).
        pieces = [model(tokens[:, :7], cache=cache)]
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(7, 12)]
        pieces.append(model(tokens[:, 12:], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_argmax_of_the_full_forward():
    model = tiny(n_kv_heads=2)
    prompt = [3, 17, 5, 9]
    got = generate(model, prompt, 12, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_sampling_is_seeded_and_stops_at_the_stop_id():
    model = tiny()

    def draw(seed):
        return generate(model, [1, 2], 16, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(seed))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert generate(model, [1, 2], 16, temperature=5.0, top_k=1) == generate(model, [1, 2], 16)  # top-1 is greedy
    first = generate(model, [1, 2], 16)[0]
    streamed = []
    assert generate(model, [1, 2], 16, stop_id=first, on_token=streamed.append) == [first] == streamed


def test_length_past_max_seq_len_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"20 prompt tokens \+ 5 new ones exceed model.max_seq_len=24"):
        generate(model, list(range(20)), 5)
    with pytest.raises(ValueError, match="sequence length 25 exceeds model.max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
