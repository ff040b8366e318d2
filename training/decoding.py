"""Decoding on whole weights, for everything that generates during or after training (SFT
generation metrics, the report, GRPO rollouts and its held-out reward):

    with decoding(engine_or_module) as model:        # every parameter whole on this rank, no hooks
        tokens, logprobs, finished = sample(model, prompts, sampling, stop_id=..., pad_id=..., generator=g)

`decoding` takes a training engine (training/engine.py: FSDP2 gathers every unit once, ZeRO-3 every
partition) or a plain module, and yields a hook-free copy in eval mode that decodes with a KV-cache
kernel and no FP8 (`engine.decoding_copy`). `sample` renders nothing: prompts are token ids (with
their images), as `data.text.render_grpo_prompt` made them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from data.text import Prompt
from model.generate import generate
from model.vlm import Exaone45

from .engine import Engine, decoding_copy


@dataclass
class Sampling:
    """How completions are drawn (temperature 0: greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0


@contextmanager
def decoding(model) -> Iterator[Exaone45]:
    """The model to decode with (see the module docstring): `model` is a training Engine (pass
    `run.engine`, not the module it wraps) or a plain module."""
    if isinstance(model, Engine):
        with model.whole_model() as whole:
            yield whole
        return
    with torch.no_grad():
        yield decoding_copy(getattr(model, "module", model))


def prompt_images(prompts: Sequence[Prompt], dtype: torch.dtype):
    """(pixel_values, image_grid_thw) of the prompts' images, concatenated in prompt order, or (None, None)."""
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if not pixels:
        return None, None
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    return torch.cat(pixels).to(dtype), torch.cat(grids)


def decode(tokenizer, tokens: list[int], stop_id: int) -> str:
    """Completion text for the rewards: special tokens kept (`</think>` matters), stop token dropped."""
    if tokens and tokens[-1] == stop_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def sample(model: Exaone45, prompts: Sequence[Prompt], sampling: Sampling, *, stop_id: int, pad_id: int,
           generator: Optional[torch.Generator] = None, batch_size: int = 64):
    """One completion per prompt (repeat prompts for groups), `batch_size` sequences per generate
    call. Returns (tokens, logprobs, finished) lists in prompt order.

    A completion that samples an image/video placeholder or a vision start/end token is cut just
    before it and counts as unfinished: such a token has no image features behind it, so the
    training forward could not score it the way it was sampled."""
    weight = next(model.parameters())
    vision_ids = vision_token_ids(model.cfg)
    tokens, logprobs, finished = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        pixels, grid = prompt_images(chunk, weight.dtype)
        out = generate(model, [p.input_ids for p in chunk],
                       pixel_values=None if pixels is None else pixels.to(weight.device),
                       image_grid_thw=None if grid is None else grid.to(weight.device),
                       max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                       top_k=sampling.top_k, presence_penalty=sampling.presence_penalty, stop_ids=[stop_id],
                       pad_id=pad_id, generator=generator)
        for toks, lps, done in zip(out.tokens, out.logprobs, out.finished):
            toks, lps, done = cut_at_vision_token(toks, lps, done, vision_ids)
            tokens.append(toks)
            logprobs.append(lps)
            finished.append(done)
    return tokens, logprobs, finished


def vision_token_ids(mc) -> set[int]:
    """The image/video placeholders and vision start/end ids of a model config."""
    return {mc.image_token_id, mc.video_token_id, mc.vision_start_token_id, mc.vision_end_token_id}


def cut_at_vision_token(tokens: list[int], logprobs: list[float], finished: bool, vision_ids: set[int]):
    """A completion cut just before its first vision token (then unfinished), see `sample`; any
    rollout engine's samples go through it."""
    cut = next((i for i, t in enumerate(tokens) if t in vision_ids), None)
    if cut is None:
        return tokens, logprobs, finished
    return tokens[:cut], logprobs[:cut], False
