"""GRPO: group advantages, zero-variance filtering with a capped refill loop, clipped policy loss.

Pure functions with one signature each; every knob is a `GRPOConfig` field set by the recipe.
Shapes: n groups of G completions per prompt; N sequences of T tokens; masks are 1 on response
tokens. One update composes the pieces as

    loss, metrics = policy_loss(logp, old_logp, advantages, mask, cfg)
    loss = loss + cfg.kl_coef * agg_loss(kl_k3(logp, ref_logp), mask, cfg.loss_agg)
    loss = loss - cfg.entropy_coef * agg_loss(entropy_from_logits(logits), mask, cfg.loss_agg)

with `old_logp` computed once per rollout batch and reused for all `cfg.update_epochs`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from training.rewards import TASK_REWARDS

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
UNDERFILLED_MODES = ("warn", "fail")


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions per prompt (G)
    clip_eps_low: float = 0.2  # ratio clipped to [1 - clip_eps_low, 1 + clip_eps_high]
    clip_eps_high: float = 0.28  # higher than low ("clip-higher"): rare tokens can still grow
    loss_agg: str = "token-mean"  # one of LOSS_AGG_MODES
    adv_eps: float = 1e-6
    norm_adv_by_std: bool = True  # False: advantages are r - mean (Dr. GRPO)
    zero_std_tol: float = 1e-6  # groups with reward std <= this carry no signal and are dropped
    max_gen_batches: int = 4  # cap on rollout batches generated to fill one train batch
    on_underfilled: str = "warn"  # cap reached with too few groups: "warn" (train on them) | "fail"
    kl_coef: float = 0.0  # weight of the k3 KL to the frozen reference; 0 skips the reference
    entropy_coef: float = 0.0
    update_epochs: int = 1  # optimizer passes over one rollout batch (old log-probs fixed)
    temperature: float = 1.0  # sampling knobs; on-policy by default: the loss scores samples under the
    top_p: float = 1.0  # model's own distribution, which top-p or a presence penalty would change
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0  # the model card's 1.5 (with top_p 0.95) is for serving
    max_new_tokens: int = 1024
    train_prompts_per_step: int = 16  # groups (prompts) in one train batch
    rollout_prompts_per_batch: int = 16  # prompts per generate call
    reward_weights: dict[str, dict[str, float]] = field(
        default_factory=lambda: copy.deepcopy(TASK_REWARDS))

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg={self.loss_agg!r}; choose one of {LOSS_AGG_MODES}")
        if self.on_underfilled not in UNDERFILLED_MODES:
            raise ValueError(
                f"on_underfilled={self.on_underfilled!r}; choose one of {UNDERFILLED_MODES}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: one completion has no variance")
        if self.max_gen_batches < 1 or self.train_prompts_per_step < 1:
            raise ValueError("max_gen_batches and train_prompts_per_step must be >= 1")
        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ValueError("need 0 <= clip_eps_low < 1 and clip_eps_high >= 0")


# ----------------------------------------------------------------------------- advantages


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Per-group population std (unbiased=False) of rewards [n, G] -> [n].

    verl uses the unbiased std; the population std makes every non-constant group's advantages
    have unit root-mean-square whatever G is, and the same std drives the zero-variance filter.
    """
    return rewards.std(dim=-1, unbiased=False)


