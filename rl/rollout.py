"""GRPO rollouts: prompts from the shards, G sampled completions per prompt, task rewards.

    prompts = PromptStream(cfg.data, tokenizer, rank, world_size, seed)  # resumable, this rank's share
    with generation_mode(run.module) as model:   # full parameters on this rank, no collective inside
        groups = generate_groups(model, prompts.take(n), grpo, tokenizer, generator)
    groups.rewards                               # [n, G] weighted task rewards (training/rewards.py `score`)
    groups.items[i]                              # Rollout: the prompt, its G completions, reward parts

Prompts are rendered with the chat template and its generation prompt (reasoning on by default:
the prompt ends in `<think>\\n`), images included. Generation runs on a model whose parameters are
whole on every rank (`training.generation_eval.generation_mode`), so ranks generate independently
and may stop after different numbers of tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from data.mixture import build_sample_stream, iter_heldout, to_data_config
from data.text import Prompt, render_grpo_prompt
from model.generate import generate
from model.vlm import Exaone45
from rl.grpo import GRPOConfig, RolloutGroups
from training.rewards import score


@dataclass
class Rollout:
    """One prompt's G completions (an item of `RolloutGroups`)."""

    prompt: Prompt
    completions: list[list[int]]  # sampled token ids, the stop token included when generation stopped on it
    finished: list[bool]  # False: cut at max_new_tokens
    texts: list[str]  # decoded completions, stop token excluded
    rewards: list[float]  # weighted task reward per completion
    parts: list[dict[str, float]] = field(default_factory=list)  # reward name -> unweighted value

    @property
    def task(self) -> str:
        return self.prompt.sample.task


class PromptStream:
    """This rank's GRPO prompts: Samples through the data mixture (`data.stages.grpo` for the demo),
    rendered for generation. Resumable like a data loader: `state_dict()` / `load_state_dict()`, and
    `skipped` counts samples left out (bad data, prompts over `max_prompt_tokens`)."""

    def __init__(self, data_cfg, tokenizer, rank: int = 0, world_size: int = 1, seed: int = 0,
                 enable_thinking: bool = True, max_prompt_tokens: int = 1024):
        self.cfg = to_data_config(data_cfg)
        self.tokenizer, self.enable_thinking, self.max_prompt_tokens = tokenizer, enable_thinking, max_prompt_tokens
        self.stream = build_sample_stream(self.cfg, tokenizer=tokenizer, rank=rank, world_size=world_size, seed=seed)
        self._own_skips: Counter = Counter()
        self._samples: Optional[Iterator] = None

    @property
    def skipped(self) -> dict[str, int]:
        return dict(Counter(self.stream.skipped) + self._own_skips)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "skipped": dict(self._own_skips)}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self._own_skips = Counter(state.get("skipped", {}))
        self._samples = None  # the next take() continues from the restored cursor

    def take(self, n: int) -> list[Prompt]:
        if self._samples is None:
            self._samples = iter(self.stream)
        prompts = []
        while len(prompts) < n:
            sample = next(self._samples, None)
            if sample is None:
                raise RuntimeError("the GRPO prompt stream ran out of samples (data.epochs is set); "
                                   "set data.epochs=null to stream forever")
            prompt = render(sample, self.tokenizer, self.cfg, self.enable_thinking)
            if len(prompt.input_ids) > self.max_prompt_tokens:
                self._own_skips["prompt_too_long"] += 1
                continue
            prompts.append(prompt)
        return prompts


def render(sample, tokenizer, data_cfg, enable_thinking: bool = True) -> Prompt:
    return render_grpo_prompt(sample, tokenizer, data_cfg.image_settings, data_cfg.special_tokens, enable_thinking)


