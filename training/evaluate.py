"""Held-out evaluation: loss per task on the held-out split, averaged over ranks (during training),
or of any model on any batches (training/report.py)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch

from .context_parallel import whole_sequence_attention
from .distributed import all_reduce_sum


def heldout_loss(run) -> dict:
    """{'eval/loss': ..., 'eval/loss/<task>': ...} over cfg.eval.batches held-out batches per rank."""
    from data.mixture import build_loader

    cfg, d = run.cfg, run.d
    if run.heldout is None:  # the same held-out batches at every evaluation
        loader = build_loader(cfg.data, tokenizer=run.tokenizer, rank=d.dp_rank, world_size=d.dp, seed=0,
                              micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, split="heldout")
        run.heldout = (loader, loader.state_dict())
    loader, start = run.heldout
    loader.load_state_dict(start)
    # with context parallelism every rank of a cp group evaluates its dp rank's whole batches (the
    # group's ranks count them alike, which the ratios in loss_row cancel)
    with whole_sequence_attention(run.module) if d.cp > 1 else nullcontext():
        sums = task_loss_sums(run.model, (b for _, b in zip(range(cfg.eval.batches), loader)), d.device, run.module)
    return loss_row(all_reduce_sum(sums, d.device))


def task_loss_sums(model, batches: Iterable, device, module=None) -> list[float]:
    """[loss sum, label tokens] per task of data.schema.TASKS, flattened, over `batches` (eval mode,
    no gradients; the model's training mode is restored). `model` is what the forward goes through
    (an engine's `model`), `module` the network itself (default: `model`)."""
    module = module or model
    was_training = module.training
    sums = new_task_sums()
    module.eval()
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            out = model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, labels=batch.labels,
                        position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, return_logits=False)
            add_task_losses(sums, out.token_loss, batch.task_ids)
    module.train(was_training)
    return sums.flatten().tolist()


def new_task_sums() -> torch.Tensor:
    """[len(TASKS), 2] float64 zeros: loss sum and label tokens per task of data.schema.TASKS."""
    from data.schema import TASKS

    return torch.zeros(len(TASKS), 2, dtype=torch.float64)


def add_task_losses(sums: torch.Tensor, token_loss: torch.Tensor, task_ids: torch.Tensor) -> None:
    """Add each task's loss sum and label-token count (tokens with a loss) to `sums`."""
    has = token_loss != 0
    task_ids = task_ids.to(token_loss.device)
    for i in task_ids[has].unique().tolist():
        sel = has & (task_ids == i)
        sums[i, 0] += token_loss[sel].sum().item()
        sums[i, 1] += int(sel.sum())


def task_means(flat: list[float]) -> dict:
    """{task: mean loss} for the tasks with label tokens, from flattened sums."""
    from data.schema import TASKS

    return {t: flat[2 * i] / flat[2 * i + 1] for i, t in enumerate(TASKS) if flat[2 * i + 1] > 0}


def loss_row(flat: list[float]) -> dict:
    """The metrics row of task_loss_sums' numbers: mean loss per task and over all label tokens."""
    row = {f"eval/loss/{t}": v for t, v in task_means(flat).items()}
    row["eval/loss"] = sum(flat[0::2]) / max(sum(flat[1::2]), 1)
    return row
