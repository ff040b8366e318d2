"""The training loop shared by pretraining, SFT and GRPO, and the set-up that feeds it.

    run = setup(cfg, build_loader)       # process groups, model, engine, data, metrics; resumes
    train(run, pretrain_step, evaluate)  # the loop; GRPO passes its own step function

`setup` builds everything a run needs (training/parallelize.py: the model on the meta device ->
parallelize -> materialize -> seeded init -> init_from; training/engine.py: optimizer and engine;
schedule, data, metrics) and resumes from the newest complete checkpoint in run_dir. `train` steps,
logs, evaluates and checkpoints, and stops at train.steps, at train.stop_after, or on SIGTERM at a
step every rank agrees on (with a checkpoint).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from model.vlm import Exaone45

from . import checkpoint as ckpt
from .distributed import Dist, all_reduce_max, all_reduce_sum, init_distributed
from .engine import Engine, build_engine
from .evaluate import add_task_losses, new_task_sums, task_means
from .metrics import Metrics, Throughput, decoder_flops_per_token, peak_flops
from .optim import build_scheduler
from .parallelize import build_module


@dataclass
class Run:
    cfg: Any
    d: Dist
    engine: Engine
    scheduler: Any
    loader: Any
    metrics: Metrics
    tokenizer: Any = None
    step: int = 0
    tokens: int = 0
    bad_steps_in_row: int = 0
    bad_steps: int = 0
    preempted: bool = False  # the ranks' agreed verdict (_stop_requested)
    sigterm: bool = False  # this rank received SIGTERM (set by the handler only, never reset)
    extra_state: dict = field(default_factory=dict)  # a step function's own resumable state
    heldout: Any = None  # the held-out loader once evaluation has run (training/evaluate.py)
    data_iter: Any = None  # the loader's iterator once pretrain_step has started it

    @property
    def module(self) -> Exaone45:
        return self.engine.module

    @property
    def model(self):
        """What the forward goes through (the DeepSpeed engine, or the module)."""
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


def setup(cfg, build_loader: Callable, d: Optional[Dist] = None) -> Run:
    """build_loader(cfg, d, tokenizer) -> loader with state_dict()/load_state_dict() and `.skipped`."""
    d = d or init_distributed(cfg.parallel.cp, cfg.parallel.timeout_s)
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
    resume = ckpt.latest_checkpoint(run_dir)
    module = build_module(cfg, d, with_init_from=resume is None)
    engine = build_engine(cfg, d, module)
    scheduler = build_scheduler(engine.optimizer, cfg.train)
    from data.text import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_loader(cfg, d, tokenizer)
    run = Run(cfg, d, engine, scheduler, loader, None, tokenizer)
    if resume is not None:
        extra = ckpt.load(resume, engine, d.rank)
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["data"])
        run.step, run.tokens, run.bad_steps = extra["step"], extra["tokens"], extra["bad_steps"]
        run.extra_state = extra.get("loop", {})
    run.metrics = Metrics(str(run_dir), cfg, d.is_main, cfg.train.steps, run.step, OmegaConf.to_container(cfg))
    if run.metrics.wandb is not None and cfg.wandb.log_images and run.step == 0:
        run.metrics.log_images(*sample_images(cfg, tokenizer, cfg.wandb.log_images))
    if resume is not None and d.is_main:
        print(f"resumed from {resume} at step {run.step}", flush=True)
    return run


def sample_images(cfg, tokenizer, n: int) -> tuple[list, list[str]]:
    """The first n training images of the mixture and the text around them, for the dashboard."""
    from data.mixture import build_sample_stream

    images, captions = [], []
    for _, sample in zip(range(50 * n), build_sample_stream(cfg.data, tokenizer=tokenizer)):
        segments = list(sample.segments) + [s for m in sample.messages or () for s in m.content]
        text = " ".join(s.text for s in segments if s.type == "text")[:300]
        for name in sample.image_names()[:1]:
            images.append(sample.load_image(name))
            captions.append(f"[{sample.task}] {text}")
        if len(images) >= n:
            break
    return images, captions


def save_checkpoint(run: Run) -> None:
    extra = {"step": run.step, "tokens": run.tokens, "bad_steps": run.bad_steps, "scheduler": run.scheduler.state_dict(),
             "data": run.loader.state_dict(), "loop": run.extra_state}
    ckpt.save(run.cfg.run_dir, run.step, run.engine, run.d.rank, extra, run.cfg.checkpoint.keep)


# --- the pretraining / SFT step -------------------------------------------------------------------


def model_forward(run: Run, batch):
    """(model output, task ids of the tokens it holds) of a packed batch: the whole batch, or with
    context parallelism this rank's shard of it (targets and positions computed before sharding)."""
    batch = batch.to(run.d.device)
    if run.d.cp == 1:
        out = run.model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, labels=batch.labels,
                        position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
        return out, batch.task_ids
    from .context_parallel import local_token_index, shard_batch

    ids, shard = shard_batch(run.module, batch, run.d.cp_group())
    task_ids = batch.task_ids
    return run.model(ids, shard=shard), task_ids[:, local_token_index(task_ids.shape[1], run.d.cp, run.d.cp_rank,
                                                                      task_ids.device)]