def group_advantages(rewards: torch.Tensor, eps: float, norm_by_std: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r - group mean) / (group std + eps) for rewards [n, G] -> (advantages [n, G], std [n])."""
    std = group_std(rewards)
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    return (centered / (std[:, None] + eps) if norm_by_std else centered), std


def zero_variance_mask(rewards: torch.Tensor, tol: float) -> torch.Tensor:
    """Bool [n]: True for groups to keep (std > tol). A tolerance, not equality: rewards such as
    OCR similarity are continuous and float noise must not count as signal."""
    return group_std(rewards) > tol


# ----------------------------------------------------------------------------- filtering and refill


@dataclass
class RolloutGroups:
    """n prompts' rollouts: rewards [n, G] and one opaque item per group (prompt, token ids,
    task, ...), kept in step with the rewards through filtering and concatenation."""

    rewards: torch.Tensor
    items: list[Any]

    def __post_init__(self):
        if self.rewards.dim() != 2 or self.rewards.shape[0] != len(self.items):
            raise ValueError(f"rewards must be [n_groups, G] with one item per group; got "
                             f"{tuple(self.rewards.shape)} and {len(self.items)} items")

    def __len__(self) -> int:
        return len(self.items)

    def select(self, index: torch.Tensor | slice) -> RolloutGroups:
        """The groups picked by a bool mask [n] or a slice, in order."""
        if isinstance(index, slice):
            return RolloutGroups(self.rewards[index], self.items[index])
        if index.dtype != torch.bool:
            raise TypeError("select takes a bool mask or a slice")
        positions = index.nonzero().flatten().tolist()
        return RolloutGroups(self.rewards[index], [self.items[i] for i in positions])

    @staticmethod
    def cat(parts: list[RolloutGroups]) -> RolloutGroups:
        items = [item for p in parts for item in p.items]
        return RolloutGroups(torch.cat([p.rewards for p in parts]), items)


class UnderfilledBatchWarning(RuntimeWarning):
    """`max_gen_batches` was reached before `train_prompts_per_step` groups had reward variance."""


def fill_train_batch(generate_batch: Callable[[int], RolloutGroups], cfg: GRPOConfig
                     ) -> tuple[RolloutGroups, dict[str, float]]:
    """Generate rollout batches `generate_batch(0), generate_batch(1), ...` until
    `cfg.train_prompts_per_step` groups with reward variance are kept, at most `cfg.max_gen_batches`
    calls. Extras beyond the target are dropped (the earliest groups are kept).

    Returns the kept groups and metrics: `frac_zero_std_groups` (over every generated group),
    `num_gen_batches`, `num_train_groups`. Too few groups at the cap warns (and returns what there
    is, possibly nothing) or raises, per `cfg.on_underfilled`. Under data parallelism,
    `generate_batch` should return the gathered groups of all ranks so every rank decides alike.
    """
    target = cfg.train_prompts_per_step
    kept, num_kept, num_generated, num_zero_std = [], 0, 0, 0
    for num_batches in range(1, cfg.max_gen_batches + 1):
        batch = generate_batch(num_batches - 1)
        keep = zero_variance_mask(batch.rewards, cfg.zero_std_tol)
        kept.append(batch.select(keep))
        num_kept += int(keep.sum())
        num_generated += len(batch)
        num_zero_std += len(batch) - int(keep.sum())
        if num_kept >= target:
            break
    groups = RolloutGroups.cat(kept).select(slice(0, target))
    metrics = {"frac_zero_std_groups": num_zero_std / max(num_generated, 1),
               "num_gen_batches": num_batches, "num_train_groups": len(groups)}
    if len(groups) < target:
        message = (f"only {len(groups)}/{target} groups with reward variance after "
                   f"{num_batches} rollout batches ({num_zero_std}/{num_generated} had zero std)")
        if cfg.on_underfilled == "fail":
            raise RuntimeError(message + "; raise max_gen_batches or set on_underfilled=warn")
        warnings.warn(message + "; training on them", UnderfilledBatchWarning, stacklevel=2)
    return groups, metrics


# ----------------------------------------------------------------------------- losses


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is set (0 where nothing is); masked-out values may be inf or NaN."""
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=dim)
    return total / mask.sum(dim=dim).clamp_min(1)


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss [N, T] to a scalar.

    token-mean           every response token of the batch weighs the same (long answers count more)
    seq-mean-token-mean  mean per sequence, then over sequences (every sequence weighs the same)
    seq-mean-token-sum   sum per sequence, then mean over sequences
    Sequences without any response token are left out of the sequence means.
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    has_tokens = mask.bool().any(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_seq = torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(dim=-1)
    else:
        raise ValueError(f"loss_agg={mode!r}; choose one of {LOSS_AGG_MODES}")
    return masked_mean(per_seq, has_tokens)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from tokens sampled by the policy:
    exp(ref - logp) - (ref - logp) - 1, never negative, unbiased (Schulman's k3)."""
    delta = (ref_logp - logp).clamp(-20.0, 20.0)  # keeps exp finite when the two drift far apart
    return delta.exp() - delta - 1.0


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, [..., V] -> [...]; logits must be finite."""
    log_p = logits.log_softmax(dim=-1)  # log-space: exact for large logits, unlike lse - E[z]
    return -(log_p.exp() * log_p).sum(dim=-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cfg: GRPOConfig
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = p / p_old.

    logp, old_logp, mask: [N, T]; advantages: [N] (one per sequence) or [N, T]. Returns the loss
    aggregated per `cfg.loss_agg` and detached scalar metrics: `clip_fraction` (response tokens
    whose gradient the clip removes), `approx_kl` (k3 of KL(old || new)), `ratio_mean`.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    # Masked positions (padding) may hold -inf log-probs; zero them before exp so that neither
    # the loss nor its gradient sees inf * 0.
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp)).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = agg_loss(torch.maximum(unclipped, clipped), mask, cfg.loss_agg)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logp.detach(), logp.detach()), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics
