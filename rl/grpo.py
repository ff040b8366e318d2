"""GRPO: group advantages, zero-variance filtering with a capped refill loop, clipped policy loss.

Pure functions with one signature each; every knob is a field of `training.config.RLCfg` (the
recipe's `rl:` node).
Shapes: n groups of G completions per prompt; N sequences of T tokens; masks are 1 on response
tokens. One update composes the pieces as

    loss, metrics = policy_loss(logp, old_logp, advantages, mask, cfg)
    loss = loss + cfg.kl_coef * agg_loss(kl_k3(logp, ref_logp), mask, cfg.loss_agg)
    loss = loss - cfg.entropy_coef * agg_loss(entropy_from_logits(logits), mask, cfg.loss_agg)

with `old_logp` the first epoch's log-probs, detached (that epoch runs the weights the rollouts sampled),
reused for all `cfg.update_epochs` (rl/update.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from training.config import CHOICES, RLCfg

LOSS_AGG_MODES = CHOICES["rl.loss_agg"]


# ----------------------------------------------------------------------------- advantages


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Per-group population std (unbiased=False) of rewards [n, G] -> [n].

    verl uses the unbiased std; the population std makes every non-constant group's advantages
    have unit root-mean-square whatever G is, and the same std drives the zero-variance filter.
    """
    if rewards.shape[-1] == 0 or rewards.numel() == 0:  # no groups (a step whose groups were all filtered)
        return rewards.new_zeros(rewards.shape[:-1])
    return rewards.std(dim=-1, unbiased=False)


def group_advantages(rewards: torch.Tensor, eps: float, norm_by_std: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r - group mean) / (group std + eps) for rewards [n, G] -> (advantages [n, G], std [n])."""
    std = group_std(rewards)
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    return (centered / (std[:, None] + eps) if norm_by_std else centered), std


def zero_variance_mask(signal: torch.Tensor, tol: float) -> torch.Tensor:
    """Bool [n]: True for groups to keep, whose signal [n, G] (RolloutGroups.signal: correctness by
    default) has std > tol (DAPO's 0 < correct < G for 0/1 correctness). A tolerance, not equality:
    OCR similarity and IoU are continuous and float noise must not count as signal."""
    return group_std(signal) > tol


# ----------------------------------------------------------------------------- filtering and refill


@dataclass
class RolloutGroups:
    """n prompts' rollouts: rewards [n, G] (what the advantages are computed from), the signal [n, G]
    whose per-group spread decides which groups train (`rl.filter_on`: each task's correctness by
    default, so a group that differs only in format is dropped; None: the rewards), and one opaque
    item per group (prompt, token ids, task, ...), kept in step through filtering and concatenation."""

    rewards: torch.Tensor
    items: list[Any]
    signal: torch.Tensor | None = None

    def __post_init__(self):
        if self.rewards.dim() != 2 or self.rewards.shape[0] != len(self.items):
            raise ValueError(f"rewards must be [n_groups, G] with one item per group; got "
                             f"{tuple(self.rewards.shape)} and {len(self.items)} items")
        if self.signal is None:
            self.signal = self.rewards
        if self.signal.shape != self.rewards.shape:
            raise ValueError(f"signal {tuple(self.signal.shape)} must be shaped like rewards {tuple(self.rewards.shape)}")

    def __len__(self) -> int:
        return len(self.items)

    def select(self, index: torch.Tensor | slice) -> RolloutGroups:
        """The groups picked by a bool mask [n] or a slice, in order."""
        if isinstance(index, slice):
            return RolloutGroups(self.rewards[index], self.items[index], self.signal[index])
        if index.dtype != torch.bool:
            raise TypeError("select takes a bool mask or a slice")
        positions = index.nonzero().flatten().tolist()
        return RolloutGroups(self.rewards[index], [self.items[i] for i in positions], self.signal[index])

    @staticmethod
    def cat(parts: list[RolloutGroups]) -> RolloutGroups:
        items = [item for p in parts for item in p.items]
        return RolloutGroups(torch.cat([p.rewards for p in parts]), items, torch.cat([p.signal for p in parts]))


class UnderfilledBatchWarning(RuntimeWarning):
    """`max_gen_batches` was reached before `train_prompts_per_step` groups had reward variance."""


def fill_train_batch(generate_batch: Callable[[int], RolloutGroups], cfg: RLCfg
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
        keep = zero_variance_mask(batch.signal, cfg.zero_std_tol)
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


KL_CLAMP = 10.0  # per-token k3 KL is clamped to [-KL_CLAMP, KL_CLAMP], as verl does


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from tokens sampled by the policy:
    exp(ref - logp) - (ref - logp) - 1, never negative, unbiased (Schulman's k3), clamped to
    [-KL_CLAMP, KL_CLAMP] so that one token where the two have drifted far apart (k3 grows like
    exp) cannot dominate the loss or its gradient."""
    delta = (ref_logp - logp).clamp(-20.0, 20.0)  # keeps exp finite before the clamp
    return (delta.exp() - delta - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, [..., V] -> [...]; logits must be finite."""
    log_p = logits.log_softmax(dim=-1)  # log-space: exact for large logits, unlike lse - E[z]
    return -(log_p.exp() * log_p).sum(dim=-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cfg: RLCfg
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = p / p_old,
    with dual-clip for negative advantages (`cfg.clip_ratio_c`, None: off): there the loss is also
    capped at -c A, so a token whose ratio has run far above 1 on a bad answer cannot push an
    unbounded gradient (Ye et al. 2020; verl's clip_ratio_c, default 3).

    logp, old_logp, mask: [N, T]; advantages: [N] (one per sequence) or [N, T]. Returns the loss
    aggregated per `cfg.loss_agg` and detached scalar metrics: `clip_fraction` (response tokens
    whose gradient the clip removes), `clip_fraction_lower` (tokens the dual clip caps), `approx_kl`
    (k3 of KL(old || new)), `ratio_mean`.
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
    per_token = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(mask)
    if cfg.clip_ratio_c is not None:
        bound = -advantages * cfg.clip_ratio_c
        capped = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
    loss = agg_loss(per_token, mask, cfg.loss_agg)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "clip_fraction_lower": masked_mean(capped.float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logp.detach(), logp.detach()), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics
