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

| task      | held-out source          | metric (training/rewards.py)                       |
|-----------|--------------------------|----------------------------------------------|
| math      | math                     | math_boxed: last \\boxed{} equals the answer |
| digits    | chat, digit-image chats  | math_boxed against the digit label           |
| counting  | counting                 | counting: the boxed count                    |
| document  | document                 | math_boxed                                   |
| stem      | stem                     | math_boxed                                   |
| grounding | grounding                | grounding: IoU of the last box               |
| ocr       | ocr                      | ocr: 1 - normalized edit distance            |

`model` may be a plain Exaone45, a DeepSpeed engine (its module is used) or an FSDP2-wrapped
model (see `generation_mode`: every rank gathers the full weights once and generates with no
collectives at all). A context-parallel model decodes with plain attention (prompts are not sharded).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from data.mixture import iter_heldout, to_data_config
from data.schema import Sample
from data.text import render_grpo_prompt
from model.generate import generate
from . import rewards

from .distributed import all_reduce_sum


@dataclass(frozen=True)
class Task:
    source: str
    metric: Callable[[str, Any], float]
    keep: Callable[[Sample], bool] = lambda s: True


TASKS = {
    "math": Task("math", rewards.math_boxed),
    "digits": Task("chat", rewards.math_boxed, lambda s: "label" in s.meta and s.is_chat),
    "counting": Task("counting", rewards.counting),
    "document": Task("document", rewards.math_boxed),
    "stem": Task("stem", rewards.math_boxed),
    "grounding": Task("grounding", rewards.grounding),
    "ocr": Task("ocr", rewards.ocr),
}


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


def complete(model, tokenizer, samples: Sequence[Sample], data_cfg, *, max_new_tokens: int = 48,
             enable_thinking: bool = False, batch_size: int = 32) -> list[str]:
    """Greedy completions (text, without the stop token) of the samples' generation prompts."""
    from rl.rollout import decode, prompt_images

    cfg = to_data_config(data_cfg)
    stop = cfg.end_of_turn_token_id
    weight = next(model.parameters())
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        prompts = [render_grpo_prompt(s, tokenizer, cfg.image_settings, cfg.special_tokens, enable_thinking)
                   for s in samples[i : i + batch_size]]
        pixels, grids = prompt_images(prompts, weight.dtype)
        gen = generate(model, [p.input_ids for p in prompts], max_new_tokens=max_new_tokens, stop_ids=[stop],
                       pad_id=cfg.pad_token_id,
                       pixel_values=None if pixels is None else pixels.to(weight.device),
                       image_grid_thw=None if grids is None else grids.to(weight.device))
        out += [decode(tokenizer, tokens, stop) for tokens in gen.tokens]
    return out


def evaluate_generation(model, tokenizer, data_cfg, tasks: Sequence[str] = ("math", "digits", "counting"),
                        limit_per_task: int = 64, max_new_tokens: int = 48, rank: int = 0, world: int = 1,
                        enable_thinking: bool = False, batch_size: int = 32) -> dict[str, float]:
    """{"gen/<task>": mean score, "gen/<task>/count": prompts scored} over all ranks (see the module doc).
    Every rank of the process group must call it (the sums are all-reduced)."""
    sums = []
    with generation_mode(model) as plain:
        for task in tasks:
            samples = heldout_prompts(data_cfg, task, limit_per_task, rank, world)
            texts = complete(plain, tokenizer, samples, data_cfg, max_new_tokens=max_new_tokens,
                             enable_thinking=enable_thinking, batch_size=batch_size)
            sums += [sum(TASKS[task].metric(t, s.meta) for t, s in zip(texts, samples)), len(samples)]
    totals = all_reduce_sum(sums, plain_device(model))
    row = {}
    for i, task in enumerate(tasks):
        total, count = totals[2 * i], totals[2 * i + 1]
        row[f"gen/{task}"] = total / count if count else float("nan")
        row[f"gen/{task}/count"] = count
    return row


def plain_device(model) -> torch.device:
    return next(getattr(model, "module", model).parameters()).device


@contextmanager
def generation_mode(model) -> Iterator[Any]:
    """The module to decode with, every parameter whole on this rank and no collective inside (ranks
    may generate different numbers of tokens): plain attention, no blank vision pass, eval mode;
    everything restored afterwards. Used by the generation metrics and by GRPO rollouts.

    A DeepSpeed ZeRO-1/2 engine's module (whole on every rank) and a plain module are used as they
    are. Under FSDP2 every FSDP unit is all-gathered once on entry (the same units in the same order
    on every rank) and freed on exit, ZeRO-3 gathers every partition likewise; inside, a hook-free
    twin built on the meta device holds the gathered tensors (no copy). Decoding through FSDP's own hooks would run them per layer and per
    token and record every call for backward prefetching (bench/RESULTS.md: the twin decodes at the
    plain model's speed, the hooked module at 0.7x). Parameters are in the training compute dtype
    (bf16 when FSDP's mixed precision says so).
    """
    from torch.distributed.fsdp import FSDPModule

    from .checkpoint import is_zero3

    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the module
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if units:
        with torch.no_grad():
            for unit in units:
                unit.unshard()
            try:
                yield _twin(module)
            finally:
                for unit in reversed(units):
                    unit.reshard()
        return
    if is_zero3(model):  # ZeRO-3: gather every partition (its per-module hooks would gather per token)
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield _twin(module)
        return
    from .context_parallel import whole_sequence_attention

    was_training, blank_vision = module.training, getattr(module, "vision_in_every_step", False)
    module.eval()
    module.vision_in_every_step = False
    try:
        with whole_sequence_attention(module):
            yield module
    finally:
        module.vision_in_every_step = blank_vision
        module.train(was_training)


def _twin(module):
    """A hook-free copy of `module` on the meta device holding its (gathered) parameter tensors, no copy."""
    from model.vlm import Exaone45

    with torch.device("meta"):
        twin = Exaone45(module.cfg)
    _match_fp8(twin, module.cfg)
    params = {name.replace("_checkpoint_wrapped_module.", ""): p.data for name, p in module.named_parameters()}
    twin.load_state_dict(params, assign=True)
    return twin.eval()


def _match_fp8(twin, cfg) -> None:
    """Give the twin the FP8 linear layers the trained module has (same names), so the gathered weights fit."""
    if cfg.fp8 != "none":
        from model.fp8 import apply_fp8

        apply_fp8(twin, cfg.fp8, cfg.fp8_modules, cfg.fp8_scaling)
