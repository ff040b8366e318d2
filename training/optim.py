"""AdamW with parameter groups (no weight decay on norms, biases, embeddings; a learning rate per
module: vision tower, merger, language model), freeze flags, and warmup + cosine / WSD schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

MODULES = {
    "vision": lambda n: n.startswith("visual.") and not n.startswith("visual.merger."),
    "merger": lambda n: n.startswith("visual.merger."),
    "mtp": lambda n: n.startswith("mtp."),
    "language_model": lambda n: n.startswith(("language_model.", "lm_head.")),
}


def module_of(name: str) -> str:
    name = name.replace("_checkpoint_wrapped_module.", "")
    return next(m for m, match in MODULES.items() if match(name))


def no_decay(name: str, p: torch.Tensor) -> bool:
    ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter's own shape is its empty placeholder
    return ndim < 2 or "embed_tokens" in name or name.endswith(".bias")


def build_optimizer(model: nn.Module, tc, fused: bool = False) -> torch.optim.Optimizer:
    """tc: the `train` config node. Frozen modules get requires_grad=False and no group. `fused`: one
    fused kernel for the whole update (CUDA); otherwise the per-parameter loop."""
    lrs = {"vision": tc.lr_vision or tc.lr, "merger": tc.lr_merger or tc.lr, "language_model": tc.lr, "mtp": tc.lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        module = module_of(name)
        if module in tc.freeze:
            p.requires_grad_(False)
            continue
        groups.setdefault((module, no_decay(name, p)), []).append(p)
    param_groups = [
        {"params": ps, "lr": lrs[m], "initial_lr": lrs[m], "weight_decay": 0.0 if nd else tc.weight_decay, "name": f"{m}{'/no_decay' if nd else ''}"}
        for (m, nd), ps in sorted(groups.items())
    ]
    if not param_groups:
        raise ValueError("config error at `train.freeze`: every module is frozen, nothing to train")
    if fused:
        return torch.optim.AdamW(param_groups, betas=tuple(tc.betas), fused=True)
    return torch.optim.AdamW(param_groups, betas=tuple(tc.betas), foreach=False)


def lr_factor(step: int, tc) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    total, warmup, floor = tc.steps, tc.warmup_steps, tc.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if tc.schedule == "constant":
        return 1.0
    if tc.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = int(total * (1 - tc.decay_fraction))  # wsd: warmup, stable, then linear decay
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / max(1, total - decay_start))


def build_scheduler(optimizer: torch.optim.Optimizer, tc):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))
