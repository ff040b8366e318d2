"""The GRPO loop: rollouts -> zero-variance filter with capped refill -> old log-probs -> clipped
policy updates, with checkpoints, exact resume and metrics as in pretraining.

    grpo, loop = rl_config(cfg.rl)
    run = setup(cfg, prompt_loader(loop))   # training.trainer.setup: engines, init_from, resume
    train(run, grpo, loop)

Data parallelism: every rank samples its own prompts (its share of the shards) and fills its share
of the train batch (`train_prompts_per_step / dp` groups) from rank-local groups, generating without
collectives. The counts are then all-reduced, so every rank runs the same number of update
micro-batches (ranks with fewer sequences run zero-loss ones) and the losses are normalized by
global counts: a token-mean over every response token of the step on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import OmegaConf

from rl.grpo import (
    GRPOConfig, RolloutGroups, UnderfilledBatchWarning, agg_loss, entropy_from_logits, fill_train_batch,
    group_advantages, kl_k3, policy_loss, zero_variance_mask,
)
from data.schema import TASKS
from training.rewards import REWARDS
from rl.rollout import (
    PromptStream, decode, generate_groups, heldout_prompts, sample_completions, score_completion,
)
from training.distributed import all_reduce_max, all_reduce_sum
from training.generation_eval import generation_mode


@dataclass
class LoopConfig:
    """Knobs of the loop around the algorithm (the algorithm's are `rl.grpo.GRPOConfig`); both live
    under `rl:` in the recipe."""

    enable_thinking: bool = True  # prompts end in `<think>\n` (the model card's default)
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted in skipped_samples)
    generation_batch_size: int = 64  # sequences per generate call on one rank
    eval_prompts_per_source: int = 0  # held-out prompts per mixture source for eval/reward; 0: no evaluation
    eval_samples: int = 1  # completions per held-out prompt (more: a less noisy mean when sampling)
    eval_temperature: float = 0.0  # 0: greedy
    eval_presence_penalty: float = 0.0
    eval_at_start: bool = True  # evaluate before the first update too (a row with step 0)


def rl_config(node) -> tuple[GRPOConfig, LoopConfig]:
    """Split the `rl:` node into the algorithm's and the loop's knobs; unknown keys are an error."""
    raw = dict(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node or {})
    algo_keys = {f.name for f in dataclasses.fields(GRPOConfig)}
    loop_keys = {f.name for f in dataclasses.fields(LoopConfig)}
    unknown = sorted(set(raw) - algo_keys - loop_keys)
    if unknown:
        raise ValueError(f"config error at `rl.{unknown[0]}`: unknown key; known: {sorted(algo_keys | loop_keys)}")
    try:
        grpo = GRPOConfig(**{k: v for k, v in raw.items() if k in algo_keys})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config error at `rl`: {e}") from None
    return grpo, LoopConfig(**{k: v for k, v in raw.items() if k in loop_keys})


def check_layout(grpo: GRPOConfig, cfg, dp: int) -> None:
    if cfg.parallel.cp != 1:
        raise ValueError("config error at `parallel.cp`: GRPO shards prompts over data-parallel ranks only; use cp=1")
    for key in ("train_prompts_per_step", "rollout_prompts_per_batch"):
        if getattr(grpo, key) % dp:
            raise ValueError(f"config error at `rl.{key}`: {getattr(grpo, key)} is not a multiple of the {dp} ranks")


def prompt_loader(loop: LoopConfig):
    """`build_loader` for training.trainer.setup: this rank's PromptStream, saved and restored with
    checkpoints in the data loader's place."""

    def build(cfg, d, tokenizer):
        return PromptStream(cfg.data, tokenizer, rank=d.dp_rank, world_size=d.dp, seed=cfg.train.seed,
                            enable_thinking=loop.enable_thinking, max_prompt_tokens=loop.max_prompt_tokens)

    return build


# ----------------------------------------------------------------------------- rollouts


REWARD_NAMES = sorted(REWARDS)


def collect(run, grpo: GRPOConfig, loop: LoopConfig, generator: torch.Generator) -> tuple[RolloutGroups, dict]:
    """This rank's share of the train batch (groups with reward variance) and the step's rollout
    metrics over every group generated on every rank."""
    d, dp = run.d, run.d.dp
    local = dataclasses.replace(grpo, train_prompts_per_step=grpo.train_prompts_per_step // dp, on_underfilled="warn")
    generated: list[RolloutGroups] = []
    special = run.loader.cfg.special_tokens

    def generate_batch(_: int) -> RolloutGroups:
        prompts = run.loader.take(grpo.rollout_prompts_per_batch // dp)
        groups = generate_groups(model, prompts, grpo, run.tokenizer, generator=generator,
                                 stop_id=special.end_of_turn_token_id, pad_id=special.pad_token_id,
                                 batch_size=loop.generation_batch_size, enable_thinking=loop.enable_thinking)
        generated.append(groups)
        return groups

    start = time.perf_counter()
    with generation_mode(run.module) as model, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderfilledBatchWarning)  # decided below over all ranks
        kept, fill = fill_train_batch(generate_batch, local)
    seconds = time.perf_counter() - start

    everything = RolloutGroups.cat(generated)
    stats = rollout_sums(everything) + [sum(item.task == t for item in kept.items) for t in TASKS]
    num_kept, num_zero = len(kept), int((~zero_variance_mask(everything.rewards, grpo.zero_std_tol)).sum())
    sums = all_reduce_sum([num_kept, num_zero, len(everything)] + stats, d.device)
    # every task of the mixture, 0 when none of its groups was kept this step
    mixture_tasks = {t for t, w in run.loader.cfg.mixture.items() if w > 0}
    kept_per_task = {f"train_groups/{t}": int(n) for t, n in zip(TASKS, sums[-len(TASKS):]) if n or t in mixture_tasks}
    sums = sums[: -len(TASKS)]
    maxima = all_reduce_max([fill["num_gen_batches"], seconds, stats[4]], d.device)
    total_kept, total_zero, total_groups = sums[:3]
    if total_kept < grpo.train_prompts_per_step:
        message = (f"step {run.step + 1}: only {int(total_kept)}/{grpo.train_prompts_per_step} groups with reward "
                   f"variance after {int(maxima[0])} rollout batches ({int(total_zero)}/{int(total_groups)} had zero std)")
        if grpo.on_underfilled == "fail":
            raise RuntimeError(message + "; raise rl.max_gen_batches or set rl.on_underfilled=warn")
        if d.is_main:
            warnings.warn(message + "; training on them", UnderfilledBatchWarning, stacklevel=2)
    metrics = rollout_metrics(sums[3:], maxima[2])
    metrics.update({"frac_zero_std_groups": total_zero / max(total_groups, 1), "num_gen_batches": int(maxima[0]),
                    "num_train_groups": int(total_kept), "gen_tokens_per_s": metrics.pop("_gen_tokens") / max(maxima[1], 1e-9),
                    "rollout_s": maxima[1], **kept_per_task})
    return kept, metrics


def rollout_sums(groups: RolloutGroups) -> list[float]:
    """Sums over this rank's completions, in a fixed layout every rank shares (for one all-reduce):
    [n, sum r, sum r^2, sum length, max length, clipped, (sum, count) per reward name, per task]."""
    lengths = [len(t) for item in groups.items for t in item.completions]
    finished = [f for item in groups.items for f in item.finished]
    r = groups.rewards.double().flatten()
    out = [float(r.numel()), float(r.sum()), float((r * r).sum()), float(sum(lengths)), float(max(lengths, default=0)),
           float(sum(not f for f in finished))]
    per_reward = {n: [0.0, 0.0] for n in REWARD_NAMES}
    per_task = {t: [0.0, 0.0] for t in TASKS}
    for item in groups.items:
        for reward, parts in zip(item.rewards, item.parts):
            if item.task in per_task:
                per_task[item.task][0] += reward
                per_task[item.task][1] += 1
            for name, value in parts.items():
                per_reward[name][0] += value
                per_reward[name][1] += 1
    for pair in list(per_reward.values()) + list(per_task.values()):
        out += pair
    return out


def rollout_metrics(sums: list[float], max_length: float) -> dict:
    n, s, s2, length, _, clipped = sums[:6]
    mean = s / max(n, 1)
    row = {"reward_mean": mean, "reward_std": math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0)),
           "response_length_mean": length / max(n, 1), "response_length_max": int(max_length),
           "response_clipped_ratio": clipped / max(n, 1), "_gen_tokens": length}
    pairs = sums[6:]
    for i, name in enumerate(REWARD_NAMES):
        if pairs[2 * i + 1]:
            row[f"reward/{name}"] = pairs[2 * i] / pairs[2 * i + 1]
    offset = 2 * len(REWARD_NAMES)
    for i, task in enumerate(TASKS):
        if pairs[offset + 2 * i + 1]:
            row[f"reward_task/{task}"] = pairs[offset + 2 * i] / pairs[offset + 2 * i + 1]
    return row


