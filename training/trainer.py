"""The training loop shared by pretraining and SFT, and the set-up that feeds it.

`setup(cfg)` builds everything a run needs (process groups, model on the meta device ->
parallelize -> materialize -> init or load, optimizer, schedule, data, metrics) and resumes from the
newest complete checkpoint in run_dir. `train(run)` is the loop.
"""

from __future__ import annotations

import math
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model.config import preset
from model.fp8 import apply_fp8
from model.hf import read_state_dict
from model.vlm import Exaone45, init_module_weights

from . import checkpoint as ckpt
from .distributed import (
    Dist, all_reduce_sum, apply_activation_checkpointing, apply_fsdp2, deepspeed_config, init_deepspeed, init_distributed,
)
from .evaluate import add_task_losses, new_task_sums, task_means
from .metrics import Metrics, Throughput, decoder_flops_per_token, peak_flops
from .optim import build_optimizer, build_scheduler


@dataclass
class Run:
    cfg: Any
    d: Dist
    model: Any  # the module (FSDP2) or the DeepSpeed engine
    module: Exaone45
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    metrics: Metrics
    tokenizer: Any = None
    step: int = 0
    tokens: int = 0
    bad_steps_in_row: int = 0
    bad_steps: int = 0
    preempted: bool = False
    extra_state: dict = field(default_factory=dict)  # loops may keep their own resumable state here
    heldout: Any = None  # (held-out loader, its initial state) once evaluation has run

    @property
    def is_deepspeed(self) -> bool:
        return self.cfg.parallel.engine == "deepspeed"


def model_config(cfg):
    m = cfg.model
    return preset(m.name, fp8=m.fp8, fp8_scaling=m.fp8_scaling, attn_impl=m.attn_impl,
                  mtp_loss_weight=m.mtp_loss_weight, loss_chunk_size=m.loss_chunk_size)


def build_parallel_model(cfg, d: Dist):
    """Meta device -> FP8 swap -> context parallel -> activation checkpointing -> FSDP2 -> materialize."""
    mcfg = model_config(cfg)
    with torch.device("meta"):
        module = Exaone45(mcfg)
    module.vision_in_every_step = d.world > 1
    apply_fp8(module, mcfg.fp8, mcfg.fp8_modules, mcfg.fp8_scaling)
    if d.cp > 1:
        from .context_parallel import apply_context_parallel

        apply_context_parallel(module, d.cp_group(), cfg.parallel.cp_impl)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(module)
    if cfg.parallel.engine == "fsdp2":
        apply_fsdp2(module, d, bf16=cfg.train.dtype == "bf16")
    module.to_empty(device=d.device)
    init_weights(module, mcfg, cfg.train.seed)
    return module


def init_weights(module: Exaone45, mcfg, seed: int, full_init_limit: int = 2_000_000_000) -> None:
    """Seeded initialization that does not depend on how the model is sharded: models up to
    full_init_limit parameters are initialized whole on the CPU and loaded shard by shard (so 1 and
    N ranks, FSDP2 and DeepSpeed start from the same weights); larger ones initialize their shards."""
    torch.manual_seed(seed)
    if sum(p.numel() for p in module.parameters()) > full_init_limit:
        module.init_weights()
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = Exaone45(mcfg)
    full.init_weights()
    state = {k: v for k, v in full.state_dict().items()}
    names = [k.replace("_checkpoint_wrapped_module.", "") for k in module.state_dict()]
    state = {k: state[k] for k in names}
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_initial_weights(cfg, module) -> None:
    kind, path = ckpt.resolve_init_from(cfg.init_from)
    if kind == "ckpt":
        ckpt.load_model_weights(path, module)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = read_state_dict(path)
    missing = [k for k in module.state_dict() if k.replace("_checkpoint_wrapped_module.", "") not in state]
    if any(not k.startswith("mtp.") for k in missing):
        raise ValueError(f"init_from={path}: the Hugging Face checkpoint lacks {missing[:5]}")
    if missing:
        warnings.warn(f"init_from={path}: no mtp.* weights; the MTP module keeps its fresh initialization")
        current = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
        state.update({k: current[k] for k in missing})
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))


