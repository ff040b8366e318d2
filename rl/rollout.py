"""GRPO rollouts: prompts from the shards, G sampled completions per prompt, task rewards.

    prompts = PromptStream(cfg.data, tokenizer, rank, world_size, seed)  # resumable, this rank's share
    with rollouts.session() as generate:         # rl/rollout_engine.py: native or vLLM, no collective inside
        groups = generate_groups(generate, prompts.take(n), grpo, tokenizer, generator=generator)
    groups.rewards                               # [n, G] weighted task rewards (training/rewards.py `score`)
    groups.items[i]                              # Rollout: the prompt, its G completions, reward parts

Prompts are rendered with the chat template and its generation prompt (reasoning on by default:
the prompt ends in `<think>\\n`), images included. Generation runs on a model whose parameters are
whole on every rank (`training.decoding.decoding`) or on a vLLM server, so ranks generate
independently and may stop after different numbers of tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from data.mixture import build_sample_stream, iter_heldout, to_data_config
from data.text import Prompt, render_grpo_prompt
from rl.grpo import RolloutGroups
from training.config import RLCfg
from training.decoding import Sampling, decode
from training.rewards import REWARDS, score
from training.tasks import correctness_reward


@dataclass
class Rollout:
    """One prompt's G completions (an item of `RolloutGroups`)."""

    prompt: Prompt
    completions: list[list[int]]  # sampled token ids, the stop token included when generation stopped on it
    finished: list[bool]  # False: cut at max_new_tokens
    texts: list[str]  # decoded completions, stop token excluded
    rewards: list[float]  # weighted task reward per completion
    parts: list[dict[str, float]] = field(default_factory=list)  # reward name -> unweighted value
    correct: list[float] = field(default_factory=list)  # the task's correctness reward (training/tasks.py)
    signal: list[float] = field(default_factory=list)  # what the zero-variance filter reads (rl.filter_on)
    logprobs: list[list[float]] = field(default_factory=list)  # per sampled token, under the distribution sampled from

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


def sampling(rl, temperature: Optional[float] = None, presence_penalty: Optional[float] = None) -> Sampling:
    """The rollout sampling of the `rl` config (optionally another temperature / presence penalty)."""
    return Sampling(rl.max_new_tokens, rl.temperature if temperature is None else temperature, rl.top_p, rl.top_k,
                    rl.presence_penalty if presence_penalty is None else presence_penalty)


def judge(text: str, prompt: Prompt, rl: RLCfg, enable_thinking: bool) -> tuple[float, dict, float, float]:
    """(weighted reward, {reward: value}, correctness, filter signal) of one completion: the task's
    rewards (`rl.reward_weights`), its correctness reward (training/tasks.py; computed even when its
    weight leaves it out) and the sum of the `rl.filter_on` rewards (None: the correctness)."""
    task, meta = prompt.sample.task, {**prompt.sample.meta, "enable_thinking": enable_thinking}
    reward, parts = score(text, task, meta, rl.reward_weights)
    value = lambda name: parts[name] if name in parts else REWARDS[name](text, meta)  # noqa: E731
    correct = value(correctness_reward(task))
    signal = correct if rl.filter_on is None else sum(value(name) for name in rl.filter_on)
    return reward, parts, correct, signal


def score_groups(prompts: list[Prompt], tokens: list[list[int]], finished: list[bool], rl: RLCfg, tokenizer, *,
                 stop_id: int, enable_thinking: bool = True, logprobs: Optional[list[list[float]]] = None) -> RolloutGroups:
    """Groups of G = rl.group_size completions per prompt (prompt i's are tokens[i*G : (i+1)*G]), scored."""
    G = rl.group_size
    items = []
    for i, prompt in enumerate(prompts):
        toks, done = tokens[i * G : (i + 1) * G], finished[i * G : (i + 1) * G]
        texts = [decode(tokenizer, t, stop_id) for t in toks]
        judged = [judge(t, prompt, rl, enable_thinking) for t in texts]
        items.append(Rollout(prompt, toks, done, texts, *(list(x) for x in zip(*judged)),
                             logprobs=[] if logprobs is None else logprobs[i * G : (i + 1) * G]))
    as_tensor = lambda key: torch.tensor([getattr(item, key) for item in items], dtype=torch.float32).view(len(items), G)  # noqa: E731
    return RolloutGroups(as_tensor("rewards"), items, as_tensor("signal"))


def generate_groups(generate, prompts: list[Prompt], rl: RLCfg, tokenizer, *, generator: Optional[torch.Generator] = None,
                    stop_id: int = 53, enable_thinking: bool = True) -> RolloutGroups:
    """G = rl.group_size sampled completions per prompt, scored: rewards [len(prompts), G]. `generate`
    is a rollout engine's (rl/rollout_engine.py `session()`)."""
    tokens, logprobs, finished = generate(prompts, sampling(rl), n=rl.group_size, generator=generator)
    return score_groups(prompts, tokens, finished, rl, tokenizer, stop_id=stop_id, enable_thinking=enable_thinking,
                        logprobs=logprobs)
