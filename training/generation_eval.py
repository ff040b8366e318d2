"""Held-out generation metrics: greedy answers to held-out prompts, scored by the task rewards.

    from training.generation_eval import evaluate_generation
    evaluate_generation(model, tokenizer, cfg.data, tasks=("math", "digits"), limit_per_task=64,
                        max_new_tokens=48, rank=d.rank, world=d.world)
    -> {"gen/math": 0.31, "gen/math/count": 64, "gen/digits": 0.55, "gen/digits/count": 21}

A task's prompts are the first `limit_per_task` held-out samples of its source that qualify
(`data.mixture.iter_heldout`, a fixed order), rendered with the chat template's generation prompt
(`data.text.render_grpo_prompt`); rank r of `world` answers every world-th of them and the sums are
all-reduced, so every rank returns the same numbers. Decoding is greedy through `model.generate`
(KV cache), stopping at end-of-turn. The prompt is the template's generation prompt of the chosen
mode, which tokenizes exactly as the training sequences of that mode do (data/text.py):
`enable_thinking=False` (the default) ends it with the empty think block, so the completion is the
answer (short, cheap to decode); `True` ends it with `<think>\\n` and the model reasons first.

Each task of training/tasks.py (math, stem, counting, digits, document, chat, grounding, ocr, ...)
reads its held-out prompts from its `source` (digits: the chat source's digit-image questions) and
scores an answer with its correctness reward (training/rewards.py: math_boxed, counting,
exact_match, grounding IoU, OCR edit similarity).

`model` is a training Engine (training/engine.py: every rank gathers the full weights once and
generates with no collective at all) or a plain module; either decodes through a hook-free copy
with plain attention (prompts are not sharded under context parallelism), a KV-cache kernel, no FP8.
"""

from __future__ import annotations

from typing import Sequence

from data.mixture import iter_heldout, to_data_config
from data.schema import Sample
from data.text import render_grpo_prompt
from model.vlm import Exaone45

from .decoding import Sampling, decode, decoding, sample
from .distributed import all_reduce_sum
from .rewards import REWARDS
from .tasks import TASKS


def heldout_prompts(data_cfg, task: str, limit: int, rank: int = 0, world: int = 1) -> list[Sample]:
    """This rank's share of the task's first `limit` qualifying held-out samples."""
    if task not in TASKS:
        raise ValueError(f"generation eval task {task!r}: expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    chosen = []
    for sample in iter_heldout(data_cfg, sources=[spec.source]):
        if len(chosen) >= limit:
            break
        if spec.keep(sample):
            chosen.append(sample)
    return chosen[rank::world]


def complete(model: Exaone45, tokenizer, samples: Sequence[Sample], data_cfg, *, max_new_tokens: int = 48,
             enable_thinking: bool = False, batch_size: int = 32) -> list[str]:
    """Greedy completions (text, without the stop token) of the samples' generation prompts, by a
    model that decodes (`training.decoding.decoding`)."""
    cfg = to_data_config(data_cfg)
    special = cfg.special_tokens
    prompts = [render_grpo_prompt(s, tokenizer, cfg.image_settings, special, enable_thinking) for s in samples]
    tokens, _, _ = sample(model, prompts, Sampling(max_new_tokens=max_new_tokens), stop_id=special.end_of_turn_token_id,
                          pad_id=special.pad_token_id, batch_size=batch_size)
    return [decode(tokenizer, t, special.end_of_turn_token_id) for t in tokens]


def evaluate_generation(model, tokenizer, data_cfg, tasks: Sequence[str] = ("math", "digits", "counting"),
                        limit_per_task: int = 64, max_new_tokens: int = 48, rank: int = 0, world: int = 1,
                        enable_thinking: bool = False, batch_size: int = 32, device=None) -> dict[str, float]:
    """{"gen/<task>": mean score, "gen/<task>/count": prompts scored} over all ranks (see the module
    doc). `model`: a training Engine or a plain module. Every rank of the process group must call it
    (the sums are all-reduced on `device`, default the model's)."""
    sums = []
    with decoding(model) as plain:
        for task in tasks:
            samples = heldout_prompts(data_cfg, task, limit_per_task, rank, world)
            texts = complete(plain, tokenizer, samples, data_cfg, max_new_tokens=max_new_tokens,
                             enable_thinking=enable_thinking, batch_size=batch_size)
            metric = REWARDS[TASKS[task].correct]
            sums += [sum(metric(t, s.meta) for t, s in zip(texts, samples)), len(samples)]
        device = device or next(plain.parameters()).device
    totals = all_reduce_sum(sums, device)
    row = {}
    for i, task in enumerate(tasks):
        total, count = totals[2 * i], totals[2 * i + 1]
        row[f"gen/{task}"] = total / count if count else float("nan")
        row[f"gen/{task}/count"] = count
    return row