def setup(cfg, build_loader: Callable, d: Optional[Dist] = None) -> Run:
    """build_loader(cfg, d, tokenizer) -> loader with state_dict()/load_state_dict() and `.skipped`."""
    d = d or init_distributed(cfg.parallel.cp)
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
    module = build_parallel_model(cfg, d)
    resume = ckpt.latest_checkpoint(run_dir)
    if resume is None and cfg.init_from:
        load_initial_weights(cfg, module)
    optimizer = build_optimizer(module, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model = module
    if cfg.parallel.engine == "deepspeed":
        # DeepSpeed knows no cp group: it averages gradients over every rank, as forward_loss's scale
        # assumes, and counts every rank in its (bookkeeping) batch size
        ds = deepspeed_config(cfg.parallel.zero_stage, cfg.train.grad_accum, cfg.train.micro_batch_size,
                              cfg.train.grad_clip, cfg.train.dtype == "bf16", d.world)
        model, _ = init_deepspeed(module, optimizer, ds)
    from data.text import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    loader = build_loader(cfg, d, tokenizer)
    run = Run(cfg, d, model, module, optimizer, scheduler, loader, None, tokenizer)
    if resume is not None:
        extra = ckpt.load(resume, model, optimizer, cfg.parallel.engine, d.rank)
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
    ckpt.save(run.cfg.run_dir, run.step, run.model, run.optimizer, run.cfg.parallel.engine, run.d.rank, extra, run.cfg.checkpoint.keep)


def forward_loss(run: Run, batch, global_tokens: float, global_mtp_tokens: float):
    """This micro-batch's share of the step loss, normalized by the real label tokens of the whole
    step across ranks and micro-batches (then scaled by the ranks FSDP/DeepSpeed average over)."""
    batch = batch.to(run.d.device)
    if run.d.cp > 1:
        from .context_parallel import shard_batch

        ids, shard = shard_batch(run.module, batch, run.d.cp_group())
        out = run.model(ids, shard=shard)
    else:
        out = run.model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, labels=batch.labels,
                        position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
    loss = out.lm_loss_sum / max(global_tokens, 1)
    if out.mtp_loss_sum is not None:
        loss = loss + run.module.cfg.mtp_loss_weight * out.mtp_loss_sum / max(global_mtp_tokens, 1)
    scale = run.d.world * (run.cfg.train.grad_accum if run.is_deepspeed else 1)
    return loss * scale, out


def train_step(run: Run, batches: list) -> dict:
    """One optimizer step over grad_accum micro-batches; a non-finite loss or gradient skips it."""
    d, tc = run.d, run.cfg.train
    # the ranks of one context-parallel group hold the same batch: count it once
    counts = [c / d.cp for c in all_reduce_sum([sum(b.num_label_tokens for b in batches),
                                                sum(_mtp_tokens(b) for b in batches),
                                                sum(b.num_tokens for b in batches)], d.device)]
    stats, finite = {"lm": 0.0, "mtp": 0.0, "task": new_task_sums()}, True
    for batch in batches:
        loss, out = forward_loss(run, batch, counts[0], counts[1])
        finite = finite and all_reduce_sum([float(not torch.isfinite(loss))], d.device)[0] == 0
        if not finite:
            if run.is_deepspeed:  # keep DeepSpeed's micro-step count aligned with a zero contribution
                run.model.backward(sum(p.sum() for p in run.module.parameters() if p.requires_grad) * 0.0)
            continue
        run.model.backward(loss) if run.is_deepspeed else loss.backward()
        stats["lm"] += out.lm_loss_sum.item()
        stats["mtp"] += out.mtp_loss_sum.item() if out.mtp_loss_sum is not None else 0.0
        _loss_per_task(out, batch, stats["task"], d)
    if run.is_deepspeed:
        if not finite:
            for g in run.optimizer.param_groups:
                g["lr"] = 0.0  # DeepSpeed steps at the boundary regardless; make it a no-op on the weights
        run.model.step()
        grad_norm = float(run.model.get_global_grad_norm() or 0.0)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.module.parameters(), tc.grad_clip)) if finite else float("nan")
        finite = finite and math.isfinite(grad_norm)
        if finite:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    lm, mtp, _ = all_reduce_sum([stats["lm"], stats["mtp"], 0.0], d.device)
    return {"finite": finite, "grad_norm": grad_norm, "lm_loss": lm / max(counts[0], 1),
            "mtp_loss": mtp / max(counts[1], 1), "tokens": counts[2], "task_loss": task_means(all_reduce_sum(stats["task"].flatten().tolist(), d.device))}


def _mtp_tokens(batch) -> int:
    """Label tokens with a label two ahead in the same document (what the MTP loss averages over)."""
    from model.vlm import prepare_inputs

    return int((prepare_inputs(batch.input_ids, batch.labels, batch.cu_seqlens).mtp_targets != -100).sum())


def _loss_per_task(out, batch, sums, d: Dist) -> None:
    if out.token_loss is None:
        return
    task_ids = batch.task_ids
    if d.cp > 1:  # this rank's tokens of the sequence
        from .context_parallel import local_token_index

        task_ids = task_ids[:, local_token_index(task_ids.shape[1], d.cp, d.cp_rank, task_ids.device)]
    add_task_losses(sums, out.token_loss, task_ids)


def train(run: Run, evaluate: Optional[Callable[[Run], dict]] = None) -> None:
    """The loop: step, log, evaluate, checkpoint; stops at train.steps, at train.stop_after, or on SIGTERM."""
    cfg, d = run.cfg, run.d
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "preempted", True))
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    flops_per_token = decoder_flops_per_token(run.module.cfg, cfg.data.seq_len)
    clock, data_iter = Throughput(), iter(run.loader)
    if evaluate is not None and cfg.eval.every and run.step == 0:
        run.metrics.log({"step": 0, **evaluate(run)})  # the starting point of the held-out curve
    while run.step < last and not run.preempted:
        batches = [next(data_iter) for _ in range(cfg.train.grad_accum)]
        lr = run.optimizer.param_groups[0]["lr"]
        result = train_step(run, batches)
        run.step += 1
        run.tokens += int(result["tokens"])
        if result["finite"]:
            run.bad_steps_in_row = 0
        else:
            run.bad_steps, run.bad_steps_in_row = run.bad_steps + 1, run.bad_steps_in_row + 1
            if run.bad_steps_in_row >= cfg.train.max_bad_steps:
                raise FloatingPointError(f"{run.bad_steps_in_row} steps in a row had a non-finite loss or gradient (step {run.step}); aborting")
        if run.step % cfg.train.log_every == 0 or run.step == last:
            dt = clock.lap()
            tps = result["tokens"] / max(dt, 1e-9) * cfg.train.log_every
            row = {"step": run.step, "loss": result["lm_loss"] + run.module.cfg.mtp_loss_weight * result["mtp_loss"],
                   "lm_loss": result["lm_loss"], "mtp_loss": result["mtp_loss"], "lr": lr, "grad_norm": result["grad_norm"],
                   "tokens": run.tokens, "tokens_per_s": tps, "mfu": tps * flops_per_token / (peak_flops(d.device, cfg.train.peak_flops) * d.world),
                   "skipped_samples": sum(run.loader.skipped.values()), "skipped_steps": run.bad_steps,
                   **{f"loss/{t}": v for t, v in result["task_loss"].items()},
                   **{f"skipped/{r}": n for r, n in run.loader.skipped.items()}}
            if evaluate is not None and cfg.eval.every and run.step % cfg.eval.every == 0:
                row.update(evaluate(run))
            run.metrics.log(row)
        if run.step % cfg.checkpoint.every == 0 or run.step == last or run.preempted:
            save_checkpoint(run)
    run.metrics.close()