def forward_loss(run: Run, batch, global_tokens: float, global_mtp_tokens: float):
    """This micro-batch's share of the step loss, normalized by the real label tokens of the whole
    step across ranks and micro-batches (then scaled by the ranks the engine averages over), the
    model output and its tokens' task ids."""
    out, task_ids = model_forward(run, batch)
    loss = out.lm_loss_sum / max(global_tokens, 1)
    if out.mtp_loss_sum is not None:
        loss = loss + run.module.cfg.mtp_loss_weight * out.mtp_loss_sum / max(global_mtp_tokens, 1)
    return loss * run.engine.loss_scale, out, task_ids


def pretrain_step(run: Run) -> dict:
    """One optimizer step over train.grad_accum micro-batches of the data loader; a non-finite loss
    (agreed over all ranks before backward) or gradient skips it."""
    d, engine = run.d, run.engine
    if run.data_iter is None:
        run.data_iter = iter(run.loader)
    batches = [next(run.data_iter) for _ in range(run.cfg.train.grad_accum)]
    # the ranks of one context-parallel group hold the same batch: count it once
    counts = [c / d.cp for c in all_reduce_sum([sum(b.num_label_tokens for b in batches),
                                                sum(_mtp_tokens(b) for b in batches),
                                                sum(b.num_tokens for b in batches)], d.device)]
    stats, finite = {"lm": 0.0, "mtp": 0.0, "task": new_task_sums()}, True
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        loss, out, task_ids = forward_loss(run, batch, counts[0], counts[1])
        finite = finite and all_reduce_sum([float(not torch.isfinite(loss))], d.device)[0] == 0
        if not finite:
            engine.backward_nothing(last)
            continue
        engine.backward(loss, last)
        stats["lm"] += out.lm_loss_sum.item()
        stats["mtp"] += out.mtp_loss_sum.item() if out.mtp_loss_sum is not None else 0.0
        add_task_losses(stats["task"], out.token_loss, task_ids)
    grad_norm, finite = engine.step(finite)
    lm, mtp = all_reduce_sum([stats["lm"], stats["mtp"]], d.device)
    lm_loss, mtp_loss = lm / max(counts[0], 1), mtp / max(counts[1], 1)
    task = task_means(all_reduce_sum(stats["task"].flatten().tolist(), d.device))
    return {"finite": finite, "tokens": counts[2], "loss": lm_loss + run.module.cfg.mtp_loss_weight * mtp_loss,
            "lm_loss": lm_loss, "mtp_loss": mtp_loss, "grad_norm": grad_norm, **{f"loss/{t}": v for t, v in task.items()}}


def _mtp_tokens(batch) -> int:
    """Label tokens with a label two ahead in the same document (what the MTP loss averages over)."""
    from model.vlm import prepare_inputs

    return int((prepare_inputs(batch.input_ids, batch.labels, batch.cu_seqlens).mtp_targets != -100).sum())


# --- the loop -------------------------------------------------------------------------------------


def train(run: Run, step: Callable[[Run], dict] = pretrain_step, evaluate: Optional[Callable[[Run], dict]] = None,
          *, at_start: Optional[bool] = None, at_end: bool = False) -> None:
    """The loop: step, log, evaluate, checkpoint; stops at train.steps, at train.stop_after, or on
    SIGTERM (every rank stops after the same step, with a checkpoint).

    `step(run)` runs one optimizer step and returns its metrics: `finite` (False: the step changed no
    weight), `tokens` (trained this step, over all ranks) and whatever it logs. `evaluate(run)` adds
    held-out metrics every `eval.every` steps, at step 0 when `at_start` (default: eval.every > 0),
    and after the last step of the schedule when `at_end`."""
    cfg, d = run.cfg, run.d
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "sigterm", True))
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    flops_per_token = decoder_flops_per_token(run.module.cfg, cfg.data.seq_len)
    at_start = bool(cfg.eval.every) if at_start is None else at_start
    if evaluate is not None and at_start and run.step == 0:
        run.metrics.log({"step": 0, **evaluate(run)})  # the starting point of the held-out curves
    clock = Throughput()
    stop = _stop_requested(run)  # a SIGTERM during set-up or the first evaluation: nothing new to save
    while run.step < last and not stop:
        lr = run.optimizer.param_groups[0]["lr"]
        result = step(run)
        run.scheduler.step()
        run.step += 1
        tokens = result.pop("tokens")
        run.tokens += int(tokens)
        if result.pop("finite"):
            run.bad_steps_in_row = 0
        else:
            run.bad_steps, run.bad_steps_in_row = run.bad_steps + 1, run.bad_steps_in_row + 1
            if run.bad_steps_in_row >= cfg.train.max_bad_steps:
                raise FloatingPointError(f"{run.bad_steps_in_row} steps in a row had a non-finite loss or gradient "
                                         f"(step {run.step}); aborting")
        due_eval = evaluate is not None and ((cfg.eval.every and run.step % cfg.eval.every == 0)
                                             or (at_end and run.step == cfg.train.steps))
        if run.step % cfg.train.log_every == 0 or run.step == last or due_eval:
            seconds = max(all_reduce_max([clock.lap()], d.device)[0], 1e-9)
            tps = tokens / seconds * cfg.train.log_every
            row = {"step": run.step, **result, "lr": lr, "tokens": run.tokens, "tokens_per_s": tps,
                   "mfu": tps * flops_per_token / (peak_flops(d.device, cfg.train.peak_flops) * d.world),
                   **skip_counts(run), "skipped_steps": run.bad_steps}
            if due_eval:
                row.update(evaluate(run))
                clock.lap()  # evaluation time is not training throughput
            run.metrics.log(row)
        stop = _stop_requested(run)  # the ranks' agreed verdict: a rank's own flag alone would split the collectives
        if run.step % cfg.checkpoint.every == 0 or run.step == last or stop:
            save_checkpoint(run)
    if run.data_iter is not None:
        run.data_iter.close()  # shuts the data-loader workers down (data/mixture.py Loader.__iter__)
        run.data_iter = None
    if run.heldout is not None:
        run.heldout.close()  # and the held-out loader's, which it keeps between evaluations
    if run.preempted and d.is_main:
        print(f"{cfg.stage}: stopped by SIGTERM after step {run.step} (checkpoint saved); rerun the same command "
              "to resume", flush=True)
    run.metrics.close()


def _stop_requested(run: Run) -> bool:
    """Whether SIGTERM reached any rank (a scheduler signals every process, or one), agreed by all
    of them in one collective after each step, so that all checkpoint the same step and exit
    together. Every decision to stop reads this, never a rank's own flag."""
    # The handler writes its own flag, not the verdict: a signal handled while this rank waits inside
    # the all-reduce would otherwise be overwritten by the verdict computed before it (a lost SIGTERM:
    # the job trained to its end).
    local = run.sigterm or run.preempted
    if run.d.world > 1:
        run.preempted = all_reduce_max([float(local)], run.d.device)[0] > 0
    else:
        run.preempted = local
    return run.preempted


def skip_counts(run: Run) -> dict:
    """`skipped_samples` and `skipped/<reason>` summed over every rank's data loader (reasons in
    a fixed order: each rank may have seen different ones)."""
    from data.mixture import SKIP_REASONS

    local = run.loader.skipped
    counts = [float(local.get(r, 0)) for r in SKIP_REASONS] + [float(sum(n for r, n in local.items() if r not in SKIP_REASONS))]
    totals = all_reduce_sum(counts, run.d.device)
    out = {f"skipped/{r}": int(n) for r, n in zip((*SKIP_REASONS, "other"), totals) if n}
    return {"skipped_samples": int(sum(totals)), **out}
