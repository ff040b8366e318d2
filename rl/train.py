"""GRPO on the trainer's loop (training/trainer.py `train`: SIGTERM, the last step, evaluation at the
start and the end, logging, checkpoints): its step is rollouts -> the zero-variance filter with a
capped refill -> the update (rl/update.py) on the engine's one optimizer step -> the rollout
engine's weight sync (rl/rollout_engine.py: native, or a vLLM server per node, stopped at the end
of the run and on errors).

    rl = rl_config(cfg.rl)                  # training.config: the `rl` node, checked
    run = setup(cfg, prompt_loader(rl))     # training.trainer.setup: engine, init_from, resume
    train(run, rl)

Data parallelism: every rank samples its own prompts (its share of the shards) and fills its share
of the train batch (`train_prompts_per_step / dp` groups) from rank-local groups, generating without
collectives; the counts are then all-reduced (the filter's verdict over all ranks is what the
warning and `on_underfilled` read), and the update normalizes by global counts.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import torch

from data.schema import TASKS
from rl.grpo import RolloutGroups, UnderfilledBatchWarning, fill_train_batch
from rl.rollout import PromptStream, generate_groups, heldout_prompts, judge, sampling
from rl.rollout_engine import build_rollouts
from rl.update import update
from training.config import RLCfg
from training.decoding import Sampling, decode
from training.distributed import reduce_metrics
from training.math_answers import LIMIT_REASONS, pop_limit_counts
from training.rewards import REWARDS
from training.trainer import Run, train as train_loop


def prompt_loader(rl: RLCfg):
    """`build_loader` for training.trainer.setup: this rank's PromptStream, saved and restored with
    checkpoints in the data loader's place."""

    def build(cfg, d, tokenizer):
        return PromptStream(cfg.data, tokenizer, rank=d.dp_rank, world_size=d.dp, seed=cfg.train.seed,
                            enable_thinking=rl.enable_thinking, max_prompt_tokens=rl.max_prompt_tokens)

    return build


def train(run: Run, rl: RLCfg) -> None:
    """The GRPO run: held-out evaluation before the first step and after the last, the step below."""
    rollouts = build_rollouts(run, rl)
    try:
        step = GRPOStep(run, rl, rollouts)
        evaluate = HeldoutEval(run, rl, rollouts) if rl.eval_prompts_per_source > 0 else None
        train_loop(run, step, evaluate, at_start=rl.eval_at_start, at_end=True)
    finally:
        rollouts.close()


class GRPOStep:
    """One GRPO step: `step(run)` -> the row's metrics (rollouts, filter, update, weight sync),
    `finite`, `tokens`. `rollout/sync_s` is the sync's seconds (0 natively), `rollout/sync_gb` what a
    node's local rank 0 wrote, `rollout/logprob_diff_max` rl/update.py's check of the engine."""

    def __init__(self, run: Run, rl: RLCfg, rollouts):
        from training.parallelize import frozen_copy

        self.rl, self.rollouts = rl, rollouts
        # per rank: different samples; restored with the checkpoint
        self.generator = torch.Generator(device=run.d.device).manual_seed(run.cfg.train.seed * 1_000_003 + run.d.rank)
        if "generator" in run.extra_state:
            self.generator.set_state(run.extra_state["generator"])
        self.reference = frozen_copy(run.cfg, run.d) if rl.kl_coef > 0 else None

    def __call__(self, run: Run) -> dict:
        start = time.perf_counter()
        groups, rollout = collect(run, self.rl, self.generator, self.rollouts)
        run.extra_state["generator"] = self.generator.get_state()
        update_start = time.perf_counter()
        result = update(run, groups, self.rl, self.reference)
        update_s = time.perf_counter() - update_start
        sync = self.rollouts.sync(run)  # every step: the next rollout samples the weights just trained
        seconds = reduce_metrics({}, run.d.device, {"update": update_s, "step": time.perf_counter() - start,
                                                    "sync_s": sync["sync_s"], "sync_gb": sync["sync_gb"]})
        result["train_tokens_per_s"] = result.pop("update_tokens") / max(seconds["update"], 1e-9)
        result["rollout/sync_s"], result["rollout/sync_gb"] = seconds["sync_s"], seconds["sync_gb"]
        return {**result, **rollout}