# ----------------------------------------------------------------------------- update


@dataclass
class Packed:
    """Prompt + completion sequences packed into one row (documents separated by cu_seqlens), and
    where their response tokens sit in an [n, T] layout (T: the longest completion)."""

    input_ids: torch.Tensor  # [1, total]
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    pred_index: torch.Tensor  # [R] positions whose logits predict a response token
    targets: torch.Tensor  # [R] those response tokens
    rows: torch.Tensor  # [R]
    cols: torch.Tensor  # [R]
    mask: torch.Tensor  # [n, T] bool
    advantages: torch.Tensor  # [n]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_response_tokens(self) -> int:
        return self.targets.numel()

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        """[R] -> [n, T], zeros where there is no response token."""
        return values.new_zeros(self.mask.shape).index_put((self.rows, self.cols), values)


def pack(sequences: list[tuple], device) -> Packed:
    """sequences: (Prompt, completion token ids, advantage); an empty list packs a 2-token dummy."""
    ids, cu, pred, targets, rows, cols, pixels, grids = [], [0], [], [], [], [], [], []
    for i, (prompt, completion, _) in enumerate(sequences):
        offset, P, C = cu[-1], len(prompt.input_ids), len(completion)
        ids += list(prompt.input_ids) + list(completion)
        pred += range(offset + P - 1, offset + P + C - 1)
        targets += completion
        rows += [i] * C
        cols += range(C)
        cu.append(offset + P + C)
        if prompt.pixel_values is not None:
            pixels.append(prompt.pixel_values)
            grids.append(prompt.image_grid_thw)
    if not sequences:
        ids, cu = [0, 0], [0, 2]
    T = max((len(c) for _, c, _ in sequences), default=0)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    mask[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
    long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Packed(long(ids)[None], torch.tensor(cu, dtype=torch.int32, device=device),
                  torch.cat(pixels).to(device) if pixels else None, torch.cat(grids).to(device) if grids else None,
                  long(pred), long(targets), long(rows), long(cols), mask.to(device),
                  torch.tensor([a for _, _, a in sequences], dtype=torch.float32, device=device))


def response_logits(model, packed: Packed, temperature: float) -> torch.Tensor:
    """Logits [R, V] (fp32, divided by the sampling temperature) at the positions predicting the response."""
    out = model(packed.input_ids, packed.pixel_values, packed.image_grid_thw, cu_seqlens=packed.cu_seqlens,
                return_logits=True)
    return out.logits[0, packed.pred_index].float() / (temperature if temperature > 0 else 1.0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _share(packed: Packed, mode: str, totals: dict) -> float:
    """This micro-batch's weight in the step loss: its count over the global count of the mode's unit."""
    if mode == "token-mean":
        return packed.num_response_tokens / max(totals["tokens"], 1)
    return packed.mask.any(-1).sum().item() / max(totals["sequences"], 1)


def _sequences(groups: RolloutGroups, grpo: GRPOConfig) -> list[tuple]:
    advantages, _ = group_advantages(groups.rewards, grpo.adv_eps, grpo.norm_adv_by_std)
    return [(item.prompt, completion, float(a))
            for item, row in zip(groups.items, advantages) for completion, a in zip(item.completions, row)]


def update(run, groups: RolloutGroups, grpo: GRPOConfig, reference=None) -> dict:
    """Old (and reference) log-probs once, then `update_epochs` optimizer steps over this rank's
    sequences, every rank running the same number of micro-batches (zero-loss ones where it has none)."""
    d, mbs = run.d, run.cfg.train.micro_batch_size
    sequences = _sequences(groups, grpo)
    chunks = [pack(sequences[i : i + mbs], d.device) for i in range(0, len(sequences), mbs)]
    n_micro = int(all_reduce_max([len(chunks)], d.device)[0])
    counts = all_reduce_sum([sum(c.num_response_tokens for c in chunks), sum(len(s[1]) > 0 for s in sequences),
                             sum(c.num_tokens for c in chunks)], d.device)
    totals = {"tokens": counts[0], "sequences": counts[1]}
    row = {"tokens": int(counts[2]), "loss": 0.0, "grad_norm": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0,
           "kl": 0.0, "entropy": 0.0, "skipped_steps": 0, "update_tokens": int(counts[2]) * grpo.update_epochs}
    if n_micro == 0:  # no rank has a group with reward variance: nothing to learn from this step
        return row
    micro = [chunks[k] if k < len(chunks) else None for k in range(n_micro)]
    dummy = pack([], d.device)
    old, ref, entropy = [], [], 0.0
    with torch.no_grad():
        for c in micro:
            logits = response_logits(run.model, c or dummy, grpo.temperature)
            if c is not None:
                old.append(token_logprobs(logits, c.targets))
                entropy += entropy_from_logits(logits).sum().item()
        for c in micro if reference is not None else ():
            logits = response_logits(reference, c or dummy, grpo.temperature)
            if c is not None:
                ref.append(token_logprobs(logits, c.targets))
    sums = torch.zeros(5, dtype=torch.float64)  # loss, clipped tokens, approx-KL sum, ref-KL sum, grad norm
    for _ in range(grpo.update_epochs):
        epoch = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, clipped, approx_kl, kl, non-finite micro-batches
        for k, c in enumerate(micro):
            if run.is_deepspeed:
                run.model.set_gradient_accumulation_boundary(k == n_micro - 1)
            logits = response_logits(run.model, c or dummy, grpo.temperature)
            if c is None:
                loss = logits.sum() * 0.0
            else:
                loss, m = micro_batch_loss(logits, c, old[k], ref[k] if ref else None, grpo)
                loss = loss * _share(c, grpo.loss_agg, totals)
                n = c.num_response_tokens
                epoch = [epoch[0] + loss.item(), epoch[1] + m["clip_fraction"].item() * n,
                         epoch[2] + m["approx_kl"].item() * n, epoch[3] + m["kl_sum"], epoch[4] + (not torch.isfinite(loss))]
            scaled = loss * d.world  # FSDP and DeepSpeed average gradients over the ranks
            run.model.backward(scaled, scale_wrt_gas=False) if run.is_deepspeed else scaled.backward()
        epoch = all_reduce_sum(epoch, d.device)
        grad_norm, finite = optimizer_step(run, epoch[4] == 0)
        row["skipped_steps"] += not finite
        sums += torch.tensor(epoch[:4] + [grad_norm], dtype=torch.float64)
    per_epoch, per_token = sums / grpo.update_epochs, sums / (grpo.update_epochs * max(totals["tokens"], 1))
    row.update({"loss": per_epoch[0].item(), "grad_norm": grad_norm, "clip_fraction": per_token[1].item(),
                "approx_kl": per_token[2].item(), "kl": per_token[3 if reference is not None else 2].item(),
                "entropy": all_reduce_sum([entropy], d.device)[0] / max(totals["tokens"], 1)})
    return row


def micro_batch_loss(logits: torch.Tensor, c: Packed, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                     grpo: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + kl_coef * k3 KL to the reference - entropy_coef * entropy, aggregated
    over this micro-batch per grpo.loss_agg (the caller weighs it by its share of the step)."""
    logp = c.padded(token_logprobs(logits, c.targets))
    loss, metrics = policy_loss(logp, c.padded(old_logp), c.advantages, c.mask, grpo)
    metrics["kl_sum"] = 0.0
    if ref_logp is not None:
        kl = kl_k3(logp, c.padded(ref_logp))
        loss = loss + grpo.kl_coef * agg_loss(kl, c.mask, grpo.loss_agg)
        metrics["kl_sum"] = kl[c.mask].sum().item()
    if grpo.entropy_coef:
        loss = loss - grpo.entropy_coef * agg_loss(c.padded(entropy_from_logits(logits)), c.mask, grpo.loss_agg)
    return loss, metrics


def optimizer_step(run, finite: bool) -> tuple[float, bool]:
    """Clip and step (a non-finite loss or gradient norm skips the step on every rank alike)."""
    tc = run.cfg.train
    if run.is_deepspeed:
        if not finite:
            lrs = [g["lr"] for g in run.optimizer.param_groups]
            for g in run.optimizer.param_groups:
                g["lr"] = 0.0  # DeepSpeed steps at the boundary regardless; make it a no-op on the weights
        run.model.step()
        if not finite:
            for g, lr in zip(run.optimizer.param_groups, lrs):
                g["lr"] = lr
        return float(run.model.get_global_grad_norm() or 0.0), finite
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.module.parameters(), tc.grad_clip))
    finite = finite and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def build_reference(run):
    """The frozen reference policy for the KL term: the initial weights (init_from, or the seeded
    initialization), sharded like the policy."""
    from training.trainer import build_parallel_model, load_initial_weights

    reference = build_parallel_model(run.cfg, run.d)
    if run.cfg.init_from:
        load_initial_weights(run.cfg, reference)
    reference.requires_grad_(False)
    return reference


# ----------------------------------------------------------------------------- evaluation


class HeldoutReward:
    """Mean reward of one completion per held-out prompt (greedy by default), per task and overall:
    `eval/reward`, `eval/reward_task/<task>`, `eval/response_length_mean`."""

    def __init__(self, run, grpo: GRPOConfig, loop: LoopConfig):
        self.loop = loop
        self.grpo = dataclasses.replace(grpo, temperature=loop.eval_temperature, presence_penalty=loop.eval_presence_penalty)
        self.prompts = heldout_prompts(run.loader.cfg, run.tokenizer, loop.eval_prompts_per_source, run.d.dp_rank,
                                       run.d.dp, loop.enable_thinking)

    def __call__(self, run) -> dict:
        special = run.loader.cfg.special_tokens
        prompts = [p for p in self.prompts for _ in range(self.loop.eval_samples)]
        generator = torch.Generator().manual_seed(run.d.rank)  # the same draws at every evaluation
        with generation_mode(run.module) as model:
            tokens, _ = sample_completions(model, prompts, self.grpo, stop_id=special.end_of_turn_token_id,
                                           pad_id=special.pad_token_id, generator=generator,
                                           batch_size=self.loop.generation_batch_size)
        rewards = [[] for _ in TASKS]
        lengths = 0
        for prompt, toks in zip(prompts, tokens):
            text = decode(run.tokenizer, toks, special.end_of_turn_token_id)
            reward, _ = score_completion(text, prompt, self.grpo, self.loop.enable_thinking)
            rewards[TASKS.index(prompt.sample.task)].append(reward)
            lengths += len(toks)
        sums = all_reduce_sum([v for r in rewards for v in (sum(r), len(r))] + [lengths], run.d.device)
        total = sum(sums[0:-1:2])
        count = sum(sums[1:-1:2])
        row = {"eval/reward": total / max(count, 1), "eval/response_length_mean": sums[-1] / max(count, 1)}
        for i, task in enumerate(TASKS):
            if sums[2 * i + 1]:
                row[f"eval/reward_task/{task}"] = sums[2 * i] / sums[2 * i + 1]
        return row


# ----------------------------------------------------------------------------- the loop


def train(run, grpo: GRPOConfig, loop: LoopConfig) -> None:
    """Step: rollouts, update, log, evaluate, checkpoint; stops at train.steps, train.stop_after or SIGTERM."""
    from training.trainer import save_checkpoint

    cfg, d = run.cfg, run.d
    check_layout(grpo, cfg, d.dp)
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "preempted", True))
    # Every trainable parameter gets a gradient at every step, text-only ones included (a blank image
    # through the vision tower, times zero): the optimizer state then covers every parameter from the
    # first step, as a checkpoint's must for resuming, and data-parallel ranks run the same collectives.
    run.module.vision_in_every_step = True
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + d.rank)  # per rank: different samples
    if "generator" in run.extra_state:
        generator.set_state(run.extra_state["generator"])
    reference = build_reference(run) if grpo.kl_coef > 0 else None
    evaluate = HeldoutReward(run, grpo, loop) if loop.eval_prompts_per_source > 0 else None
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    if evaluate is not None and loop.eval_at_start and run.step == 0:
        run.metrics.log({"step": 0, **evaluate(run)})
    while run.step < last and not run.preempted:
        start = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        groups, rollout = collect(run, grpo, loop, generator)
        update_start = time.perf_counter()
        result = update(run, groups, grpo, reference)
        run.scheduler.step()
        now = time.perf_counter()
        run.step += 1
        run.tokens += result["tokens"]
        run.bad_steps += result["skipped_steps"]
        row = {"step": run.step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"], "tokens": run.tokens,
               "tokens_per_s": result["tokens"] / max(now - start, 1e-9),
               "skipped_samples": sum(run.loader.skipped.values()), "skipped_steps": run.bad_steps,
               **rollout, **{k: result[k] for k in ("entropy", "clip_fraction", "approx_kl", "kl")},
               "train_tokens_per_s": result.get("update_tokens", 0) / max(all_reduce_max([now - update_start], d.device)[0], 1e-9)}
        if evaluate is not None and ((cfg.eval.every and run.step % cfg.eval.every == 0) or run.step == cfg.train.steps):
            row.update(evaluate(run))
        if run.step % cfg.train.log_every == 0 or run.step == last:
            run.metrics.log(row)
        if run.step % cfg.checkpoint.every == 0 or run.step == last or run.preempted:
            run.extra_state["generator"] = generator.get_state()
            save_checkpoint(run)
    run.metrics.close()
