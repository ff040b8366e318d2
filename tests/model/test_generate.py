"""KV-cache generation equals transformers' greedy generate, token for token."""

import pytest
import torch
from transformers import Exaone4_5_ForConditionalGeneration

from model.generate import generate
from model.text import KVCache

from .conftest import image_prompt


def _hf_greedy(hf, ids, n, **kw):
    out = hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, **kw)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_equals_transformers_text(hf_pair):
    hf, ours, _ = hf_pair
    ids = torch.randint(80, hf.config.text_config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    # 40 new tokens run far past the sliding windows (8 and 5), so the trimmed cache is exercised.
    assert generate(ours, [ids[0].tolist()], max_new_tokens=40).tokens[0] == _hf_greedy(hf, ids, 40)


def test_greedy_equals_transformers_image(hf_pair):
    hf, ours, _ = hf_pair
    ids, pixels, grid = image_prompt(hf.config.text_config.vocab_size, seed=7, text_len=6)
    ref = _hf_greedy(hf, ids, 30, pixel_values=pixels, image_grid_thw=grid)
    got = generate(ours, [ids[0].tolist()], pixel_values=pixels, image_grid_thw=grid, max_new_tokens=30)
    assert got.tokens[0] == ref


def test_batched_left_padded_equals_one_by_one(hf_pair):
    _, ours, _ = hf_pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(80, 250, (n,), generator=g).tolist() for n in (4, 15, 9)]
    batched = generate(ours, prompts, max_new_tokens=25)
    for p, toks in zip(prompts, batched.tokens):
        assert generate(ours, [p], max_new_tokens=25).tokens[0] == toks


def test_stop_token_and_sampling_reproducible(hf_pair):
    _, ours, _ = hf_pair
    p = [list(range(90, 100))]
    first = generate(ours, p, max_new_tokens=30).tokens[0]
    stop = first[4]
    cut = generate(ours, p, max_new_tokens=30, stop_ids=[stop])
    assert cut.tokens[0] == first[: first.index(stop) + 1] and cut.finished == [True]
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, presence_penalty=1.5)
    a = generate(ours, p, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(ours, p, generator=torch.Generator().manual_seed(0), **kw)
    assert a.tokens == b.tokens and len(a.logprobs[0]) == len(a.tokens[0])
    assert all(lp <= 0 for lp in a.logprobs[0])


def test_sliding_cache_keeps_only_the_window():
    """Allocated once: the sliding layer's ring holds its window (the token and the window - 1 before
    it), the global layer's slab every token; both attend exactly to what the mask allows."""
    cache = KVCache(capacity=10, step=1)
    window = 4
    keys = []
    for step in range(10):
        cache.slots = torch.tensor([[step]])
        cache.valid = torch.ones(1, 1, dtype=torch.bool)
        k = torch.randn(1, 1, 1, 2)
        keys.append(k)
        ring_k, _, spec = cache.update(0, k, k, window)
        seen = spec.dense(window)[0, 0, 0]  # what this step's query may attend to
        assert ring_k.shape[2] == (1 if step == 0 else window) and int(seen.sum()) == min(step + 1, window)
        attended = ring_k[0, 0][seen]
        expected = torch.cat(keys[max(0, step - window + 1):], dim=2)[0, 0]
        assert sorted(map(tuple, attended.tolist())) == sorted(map(tuple, expected.tolist()))
        slab_k, _, _ = cache.update(1, k, k, None)
        assert slab_k.shape[2] == step + 1 and torch.equal(slab_k, torch.cat(keys, dim=2))
    assert cache.layers[0]["k"].shape[2] == window and cache.layers[1]["k"].shape[2] == 10
    with pytest.raises(ValueError, match="capacity"):
        cache.update(1, k, k, None)  # an 11th token in a slab of 10


def test_mtp_speculative_decoding_equals_greedy():
    """The MTP head drafts one token per trunk step; the output equals plain greedy decoding. A model
    trained on a repeating pattern (so its MTP head learns it too) has most drafts accepted, which
    exercises the accept path; an untrained one has them rejected, which exercises the cache rollback."""
    from model.config import preset
    from model.generate import generate_speculative
    from model.vlm import build_model

    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.text_config.sliding_window = 6  # far shorter than the output: exercises the window trimming
    cfg.mtp_loss_weight = 1.0
    model = build_model(cfg)
    prompt = list(range(100, 112))
    untrained, rate = generate_speculative(model.eval(), prompt, max_new_tokens=30)
    assert untrained == generate(model, [prompt], max_new_tokens=30).tokens[0]

    cycle = torch.tensor([100 + (i * 7) % 13 for i in range(96)])[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        model(cycle, labels=cycle).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = cycle[0, :20].tolist()
    ref = generate(model, [prompt], max_new_tokens=40).tokens[0]
    got, rate = generate_speculative(model, prompt, max_new_tokens=40)
    assert got == ref
    assert rate > 0.5, rate
    stop = ref[9]
    got, _ = generate_speculative(model, prompt, max_new_tokens=40, stop_ids=[stop])
    assert got == ref[: ref.index(stop) + 1]