def collect(run: Run, rl: RLCfg, generator: torch.Generator, rollouts) -> tuple[RolloutGroups, dict]:
    """This rank's share of the train batch (groups with signal) and the step's rollout metrics over
    every group generated on every rank."""
    d, dp = run.d, run.d.dp
    local = dataclasses.replace(rl, train_prompts_per_step=rl.train_prompts_per_step // dp, on_underfilled="warn")
    generated: list[RolloutGroups] = []
    special = run.loader.cfg.special_tokens

    def generate_batch(_: int) -> RolloutGroups:
        prompts = run.loader.take(rl.rollout_prompts_per_batch // dp)
        groups = generate_groups(generate, prompts, rl, run.tokenizer, generator=generator,
                                 stop_id=special.end_of_turn_token_id, enable_thinking=rl.enable_thinking)
        generated.append(groups)
        return groups

    start = time.perf_counter()
    with rollouts.session() as generate, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderfilledBatchWarning)  # decided below over all ranks
        kept, fill = fill_train_batch(generate_batch, local)
    seconds = time.perf_counter() - start

    everything = RolloutGroups.cat(generated)
    sums = rollout_sums(everything, kept, rl)
    maxima = {"num_gen_batches": fill["num_gen_batches"], "rollout_s": seconds, "response_length_max": sums.pop("_length_max")}
    cut = pop_limit_counts()  # answers the rewards did not parse (too long, too costly): scored 0
    sums.update({f"reward_cut/{r}": cut.get(r, 0) for r in LIMIT_REASONS})
    sums["reward_cut/gold"] = sum(n for r, n in cut.items() if r.startswith("gold_"))
    total = reduce_metrics(sums, d.device, maxima)
    if total["num_train_groups"] < rl.train_prompts_per_step:
        message = (f"step {run.step + 1}: only {int(total['num_train_groups'])}/{rl.train_prompts_per_step} groups "
                   f"with signal after {int(total['num_gen_batches'])} rollout batches "
                   f"({int(total['num_zero_std'])}/{int(total['num_groups'])} had zero spread in {filter_name(rl)})")
        if rl.on_underfilled == "fail":
            raise RuntimeError(message + "; raise rl.max_gen_batches or set rl.on_underfilled=warn")
        if d.is_main:
            warnings.warn(message + "; training on them", UnderfilledBatchWarning, stacklevel=2)
    return kept, rollout_metrics(total, run.loader.cfg.mixture)


def filter_name(rl: RLCfg) -> str:
    return "correctness" if rl.filter_on is None else "+".join(rl.filter_on)


def rollout_sums(generated: RolloutGroups, kept: RolloutGroups, rl: RLCfg) -> dict[str, float]:
    """This rank's sums over its completions, under keys every rank shares (for one all-reduce)."""
    lengths = [len(t) for item in generated.items for t in item.completions]
    r = generated.rewards.double().flatten()
    from rl.grpo import zero_variance_mask

    out = {"n": float(r.numel()), "reward": float(r.sum()), "reward_sq": float((r * r).sum()),
           "length": float(sum(lengths)), "_length_max": float(max(lengths, default=0)),
           "clipped": float(sum(not f for item in generated.items for f in item.finished)),
           "correct": float(sum(c for item in generated.items for c in item.correct)),
           "num_groups": float(len(generated)), "num_train_groups": float(len(kept)),
           "num_zero_std": float((~zero_variance_mask(generated.signal, rl.zero_std_tol)).sum())}
    for name in REWARDS:
        out[f"reward/{name}"] = out[f"reward/{name}/n"] = 0.0
    for task in TASKS:
        for key in ("reward_task", "accuracy", "n_task", "train_groups"):
            out[f"{key}/{task}"] = 0.0
    for item in generated.items:
        for reward, parts, correct in zip(item.rewards, item.parts, item.correct):
            for name, value in parts.items():
                out[f"reward/{name}"] += value
                out[f"reward/{name}/n"] += 1
            if item.task in TASKS:
                out[f"reward_task/{item.task}"] += reward
                out[f"accuracy/{item.task}"] += correct
                out[f"n_task/{item.task}"] += 1
    for item in kept.items:
        if item.task in TASKS:
            out[f"train_groups/{item.task}"] += 1
    return out


def rollout_metrics(total: dict[str, float], mixture: dict) -> dict:
    """The logged rollout metrics from the all-reduced sums: rewards (mean, std, per reward, per
    task), training-time correctness, lengths, the filter's verdict, groups kept per task (every
    task generated or in the mixture, 0 included), what the rewards cut, throughput."""
    n = max(total["n"], 1)
    mean = total["reward"] / n
    row = {"reward_mean": mean, "reward_std": math.sqrt(max(total["reward_sq"] / n - mean * mean, 0.0)),
           "accuracy": total["correct"] / n, "response_length_mean": total["length"] / n,
           "response_length_max": int(total["response_length_max"]), "response_clipped_ratio": total["clipped"] / n,
           "frac_zero_std_groups": total["num_zero_std"] / max(total["num_groups"], 1),
           "num_gen_batches": int(total["num_gen_batches"]), "num_train_groups": int(total["num_train_groups"]),
           "gen_tokens_per_s": total["length"] / max(total["rollout_s"], 1e-9), "rollout_s": total["rollout_s"]}
    for name in REWARDS:
        if total[f"reward/{name}/n"]:
            row[f"reward/{name}"] = total[f"reward/{name}"] / total[f"reward/{name}/n"]
    for task in TASKS:
        if total[f"n_task/{task}"]:
            row[f"reward_task/{task}"] = total[f"reward_task/{task}"] / total[f"n_task/{task}"]
            row[f"accuracy/{task}"] = total[f"accuracy/{task}"] / total[f"n_task/{task}"]
        if total[f"n_task/{task}"] or mixture.get(task, 0) > 0:  # generated (or in the mixture): 0 included
            row[f"train_groups/{task}"] = int(total[f"train_groups/{task}"])
    row.update({k: int(v) for k, v in total.items() if k.startswith("reward_cut/") and v})
    return row


class HeldoutEval:
    """What GRPO is judged by, on `rl.eval_prompts_per_source` held-out prompts per mixture source:
    `eval/accuracy` (the tasks' correctness, format excluded) and `eval/reward` (the training reward)
    of `rl.eval_samples` answers per prompt sampled like the policy (at `rl.eval_temperature`), per
    task too, and `eval/accuracy_greedy` (one greedy answer per prompt). The same draws every time."""

    def __init__(self, run: Run, rl: RLCfg, rollouts):
        self.rl, self.rollouts = rl, rollouts
        self.prompts = heldout_prompts(run.loader.cfg, run.tokenizer, rl.eval_prompts_per_source, run.d.dp_rank,
                                       run.d.dp, rl.enable_thinking)

    def __call__(self, run: Run) -> dict:
        rl, special = self.rl, run.loader.cfg.special_tokens
        sampled = [p for p in self.prompts for _ in range(rl.eval_samples)]
        generator = torch.Generator(device=run.d.device).manual_seed(run.d.rank)  # the same draws at every evaluation
        with self.rollouts.session() as generate:
            tokens, _, _ = generate(self.prompts, sampling(rl, rl.eval_temperature, rl.eval_presence_penalty),
                                    n=rl.eval_samples, generator=generator)
            greedy, _, _ = generate(self.prompts, Sampling(rl.max_new_tokens))
        sums = {f"{k}/{t}": 0.0 for k in ("reward", "correct", "n", "greedy", "greedy_n") for t in TASKS}
        sums["length"] = 0.0
        for prompts, outputs, greedy_pass in ((sampled, tokens, False), (self.prompts, greedy, True)):
            for prompt, toks in zip(prompts, outputs):
                task = prompt.sample.task
                reward, _, correct, _ = judge(decode(run.tokenizer, toks, special.end_of_turn_token_id), prompt, rl,
                                              rl.enable_thinking)
                if greedy_pass:
                    sums[f"greedy/{task}"] += correct
                    sums[f"greedy_n/{task}"] += 1
                else:
                    sums[f"reward/{task}"] += reward
                    sums[f"correct/{task}"] += correct
                    sums[f"n/{task}"] += 1
                    sums["length"] += len(toks)
        total = reduce_metrics(sums, run.d.device)
        count = sum(total[f"n/{t}"] for t in TASKS)
        greedy_count = sum(total[f"greedy_n/{t}"] for t in TASKS)
        row = {"eval/accuracy": sum(total[f"correct/{t}"] for t in TASKS) / max(count, 1),
               "eval/reward": sum(total[f"reward/{t}"] for t in TASKS) / max(count, 1),
               "eval/accuracy_greedy": sum(total[f"greedy/{t}"] for t in TASKS) / max(greedy_count, 1),
               "eval/response_length_mean": total["length"] / max(count, 1), "eval/prompts": int(greedy_count)}
        for t in TASKS:
            if total[f"n/{t}"]:
                row[f"eval/accuracy/{t}"] = total[f"correct/{t}"] / total[f"n/{t}"]
                row[f"eval/reward_task/{t}"] = total[f"reward/{t}"] / total[f"n/{t}"]
                row[f"eval/accuracy_greedy/{t}"] = total[f"greedy/{t}"] / total[f"greedy_n/{t}"]
        return row
