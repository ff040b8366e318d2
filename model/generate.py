"""Batched generation with a KV cache (sliding-window layers keep only their window): greedy or
sampling with temperature, top-k, top-p and presence penalty; stops on end-of-turn. Used by GRPO
rollouts and by users (launch/chat.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .text import KVCache
from .vlm import Exaone45


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the stop token
    logprobs: list[list[float]]  # log-probability of each new token under the sampling distribution
    finished: list[bool]  # stopped on a stop token (False: hit max_new_tokens)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def generate(
    model: Exaone45,
    prompts: Sequence[Sequence[int]],
    *,
    pixel_values: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    presence_penalty: float = 0.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Generation:
    """temperature 0 is greedy. Prompts are left-padded into one batch; pixel_values/image_grid_thw
    hold the images of all prompts in order (as the packed training batches do)."""
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.as_tensor(list(p), device=device)
        valid[i, L - len(p) :] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = KVCache(capacity=L + max_new_tokens, step=1)
    cache.slots, cache.valid = torch.arange(L, device=device).expand(B, L), valid
    h = model.embed(ids, pixel_values, image_grid_thw)
    logits = model.lm_head(model.language_model(h, model.rope(positions, h.dtype), None, cache)[:, -1])

    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        logits = logits.float()
        if presence_penalty:
            logits = logits - presence_penalty * seen
        if temperature > 0:
            logp = torch.log_softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        logprobs.append(logp.gather(-1, nxt[:, None]).squeeze(-1))
        seen[torch.arange(B, device=device), nxt] = True
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        cache.slots = torch.full((B, 1), L + step, device=device)
        cache.valid = torch.ones(B, 1, dtype=torch.bool, device=device)
        h = model.embed(nxt[:, None])
        logits = model.lm_head(model.language_model(h, model.rope(last_pos[:, None], h.dtype), None, cache)[:, -1])

    out_tokens, out_logprobs, finished = [], [], []
    tok, lp = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
    for row_tok, row_lp in zip(tok, lp):
        cut = next((i + 1 for i, t in enumerate(row_tok) if t in set(stop_ids)), len(row_tok))
        out_tokens.append(row_tok[:cut])
        out_logprobs.append(row_lp[:cut])
        finished.append(cut < len(row_tok) or (bool(row_tok) and row_tok[-1] in set(stop_ids)))
    return Generation(out_tokens, out_logprobs, finished)


@torch.no_grad()
def generate_speculative(
    model: Exaone45, prompt: Sequence[int], *, max_new_tokens: int = 64, stop_ids: Sequence[int] = (),
    pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
) -> tuple[list[int], float]:
    """Greedy decoding with the MTP head as a one-token draft model (self-speculative decoding).

    Each step the trunk checks the certain next token and the MTP draft after it in one forward;
    a correct draft is kept (two tokens for one trunk step), a wrong one is dropped from the cache.
    The output equals plain greedy decoding. Returns (new tokens, fraction of drafts accepted)."""
    if model.mtp is None:
        raise ValueError("generate_speculative needs a model with MTP layers (text_config.num_nextn_predict_layers > 0)")
    device = next(model.parameters()).device
    cache = KVCache(capacity=len(prompt) + max_new_tokens + 2, extra=1, step=2)
    stop = set(stop_ids)

    def trunk(ids, start, pixels=None, grid=None):
        slots = torch.arange(start, start + len(ids), device=device)[None]
        cache.slots, cache.valid = slots, torch.ones_like(slots, dtype=torch.bool)
        h = model.embed(torch.tensor([ids], device=device), pixels, grid)
        return model.language_model(h, model.rope(slots, h.dtype), None, cache)

    def draft(hidden, next_ids, start):
        slots = torch.arange(start, start + len(next_ids), device=device)[None]
        cache.slots, cache.valid = slots, torch.ones_like(slots, dtype=torch.bool)
        nxt = model.language_model.embed_tokens(torch.tensor([next_ids], device=device))
        out = model.mtp(hidden, nxt, model.rope(slots, hidden.dtype), None, cache)
        return int(model.lm_head(out[:, -1]).argmax(-1))

    n = len(prompt)
    hidden = trunk(list(prompt), 0, pixel_values, image_grid_thw)
    token = int(model.lm_head(hidden[:, -1]).argmax(-1))
    guess = draft(hidden, list(prompt[1:]) + [token], 0)
    out, proposed, accepted = [], 0, 0
    while True:
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            break
        hidden = trunk([token, guess], n)
        checked = model.lm_head(hidden[0]).argmax(-1).tolist()
        proposed += 1
        if checked[0] == guess:  # the draft was right: two tokens for one trunk step
            accepted += 1
            out.append(guess)
            if guess in stop or len(out) >= max_new_tokens:
                break
            token = checked[1]
            guess = draft(hidden, [guess, token], n)
            n += 2
        else:
            cache.truncate(1)
            token = checked[0]
            guess = draft(hidden[:, :1], [token], n)
            n += 1
    return out, accepted / max(proposed, 1)
