"""vLLM's rollouts against our model: greedy tokens, the log-probs of the sampling distribution
(before and after weight updates), n completions, stop tokens, seeds. One engine for the module."""

import os
import signal

import pytest
import torch

from model.generate import _filter_logits, generate
from rl.vllm_engine import EngineError, _mapped_shm

pytestmark = pytest.mark.timeout(300)

G = torch.Generator().manual_seed(1)
# 90 and 300 tokens run past the window (64), so the sliding layers' masking is exercised in prefill
# and decode; 300 spans two full KV blocks (128 tokens on CPU), so vLLM's prefix cache serves repeats.
PROMPTS = [torch.randint(80, 4000, (n,), generator=G).tolist() for n in (5, 30, 90, 300)]


@torch.no_grad()
def recomputed(model, prompt, completion, temperature=1.0, top_k=0, top_p=1.0, presence_penalty=0.0):
    """log-probs of `completion` under `model`, from one full forward of prompt + completion (no
    KV cache), through the same processing as `model.generate.generate` samples with."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for t, tok in enumerate(completion[:-1]):
        seen[t + 1 :, tok] = True
    logits = logits - presence_penalty * seen
    if temperature > 0:
        logits = _filter_logits(logits / temperature, top_k, top_p)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def max_logprob_error(model, prompts, outs, **sampling) -> float:
    worst = 0.0
    for prompt, row in zip(prompts, outs):
        for tokens, logprobs, _ in row:
            ref = recomputed(model, prompt, tokens, **sampling)
            worst = max(worst, (torch.tensor(logprobs) - ref).abs().max().item())
    return worst


def assert_greedy_matches(engine, model):
    outs = engine.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=40)
    ref = generate(model, PROMPTS, max_new_tokens=40)
    for row, tokens, logprobs in zip(outs, ref.tokens, ref.logprobs):
        assert row[0][0] == tokens
        assert torch.allclose(torch.tensor(row[0][1]), torch.tensor(logprobs), atol=1e-4)


def test_greedy_equals_ours(engine, tiny):
    assert_greedy_matches(engine, tiny[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_sampling_distribution(engine, tiny, temperature):
    outs = engine.generate(PROMPTS, n=2, temperature=temperature, max_new_tokens=32, seed=3)
    assert max_logprob_error(tiny[0], PROMPTS, outs, temperature=temperature) < 1e-3
    # The same tokens scored without the temperature are clearly different: the check can tell.
    assert max_logprob_error(tiny[0], PROMPTS, outs, temperature=1.0 if temperature != 1.0 else 0.5) > 1e-2


def test_logprobs_after_penalty_top_k_top_p(engine, tiny):
    kw = dict(temperature=0.8, top_k=50, top_p=0.9, presence_penalty=1.5)
    outs = engine.generate(PROMPTS, n=2, max_new_tokens=32, seed=4, **kw)
    assert max_logprob_error(tiny[0], PROMPTS, outs, **kw) < 1e-3


def test_weight_updates_are_served_at_once(engine, tiny):
    """Three updates in a row: every time the samples' log-probs are the NEW weights' (stale weights
    or a stale prefix cache would show as errors far above 1e-3) and greedy decoding follows them."""
    model = tiny[0]
    g = torch.Generator().manual_seed(7)
    start_version = engine.health()["weight_version"]
    for step in range(1, 4):
        old = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        seconds = engine.update_weights(model.state_dict())
        assert seconds > 0 and engine.last_sync.bytes > 0
        assert engine.weight_version == engine.health()["weight_version"] == start_version + step
        outs = engine.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=24, seed=10 + step)
        assert engine.weight_version == start_version + step  # the tokens' own weight label
        assert max_logprob_error(model, PROMPTS, outs) < 1e-3
        current = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(old)
        assert max_logprob_error(model, PROMPTS, outs) > 1e-2  # what stale weights would give
        model.load_state_dict(current)
        assert_greedy_matches(engine, model)


def test_n_completions_seeds_stop_token_and_max_new_tokens(engine):
    a = engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=12, seed=5)
    assert [len(row) for row in a] == [4] * len(PROMPTS)
    for row in a:
        assert len({tuple(toks) for toks, _, _ in row}) == 4
        for toks, lps, done in row:
            assert len(toks) == len(lps) == 12 and not done and all(lp <= 0 for lp in lps)
    assert engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=12, seed=5) == a
    assert engine.generate(PROMPTS, n=4, temperature=1.0, max_new_tokens=12, seed=6) != a

    greedy = engine.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=30)[0][0][0]
    stop = greedy[5]
    cut = greedy[: greedy.index(stop) + 1]
    toks, lps, done = engine.generate(PROMPTS[:1], n=2, temperature=0.0, max_new_tokens=30, stop_token_ids=[stop])[0][0]
    assert toks == cut and toks[-1] == stop and len(lps) == len(toks) and done
    toks, _, done = engine.generate(PROMPTS[:1], n=1, temperature=0.0, max_new_tokens=3, stop_token_ids=[stop])[0][0]
    assert toks == greedy[:3] and not done


def test_seeded_prompts_beyond_one_prefill_step(engine):
    """9,000 prompt tokens take more than one scheduler step (8,192): with vLLM's chunked prefill a
    seeded request then crashes the CPU engine (see rl/vllm_server.py); whole-prompt prefills do not."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(80, 4000, (300,), generator=g).tolist() for _ in range(30)]
    outs = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=4, seed=8)
    assert [len(row) for row in outs] == [2] * 30
    # Prompt i samples with seed 8 + 2i however many prompts share the request.
    again = engine.generate(prompts[:3], n=2, temperature=1.0, max_new_tokens=4, seed=8)
    assert [[c[0] for c in row] for row in again] == [[c[0] for c in row] for row in outs[:3]]


def test_hung_then_killed_server_is_a_clear_error(engine):
    """Last in the module: it kills the module's engine. A stopped (hung) server times out with
    EngineError; a killed one fails at once, and its orphaned engine processes are ended and their
    shared memory removed."""
    pid = engine.proc.pid
    shm = _mapped_shm(pid)
    assert shm
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(EngineError, match="did not answer /generate within 2 s"):
            engine.generate(PROMPTS[:1], max_new_tokens=4, timeout_s=2)
    finally:
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    engine.proc.wait(10)
    with pytest.raises(EngineError, match="(?s)unreachable.*exited with code -9"):
        engine.generate(PROMPTS[:1], max_new_tokens=4)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not any(os.path.exists(f) for f in shm)