def heldout_prompts(data_cfg, tokenizer, per_source: int, rank: int = 0, world_size: int = 1,
                    enable_thinking: bool = True) -> list[Prompt]:
    """The first `per_source` held-out samples of every source in the mixture, this rank's share."""
    cfg = to_data_config(data_cfg)
    prompts = []
    for source in [s for s, w in cfg.mixture.items() if w > 0]:
        for sample in iter_heldout(cfg, sources=[source], limit=per_source, rank=rank, world_size=world_size):
            prompts.append(render(sample, tokenizer, cfg, enable_thinking))
    return prompts


# ----------------------------------------------------------------------------- generation


def prompt_images(prompts: list[Prompt], dtype: torch.dtype):
    """(pixel_values, image_grid_thw) of the prompts' images, concatenated in prompt order, or (None, None)."""
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if not pixels:
        return None, None
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    return torch.cat(pixels).to(dtype), torch.cat(grids)


def sample_completions(model: Exaone45, prompts: list[Prompt], grpo: GRPOConfig, *, stop_id: int, pad_id: int,
                       generator: Optional[torch.Generator], batch_size: int, temperature: Optional[float] = None):
    """Completions of every prompt (one each; repeat prompts for groups), `batch_size` sequences
    per generate call. Returns (tokens, finished) lists in prompt order.

    A completion that samples an image/video placeholder or a vision start/end token is cut just
    before it and counts as unfinished: such a token has no image features behind it, so the
    training forward could not score it the way it was sampled.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    temperature = grpo.temperature if temperature is None else temperature
    mc = model.cfg
    vision_ids = {mc.image_token_id, mc.video_token_id, mc.vision_start_token_id, mc.vision_end_token_id}
    tokens, finished = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        pixels, grid = prompt_images(chunk, dtype)
        out = generate(
            model, [p.input_ids for p in chunk],
            pixel_values=None if pixels is None else pixels.to(device),
            image_grid_thw=None if grid is None else grid.to(device),
            max_new_tokens=grpo.max_new_tokens, temperature=temperature, top_p=grpo.top_p, top_k=grpo.top_k,
            presence_penalty=grpo.presence_penalty, stop_ids=[stop_id], pad_id=pad_id, generator=generator)
        for toks, done in zip(out.tokens, out.finished):
            cut = next((i for i, t in enumerate(toks) if t in vision_ids), None)
            tokens.append(toks if cut is None else toks[:cut])
            finished.append(done and cut is None)
    return tokens, finished


def decode(tokenizer, tokens: list[int], stop_id: int) -> str:
    """Completion text for the rewards: special tokens kept (`</think>` matters), stop token dropped."""
    if tokens and tokens[-1] == stop_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def score_completion(text: str, prompt: Prompt, grpo: GRPOConfig, enable_thinking: bool):
    meta = {**prompt.sample.meta, "enable_thinking": enable_thinking}
    return score(text, prompt.sample.task, meta, grpo.reward_weights)


def generate_groups(model: Exaone45, prompts: list[Prompt], grpo: GRPOConfig, tokenizer, *,
                    generator: Optional[torch.Generator] = None, stop_id: int = 53, pad_id: int = 0,
                    batch_size: int = 64, enable_thinking: bool = True) -> RolloutGroups:
    """G = grpo.group_size sampled completions per prompt, scored: rewards [len(prompts), G]."""
    G = grpo.group_size
    repeated = [p for p in prompts for _ in range(G)]
    tokens, finished = sample_completions(model, repeated, grpo, stop_id=stop_id, pad_id=pad_id,
                                          generator=generator, batch_size=batch_size)
    items = []
    for i, prompt in enumerate(prompts):
        toks, done = tokens[i * G : (i + 1) * G], finished[i * G : (i + 1) * G]
        texts = [decode(tokenizer, t, stop_id) for t in toks]
        scored = [score_completion(t, prompt, grpo, enable_thinking) for t in texts]
        items.append(Rollout(prompt, toks, done, texts, [s[0] for s in scored], [s[1] for s in scored]))
    rewards = torch.tensor([item.rewards for item in items], dtype=torch.float32).view(len(items), G)
    return RolloutGroups(rewards, items)
