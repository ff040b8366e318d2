"""The GPU check's sections (bench/gpu_check.py runs them; the docstring there says what each
checks): versions, kernel parity, the truncated-33B step, FP8 on the decoder layers, memory against
length, decode, and the launchers. Each `check_<section>(ctx, out, **params)` reports rows to `out`
(bench/gpu_check_common.Rows) as it goes."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from bench.gpu_check_common import (
    ROOT, PASSED, FAILED, NOT_CHECKED, MEASURED, PEAK_BF16, KERNELS, GOAL_MFU, GOAL_FP8, LINEAR_SLACK, GIB, Ctx, Rows,
    importable, kernel_unavailable, fp8_unavailable, kernel_label, sync, free_port, tail, is_oom, free_memory,
    PeakMemory, kill_tree,
)


# --- versions -------------------------------------------------------------------------------------

PACKAGES = [  # (import name, distribution name)
    ("transformers", "transformers"), ("triton", "triton"), ("tokenizers", "tokenizers"),
    ("accelerate", "accelerate"), ("safetensors", "safetensors"), ("deepspeed", "deepspeed"),
    ("torchao", "torchao"), ("flash_attn", "flash-attn"), ("transformer_engine", "transformer-engine"),
    ("hydra", "hydra-core"), ("omegaconf", "omegaconf"), ("webdataset", "webdataset"),
    ("math_verify", "math-verify"), ("pydantic", "pydantic"), ("wandb", "wandb"),
]


HEAVY = {"deepspeed", "wandb", "accelerate", "transformers", "torchao", "math_verify", "pydantic"}  # --quick: found, not imported


def _present(name: str, dist_name: str, ctx: Ctx, out: Rows) -> None:
    spec = None if name in ctx.missing else importlib.util.find_spec(name)
    version = "-"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = importlib.metadata.version(dist_name) if spec else "-"
    out.row(name, MEASURED, "--quick: found, import not tried" if spec else "", version=version,
            imports="not tried" if spec else "no: not found", path=str(Path(spec.origin).parent) if spec and spec.origin else "-")


def check_versions(ctx: Ctx, out: Rows) -> None:
    out.row("python", MEASURED, version=platform.python_version(), path=sys.executable)
    out.row("torch", MEASURED, version=torch.__version__, cuda=torch.version.cuda or "-",
            cudnn=torch.backends.cudnn.version() if ctx.cuda else "-", path=str(Path(torch.__file__).parent))
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        driver = "?"
        with contextlib.suppress(Exception):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
        out.row("device", MEASURED, version=p.name, memory_gib=round(p.total_memory / GIB, 1),
                capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, driver=driver)
    else:
        cpu = platform.processor() or "?"
        with contextlib.suppress(OSError, StopIteration):
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        out.row("device", MEASURED, version=f"CPU: {cpu}", cores=os.cpu_count())
    for name, dist_name in PACKAGES:
        if ctx.quick and name in HEAVY:
            _present(name, dist_name, ctx, out)
            continue
        ok, version = importable(name, ctx)
        path = "-"
        if ok:
            module = sys.modules[name]
            path = str(Path(getattr(module, "__file__", None) or next(iter(module.__path__))).parent)
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist_name)
        out.row(name, MEASURED, version=version if ok else "-", imports="yes" if ok else f"no: {version}", path=path)


# --- kernel parity --------------------------------------------------------------------------------


def parity_cases(ctx: Ctx) -> list[dict]:
    """Decoder cases: 2 rows of L tokens packed with documents (one of 1 token, one row-filling),
    GQA 10 / 2 (the 33B's group of 5); the vision tower's case: non-causal segments, 16 / 8 heads."""
    L, W = (160, 24) if ctx.quick else (2048, 256)
    docs = [0, L // 3, L // 3 + 1, L, L + L // 8, L + L // 2, 2 * L]
    seg = 16 if ctx.quick else 64  # the vision tower's windows of patches (8 x 8 at the 33B's sizes)
    vision = list(range(0, 2 * L + 1, seg))
    return [
        dict(name=f"hd128 window {W}", D=128, window=W, causal=True, heads=(10, 2), cu=docs, B=2, L=L),
        dict(name=f"hd80 window {W}", D=80, window=W, causal=True, heads=(10, 2), cu=docs, B=2, L=L),
        dict(name="hd128 global", D=128, window=None, causal=True, heads=(10, 2), cu=docs, B=2, L=L),
        dict(name="hd80 vision segments", D=80, window=None, causal=False, heads=(16, 8), cu=vision, B=1, L=2 * L),
        dict(name="hd80 global", D=80, window=None, causal=True, heads=(10, 2), cu=docs, B=2, L=L),
    ]


def _attend(impl, q, k, v, spec, window, grad, backward: bool):
    from model.attention import attention

    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = attention(q, k, v, spec, scale=q.shape[-1] ** -0.5, window=window, impl=impl)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)) if backward else ()
    return [out.detach().float(), *(g.float() for g in grads)]


def check_parity(ctx: Ctx, out: Rows) -> None:
    from model.attention import MaskSpec

    cases = parity_cases(ctx)
    out.plan(["sdpa backends"] + [f"{kernel_label(i, ctx)}, {c['name']}" for c in cases for i in KERNELS])
    _sdpa_backends(ctx, out, cases[0])
    names = ("out", "dq", "dk", "dv")
    for case in cases:
        g = torch.Generator().manual_seed(0)
        (hq, hkv), B, L, D = case["heads"], case["B"], case["L"], case["D"]
        q, k, v = (torch.randn(B, h, L, D, generator=g).to(ctx.device) for h in (hq, hkv, hkv))
        grad = torch.randn(B, hq, L, D, generator=g).to(ctx.device)
        cu = torch.tensor(case["cu"], dtype=torch.int32, device=ctx.device)
        spec = lambda: MaskSpec.packed(cu, B, L, causal=case["causal"])  # noqa: E731  (a fresh mask cache)
        ref = _attend("eager", q, k, v, spec(), case["window"], grad, True)
        bf = [t.bfloat16() for t in (q, k, v)]
        base = [(a - r).abs().max().item() for a, r in zip(_attend("eager", *bf, spec(), case["window"], grad, True), ref)]
        for impl in KERNELS:
            item = f"{kernel_label(impl, ctx)}, {case['name']}"
            why = kernel_unavailable(impl, ctx, backward=False)
            if why or ctx.left() < 2:
                out.row(item, NOT_CHECKED, why or "the section's time box ran out")
                continue
            backward = kernel_unavailable(impl, ctx, backward=True) is None
            try:
                got = _attend(impl, *bf, spec(), case["window"], grad, backward)
            except Exception as e:
                out.row(item, FAILED, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            errs = [(a - r).abs().max().item() for a, r in zip(got, ref)]
            bounds = [factor * b + 1e-3 for factor, b in zip((2, 3, 3, 3), base)]
            ok = all(math.isfinite(e) and e <= b for e, b in zip(errs, bounds))
            values = {n: f"{e:.2e} (<= {b:.1e})" for n, e, b in zip(names, errs, bounds)}
            note = "" if backward else f"forward only: {kernel_unavailable(impl, ctx)}"
            out.row(item, PASSED if ok else FAILED, note, **values)
        free_memory(ctx)


def _sdpa_backends(ctx: Ctx, out: Rows, case: dict) -> None:
    """Which of SDPA's kernels take what `sdpa` passes (a boolean mask and enable_gqa); if only MATH
    does, sdpa materializes [heads, L, L] scores (the issue's suspicion)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.attention import MaskSpec

    (hq, hkv), B, L, D = case["heads"], case["B"], case["L"], case["D"]
    q, k, v = (torch.randn(B, h, L, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
    mask = MaskSpec.packed(torch.tensor(case["cu"], dtype=torch.int32, device=ctx.device), B, L).dense(case["window"])
    runs = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()
            runs.append(backend.name)
        except Exception:  # RuntimeError: "No available kernel", NotImplementedError on some devices
            pass
    out.row("sdpa backends", MEASURED, "the SDPA kernels that take what `sdpa` passes (a boolean [L, L] mask, "
            "enable_gqa=True), forward + backward: torch picks one of them", runs=", ".join(runs) or "none")


# --- the truncated 33B step ------------------------------------------------------------------------


def truncated_config(ctx: Ctx, kernel: str, fp8: str = "none"):
    """The 33B (the tiny preset with --quick) cut to 2 decoder layers, one sliding and one global,
    keeping the MTP layer, the vocabulary and the whole vision tower."""
    from model.config import FULL, SLIDING, preset

    name = "tiny" if ctx.quick else "exaone4_5_33b"
    text = dataclasses.replace(preset(name).text_config, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    return preset(name, attn_impl=kernel, fp8=fp8, text_config=text)


def packed_batch(mcfg, seq: int, images: int, side: int):
    """One packed row: 4 documents of unequal length, `images` images of side x side patches at the
    start of the later documents (image tokens carry no loss), random tokens."""
    from data.packing import Batch

    vc = mcfg.vision_config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, mcfg.text_config.vocab_size, (1, seq), generator=g)
    bounds = [0, seq * 3 // 8, seq * 5 // 8, seq * 7 // 8, seq]
    per_image = side * side // vc.spatial_merge_size**2
    for i in range(images):
        start = bounds[i + 1] + 1
        ids[0, start - 1] = mcfg.vision_start_token_id
        ids[0, start : start + per_image] = mcfg.image_token_id
        ids[0, start + per_image] = mcfg.vision_end_token_id
    labels = torch.where(ids == mcfg.image_token_id, -100, ids)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return Batch(input_ids=ids, labels=labels, position_ids=positions,
                 cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                 pixel_values=torch.randn(images * side * side, patch, generator=g) if images else None,
                 image_grid_thw=torch.tensor([[1, side, side]] * images) if images else None,
                 task_ids=torch.zeros(1, seq, dtype=torch.long), num_tokens=seq)


def run_config(kernel: str, fp8: str, compile_: bool):
    from omegaconf import OmegaConf

    from training.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.model.attn_impl, cfg.model.fp8 = kernel, fp8
    cfg.train.update(dtype="bf16", activation_checkpointing=True, compile=compile_, lr=1e-5, grad_accum=1)
    cfg.parallel.engine = "fsdp2"
    return cfg


def check_step(ctx: Ctx, out: Rows, kernel: str, fp8: str, syncs: bool = False) -> None:
    """One (kernel, fp8) configuration of the truncated 33B, in a world of one (NCCL / gloo)."""
    from model.vlm import Exaone45
    from training.distributed import init_distributed
    from training.engine import build_engine
    from training.memory import estimate
    from training.metrics import decoder_flops_per_token, vision_flops_per_patch
    from training.parallelize import load_weights, parallelize, seeded_init
    from training.trainer import Run, pretrain_step

    item = f"{kernel_label(kernel, ctx)}, fp8={fp8}"
    out.plan([item] + (["host syncs per step"] if syncs else []))
    seq, images, side = (128, 2, 4) if ctx.quick else (8192, 2, 32)
    warmup, timed = (1, 1) if ctx.quick else (2, 3)
    mcfg = truncated_config(ctx, kernel, fp8)
    cfg = run_config(kernel, fp8, compile_=True)
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    d = init_distributed()  # sets those variables for a world of one; restored below (--inline runs several)
    try:
        with torch.device("meta"):
            module = Exaone45(mcfg)
        # --quick on CPU: `eager`, dynamo's tracing without inductor's code generation
        cfg.train.compile_backend = "inductor" if ctx.cuda else "eager"
        parallelize(module, cfg, d)
        module.to_empty(device=d.device)
        load_weights(module, d, seeded_init(mcfg, 0, module))
        engine = build_engine(cfg, d, module)
        batch = packed_batch(mcfg, seq, images, side)
        run = Run(cfg, d, engine, scheduler=None, loader=itertools.repeat(batch), metrics=None)
        times, results, first = [], [], None
        with PeakMemory(ctx) as peak:
            for i in range(warmup + timed):
                sync(ctx)
                start = time.perf_counter()
                results.append(pretrain_step(run))
                sync(ctx)
                times.append(time.perf_counter() - start)
                first = first or times[0]
                if i + 1 < warmup + timed and ctx.left() < times[-1] * 1.5:
                    break  # what ran is reported; the time box would cut the next step
        seconds = statistics.median(times[warmup:] or times[-1:])
        tokens_per_s = seq / seconds
        patches = images * side * side
        flops = seq * decoder_flops_per_token(mcfg, seq) + patches * vision_flops_per_patch(mcfg)
        peak_flops = PEAK_BF16 if ctx.cuda else 124e9
        mfu, mfu_trainer = flops / seconds / peak_flops, tokens_per_s * decoder_flops_per_token(mcfg, seq) / peak_flops
        est = estimate(mcfg, seq, 1, 1, 1, activation_checkpointing=True, activation_bytes=2, engine="fsdp2",
                       vision_patches=patches)["total"]
        used = torch.cuda.max_memory_allocated() / GIB if ctx.cuda else peak.gib
        losses = [r["loss"] for r in results]
        finite = all(math.isfinite(x) for x in losses) and all(r["finite"] for r in results)
        status = (PASSED if mfu >= GOAL_MFU else FAILED) if ctx.cuda and fp8 == "none" else MEASURED
        if not finite:
            status = FAILED
        note = (f"{len(times)} steps, the first {first:.1f} s (compile); " if len(times) > 1 else "") + (
            "THE TIME BOX CUT THE TIMED STEPS: the time includes compilation; " if len(times) <= warmup else "") + (
            f"goal: bf16 MFU >= {GOAL_MFU:.0%}" if fp8 == "none" and ctx.cuda else
            "no MFU goal for FP8 (its goal is on the decoder layers: fp8_layers)" if ctx.cuda else
            "CPU: timing meaningless; peak memory is the process's resident high-water mark")
        out.row(item, status, ("" if finite else "NON-FINITE LOSS; ") + note, tokens_per_s=round(tokens_per_s, 1),
                mfu=f"{mfu:.1%}", mfu_trainer=f"{mfu_trainer:.1%}", step_s=round(seconds, 3),
                peak_gib=round(used, 2), memory_model_gib=round(est, 2), measured_vs_model=f"{used / est:.2f}x",
                loss=round(losses[-1], 4),
                params_b=round(sum(p.numel() for p in module.parameters()) / 1e9, 3))
        if syncs:
            _count_syncs(ctx, out, run)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _count_syncs(ctx: Ctx, out: Rows, run) -> None:
    """One more step with torch.cuda.set_sync_debug_mode("warn"): every synchronizing CUDA call warns."""
    from training.trainer import pretrain_step

    if not ctx.cuda:
        out.row("host syncs per step", NOT_CHECKED, "needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pretrain_step(run)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    places: dict[str, int] = {}
    for w in hits:
        where = f"{Path(w.filename).relative_to(ROOT) if w.filename.startswith(str(ROOT)) else Path(w.filename).name}:{w.lineno}"
        places[where] = places.get(where, 0) + 1
    top = ", ".join(f"{k} x{v}" for k, v in sorted(places.items(), key=lambda kv: -kv[1])[:8])
    out.row("host syncs per step", MEASURED, "pretrain_step: forward, backward, Engine.step and the step's "
            "metric reductions; where (file:line, top 8)", syncs=len(hits), where=top or "-")


# --- FP8 on the decoder layers ---------------------------------------------------------------------


def check_fp8_layers(ctx: Ctx, out: Rows) -> None:
    from torch import nn

    from model.attention import MaskSpec
    from model.config import FULL, SLIDING, preset
    from model.fp8 import apply_fp8
    from model.layers import text_inv_freq, text_rope
    from model.text import DecoderLayer

    modes = [("none", "tensorwise"), ("torchao", "tensorwise"), ("torchao", "rowwise"), ("te", "tensorwise")]
    if ctx.quick:
        modes = modes[:2] + modes[3:]
    out.plan([f"fp8={m}" + (f" ({s})" if m != "none" else " (bf16)") for m, s in modes] + ["speedup torchao / bf16"])
    tc = preset("tiny" if ctx.quick else "exaone4_5_33b").text_config
    seq = 128 if ctx.quick else 8192
    warmup, timed = (1, 1) if ctx.quick else (2, 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq, tc.hidden_size, generator=g).to(ctx.device, torch.bfloat16)
    grad = torch.randn(x.shape, generator=g).to(ctx.device, torch.bfloat16)
    cu = torch.tensor([0, seq // 2, seq * 3 // 4, seq], dtype=torch.int32, device=ctx.device)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])[None]
    rope = text_rope(positions.to(ctx.device), text_inv_freq(tc.rope_parameters, tc.head_dim, ctx.device), torch.bfloat16)
    impl = "flex" if ctx.cuda else "flash"
    times = {}
    for mode, scaling in modes:
        item = f"fp8={mode}" + (f" ({scaling})" if mode != "none" else " (bf16)")
        why = fp8_unavailable(mode, ctx)
        if why or ctx.left() < 5:
            out.row(item, NOT_CHECKED, why or "the section's time box ran out")
            continue
        try:
            torch.manual_seed(0)
            root = nn.Module()
            root.language_model = nn.Module()
            root.language_model.layers = nn.ModuleList([DecoderLayer(tc, SLIDING, 0), DecoderLayer(tc, FULL, 1)])
            root.to(ctx.device, torch.bfloat16)
            for layer in root.language_model.layers:
                layer.self_attn.attn_impl = impl
            swapped = apply_fp8(root, mode, None, scaling)
            layers = list(root.language_model.layers)
            if ctx.cuda:
                for layer in layers:
                    layer.compile()
            samples = []
            for i in range(warmup + timed):
                spec = MaskSpec.packed(cu, 1, seq, max_seqlen=seq // 2).prepare(impl, [tc.sliding_window, None])
                h = x.detach().requires_grad_(True)
                sync(ctx)
                start = time.perf_counter()
                for layer in layers:
                    h = layer(h, rope, spec)
                h.backward(grad)
                sync(ctx)
                samples.append(time.perf_counter() - start)
                root.zero_grad(set_to_none=True)
            times[(mode, scaling)] = statistics.median(samples[warmup:])
            out.row(item, MEASURED, f"{len(swapped)} linears in FP8; the first call {samples[0]:.1f} s (compile)"
                    if ctx.cuda else f"{len(swapped)} linears in FP8; CPU: timing meaningless",
                    ms=round(times[(mode, scaling)] * 1e3, 2), kernel=impl, tokens=seq)
        except Exception as e:
            out.row(item, FAILED, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            root = layers = None
            free_memory(ctx)
    base = times.get(("none", "tensorwise"))
    best = max((base / t, s) for (m, s), t in times.items() if m == "torchao") if base and any(
        m == "torchao" for m, _ in times) else None
    if best is None:
        out.row("speedup torchao / bf16", NOT_CHECKED, "bf16 or torchao did not run")
    else:
        status = (PASSED if best[0] >= GOAL_FP8 else FAILED) if ctx.cuda else MEASURED
        out.row("speedup torchao / bf16", status, f"goal >= {GOAL_FP8}x (best scaling: {best[1]})"
                if ctx.cuda else "CPU: not a speed measurement", speedup=f"{best[0]:.2f}x")


# --- memory against length -------------------------------------------------------------------------


def check_memory(ctx: Ctx, out: Rows, kernel: str) -> None:
    from model.attention import MaskSpec
    from model.config import FULL, preset
    from model.layers import text_inv_freq, text_rope
    from model.text import DecoderLayer

    lengths = [256, 1024, 512] if ctx.quick else [8192, 131072, 32768, 16384, 65536]
    label = kernel_label(kernel, ctx)
    out.plan([f"{label}, {n // 1024}K" if n >= 1024 else f"{label}, {n}" for n in sorted(lengths)] + [f"{label}: linear"])
    why = kernel_unavailable(kernel, ctx)
    tc = preset("tiny" if ctx.quick else "exaone4_5_33b").text_config
    torch.manual_seed(0)
    layer = None if why else DecoderLayer(tc, FULL, 0).to(ctx.device, torch.bfloat16)
    if layer is not None:
        layer.self_attn.attn_impl = kernel
    inv_freq = text_inv_freq(tc.rope_parameters, tc.head_dim, ctx.device)

    def step(n: int) -> tuple[float, float]:
        x = torch.randn(1, n, tc.hidden_size, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        rope = text_rope(torch.arange(n, device=ctx.device)[None], inv_freq, x.dtype)
        spec = MaskSpec.packed(torch.tensor([0, n], dtype=torch.int32, device=ctx.device), 1, n, max_seqlen=n)
        with PeakMemory(ctx) as peak:
            start = time.perf_counter()
            layer(x, rope, spec).backward(grad)
            sync(ctx)
            seconds = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        return peak.gib, seconds

    results, oom_at = {}, math.inf
    if layer is not None:
        with contextlib.suppress(Exception):
            step(512)  # one-time initialization (kernels, workspaces, flex's first compile) stays out
    for n in lengths:
        item = f"{label}, {n // 1024}K" if n >= 1024 else f"{label}, {n}"
        if why:
            out.row(item, NOT_CHECKED, why)
            continue
        if n > oom_at:
            out.row(item, NOT_CHECKED, f"out of memory at {oom_at // 1024}K already")
            continue
        if ctx.left() < 5:
            out.row(item, NOT_CHECKED, "the time box ran out")
            continue
        try:
            gib, seconds = step(n)
        except Exception as e:
            free_memory(ctx)
            if not is_oom(e):
                out.row(item, FAILED, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            oom_at = min(oom_at, n)
            out.row(item, MEASURED, "out of memory", tokens=n, peak_gib="OOM")
            continue
        results[n] = gib
        out.row(item, MEASURED, "", tokens=n, peak_gib=round(gib, 3), gib_per_1k=round(gib / n * 1024, 4),
                seconds=round(seconds, 2))
        free_memory(ctx)
    item = f"{label}: linear"
    if why or len(results) < 2:
        out.row(item, NOT_CHECKED, why or "fewer than two lengths ran")
        return
    lo, hi = min(results), max(results)
    ratio = (results[hi] / hi) / max(results[lo] / lo, 1e-12)
    linear = ratio <= LINEAR_SLACK and oom_at == math.inf
    expect = "dense [L, L] masks: quadratic by design" if kernel == "sdpa" else "no [L, L] tensor: should be linear"
    status = MEASURED if kernel == "sdpa" or not ctx.cuda else (PASSED if linear else FAILED)
    if not ctx.cuda:
        expect = "CPU: the resident-memory high-water mark is noise at these sizes, no verdict"
    out.row(item, status, f"per-token memory at {hi} / at {lo} tokens; {expect}", ratio=round(ratio, 2))


# --- decode ---------------------------------------------------------------------------------------


def check_decode(ctx: Ctx, out: Rows) -> None:
    from model.generate import generate
    from model.vlm import build_model

    batches, prompt, new = ((1, 4), 16, 8) if ctx.quick else ((1, 16), 256, 64)
    out.plan([f"batch {b}" for b in batches])
    mcfg = truncated_config(ctx, "sdpa")
    torch.manual_seed(0)
    model = build_model(mcfg, device=ctx.device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    for b in batches:
        if ctx.left() < 3:
            out.row(f"batch {b}", NOT_CHECKED, "the time box ran out")
            continue
        prompts = torch.randint(100, mcfg.text_config.vocab_size, (b, prompt), generator=g).tolist()
        generate(model, prompts, max_new_tokens=2)  # warm-up
        sync(ctx)
        start = time.perf_counter()
        result = generate(model, prompts, max_new_tokens=new)
        sync(ctx)
        seconds = time.perf_counter() - start
        produced = sum(len(t) for t in result.tokens)
        out.row(f"batch {b}", MEASURED, "truncated 33B: 2 decoder layers, so per-layer costs are small and the "
                "LM head and launch overheads weigh more than in the whole model" if ctx.cuda else "CPU",
                prompt_tokens=prompt, new_tokens=new, tokens_per_s=round(produced / seconds, 1))


# --- launchers ------------------------------------------------------------------------------------


def launcher_jobs(ctx: Ctx) -> list[list[dict]]:
    """Phases of launcher runs; each phase's runs start together and read checkpoints of earlier phases."""
    w, py, steps = ctx.work / "runs", sys.executable, 2 if ctx.quick else 3
    common = ["+scale=mini", "wandb.mode=disabled", f"data.root={ctx.corpus}", "checkpoint.every=1000", "eval.every=0",
              f"train.steps={steps}"]
    if ctx.quick:
        common += ["data.seq_len=128", "train.micro_batch_size=1", "data.num_workers=0"]

    def torchrun(script):
        if ctx.quick:  # one plain process (what torchrun starts, without its agent)
            return [py, script]
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()), script]

    def deepspeed(script):
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()), script]

    sft = ["+recipe=sft", *common, "parallel.engine=deepspeed", f"init_from={w / 'stage1'}",
           "sft.generation_eval.limit_per_task=8", "sft.generation_eval.max_new_tokens=16"]
    grpo = ["+recipe=grpo", *common, f"init_from={w / 'stage1'}", "+data.stages.grpo.ocr=0.5", "train.micro_batch_size=4",
            "rl.group_size=2", "rl.train_prompts_per_step=2", "rl.rollout_prompts_per_batch=2", "rl.max_gen_batches=1",
            "rl.on_underfilled=warn", "rl.max_new_tokens=16", "rl.eval_prompts_per_source=0"]
    later = [
        dict(name="stage2 from stage1", cmd=torchrun("launch/pretrain.py") + ["+recipe=stage2", *common, f"run_dir={w / 'stage2'}",
                                                                              f"init_from={w / 'stage1'}"]),
        dict(name="sft, DeepSpeed ZeRO-2", gen=True,
             cmd=deepspeed("launch/sft.py") + sft + ["parallel.zero_stage=2", f"run_dir={w / 'sft_zero2'}"]),
        dict(name="sft, DeepSpeed ZeRO-3", gen=True,
             cmd=deepspeed("launch/sft.py") + sft + ["parallel.zero_stage=3", f"run_dir={w / 'sft_zero3'}"]),
        dict(name="grpo (native rollouts)", cmd=torchrun("launch/grpo.py") + grpo + [f"run_dir={w / 'grpo'}"]),
    ]
    for job in later:
        job.update(steps=steps, needs="stage1", skip="--quick runs stage1 only" if ctx.quick else None)
    stage1 = dict(name="stage1", steps=steps, cmd=torchrun("launch/pretrain.py") + ["+recipe=stage1", *common,
                                                                                  f"run_dir={w / 'stage1'}"])
    return [[stage1], later]


def check_launchers(ctx: Ctx, out: Rows) -> None:
    phases = launcher_jobs(ctx)
    out.plan([j["name"] for phase in phases for j in phase])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1" if ctx.quick else "4",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    logs = ctx.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    passed = set()
    for phase in phases:
        procs = []
        for job in phase:
            if job.get("skip"):
                out.row(job["name"], NOT_CHECKED, job["skip"])
                continue
            if job.get("needs") and job["needs"] not in passed:
                out.row(job["name"], NOT_CHECKED, f"starts from {job['needs']}'s checkpoint, and {job['needs']} did not pass")
                continue
            log = logs / ("launch_" + re.sub(r"[^A-Za-z0-9]+", "_", job["name"]).strip("_") + ".log")
            job.update(log=log, start=time.time())
            with open(log, "w") as f:
                f.write(" ".join(job["cmd"]) + "\n")
                procs.append((job, subprocess.Popen(job["cmd"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                    start_new_session=True)))
        ended: dict[int, float] = {}
        while len(ended) < len(procs) and ctx.left() > 0:
            for i, (_, proc) in enumerate(procs):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.5)
        for i, (job, proc) in enumerate(procs):
            if i not in ended:
                kill_tree(proc)
            rc = proc.returncode if i in ended else None
            if _judge_launch(job, rc, ended.get(i, time.time()) - job["start"], out) == PASSED:
                passed.add(job["name"])


def _judge_launch(job: dict, rc: Optional[int], seconds: float, out: Rows) -> str:
    run_dir = Path(next(a.split("=", 1)[1] for a in job["cmd"] if a.startswith("run_dir=")))
    rows = {}
    with contextlib.suppress(OSError, ValueError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row
    last = rows.get(job["steps"], {})
    problems = []
    if rc is None:
        problems.append(f"killed at the time box after {seconds:.0f} s")
    elif rc != 0:
        problems.append(f"exit {rc}")
    if not last:
        problems.append(f"no metrics row for step {job['steps']}")
    elif not math.isfinite(float(last.get("loss", float("nan")))):
        problems.append(f"loss {last.get('loss')}")
    if rc == 0 and not (run_dir / "checkpoints" / f"step_{job['steps']}").exists():
        problems.append(f"no checkpoints/step_{job['steps']}")
    values = {"seconds": round(seconds, 1)}
    for key, digits in (("loss", 4), ("tokens_per_s", 0), ("reward_mean", 3)):
        if isinstance(last.get(key), (int, float)):
            values[key] = round(last[key], digits)
    if job.get("gen"):
        gen = {}
        with contextlib.suppress(OSError, ValueError):
            evals = json.loads((run_dir / "generation_eval.json").read_text())
            gen = {k: round(v, 3) for k, v in list(evals.values())[-1].items() if k.startswith("gen/") and "/count" not in k}
        values["generation"] = ", ".join(f"{k[4:]} {v}" for k, v in gen.items()) or "-"
        if not gen:
            problems.append("no generation metrics (generation_eval.json)")
    status = FAILED if problems else PASSED
    out.row(job["name"], status, "; ".join(problems), **values,
            command=" ".join(Path(a).name if a == sys.executable else a for a in job["cmd"]),
            **({"log": tail(job["log"], 15)} if problems else {}))
    return status
