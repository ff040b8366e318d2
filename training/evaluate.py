"""Held-out evaluation: loss per task on the held-out split, averaged over ranks (during training),
or of any model on any batches (training/report.py)."""

from __future__ import annotations

from typing import Iterable

import torch

from .distributed import all_reduce_sum


def heldout_loss(run) -> dict:
    """{'eval/loss': ..., 'eval/loss/<task>': ...} over cfg.eval.batches held-out batches per rank,
    each forward the training step's (under context parallelism every rank of a cp group computes its
    shard of the sequence, as in training)."""
    from data.mixture import build_loader

    from .trainer import model_forward

    cfg, d = run.cfg, run.d
    if run.heldout is None:  # the same held-out batches at every evaluation (Loader.first), its workers kept
        run.heldout = build_loader(cfg.data, tokenizer=run.tokenizer, rank=d.dp_rank, world_size=d.dp, seed=0,
                                   micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, split="heldout")
    forward = lambda batch: model_forward(run, batch)  # noqa: E731
    return loss_row(all_reduce_sum(task_loss_sums(forward, run.heldout.first(cfg.eval.batches), run.module), d.device))


def model_sums(model, batches: Iterable, device) -> list[float]:
    """task_loss_sums of a plain model (one process) over `batches` on `device`."""

    def forward(batch):
        batch = batch.to(device)
        out = model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, labels=batch.labels,
                    position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, return_logits=False)
        return out, batch.task_ids

    return task_loss_sums(forward, batches, model)


def task_loss_sums(forward, batches: Iterable, module) -> list[float]:
    """[loss sum, label tokens] per task of data.schema.TASKS, flattened, over `batches`;
    `forward(batch)` -> (model output, the task ids of its tokens). Eval mode, no gradients; the
    module's training mode is restored."""
    was_training = module.training
    sums = new_task_sums()
    module.eval()
    with torch.no_grad():
        for batch in batches:
            out, task_ids = forward(batch)
            add_task_losses(sums, out.token_loss, task_ids)
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
