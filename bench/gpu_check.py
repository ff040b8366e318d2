"""The one-command GPU check (issue 15, item 4): what the GPU path does on one GPU, in at most 5
minutes of an H200, written to bench/RESULTS-gpu.md. `bash scripts/gpu_check.sh` installs the carried
wheels and runs this; `--device cpu --quick` runs the same check functions at tiny sizes (the test).

    python bench/gpu_check.py                                  # on a CUDA machine (what gpu_check.sh runs)
    python bench/gpu_check.py --sections step,fp8_layers       # some sections only (the others: NOT CHECKED)
    python bench/gpu_check.py --device cpu --quick --out /tmp/r.md   # the check's code on CPU, tiny sizes

Sections, in the order they run (the launchers run in the background meanwhile, in full mode), each
time-boxed (a share of --budget) and run in its own process(es), except with --inline (the default with
--quick), where they run in this process:
  versions    torch, CUDA, the GPU, and which optional packages import (and from where)
  launchers   every launcher with +scale=mini for 3 steps: stage1 (torchrun, 1 process), stage2 from it,
              sft under DeepSpeed ZeRO-2 and ZeRO-3 with generation metrics, grpo (native rollouts)
  parity      model.attention.attention for sdpa / flex / flash vs eager, bf16, forward + backward:
              packed documents (a 1-token one too), GQA, head_dim 128 and 80, with and without a
              sliding window, and the vision tower's non-causal segments
  step        the truncated 33B (2 decoder layers, sliding + global, and the MTP layer at full width,
              the full 153,600-word vocabulary, the whole vision tower): the trainer's pretrain_step
              on one packed 8,192-token row with two images, bf16 (fp32 master weights, FSDP2 on one
              rank), activation checkpointing and compile, per kernel x fp8 (none, torchao): tokens/s,
              MFU, peak memory against training.memory's estimate, finite loss; host syncs per step
  fp8_layers  the decoder layers' forward + backward (sliding + global, 33B width, compiled, bf16
              weights) with the MLPs in FP8 (torchao, as the release) against bf16
  memory      one global decoder layer's forward + backward peak memory at 8K-128K tokens per kernel
  decode      greedy decoding tokens/s of the truncated 33B (KV cache, sdpa)

Every result is passed, failed, measured (a number no goal applies to) or NOT CHECKED with the
reason (a package that is absent, a kernel that cannot run on the device, the time box). Exit
status: 0 when nothing failed, 1 when something did, 2 when --device cuda finds no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PASSED, FAILED, NOT_CHECKED, MEASURED = "passed", "failed", "NOT CHECKED", "measured"
PEAK_BF16 = 989e12  # H100 / H200 dense bf16 FLOP/s (training.metrics.DEFAULT_PEAK_FLOPS["cuda"])
KERNELS = ("sdpa", "flex", "flash")
GOAL_MFU, GOAL_FP8, LINEAR_SLACK = 0.40, 1.2, 1.5
GIB = 1024**3

# Section: (title, seconds of the full-mode budget, what the table means). The budgets add up to
# about 4.5 minutes; the launchers' run beside versions and parity.
SECTIONS = {
    "versions": ("Versions", 15, "What ran: the interpreter, torch and CUDA, the device, and which packages "
                 "import (from where: the carried wheels install to a directory ahead of the machine's own)."),
    "launchers": ("Launchers, +scale=mini, 3 steps", 75,
                  "Each launcher as the README runs it, in miniature (tiny model, demo corpus, the overlay's "
                  "fp32 / sdpa), for 3 steps on one process: passed = exit 0, 3 steps logged with a finite "
                  "loss and the final checkpoint written (SFT: generation metrics too)."),
    "parity": ("Kernel parity (bf16, forward + backward, vs eager)", 40,
               "model.attention.attention in bf16 against eager attention in fp32 on the same inputs: "
               "max |difference| of the output and of dq, dk, dv. Bound: eager-in-bf16's own max difference "
               "x 2 for the output (flash-attn's test rule), x 3 for the gradients (dk / dv add up over many "
               "queries, so a kernel's bf16 rounding grows there), + 1e-3; passed = every tensor within it."),
    "step": ("Truncated 33B training step", 110,
             "pretrain_step (training/trainer.py) of the truncated 33B, bf16 compute with fp32 master weights "
             "(FSDP2 on one rank), activation checkpointing, train.compile; median of the timed steps after "
             "the warm-up (compile) steps. MFU = FLOPs (training/metrics.py: decoder + LM heads + MTP, and "
             "the vision tower per patch) / time / 989 TFLOP/s; `mfu_trainer` is the decoder-only figure "
             "the trainer logs. Goal: bf16 MFU >= 40%. Memory: torch.cuda.max_memory_allocated against "
             "training.memory.estimate for the same layout."),
    "fp8_layers": ("FP8 on the decoder layers' forward + backward", 40,
                   "Two decoder layers (sliding + global) at the 33B's width on a packed 8K row, bf16 weights, "
                   "each layer compiled; median time of forward + backward (weight gradients included) with "
                   "the MLPs (gate/up/down, model.config.DEFAULT_FP8_MODULES) in FP8. Goal: >= 1.2x bf16."),
    "memory": ("One decoder layer's memory against length", 35,
               "A global decoder layer (33B width, bf16) over one document: peak memory of forward + backward "
               "above the weights and inputs. passed = linear growth (GiB per 1K tokens at the longest "
               "length within 1.5x of the shortest's); lengths run shortest, longest, then between, so "
               "the time box cuts the middle."),
    "decode": ("Decode", 15, "Greedy decoding of the truncated 33B (bf16, KV cache, sdpa): new tokens per second."),
}
ORDER = ["versions", "launchers", "parity", "step", "fp8_layers", "memory", "decode"]
BACKGROUND = {"launchers"}  # full mode: run beside the sections before the first timed one
TIMED = {"step", "fp8_layers", "memory", "decode"}  # wait for the background: its load would skew them


@dataclasses.dataclass
class Ctx:
    device: str
    quick: bool
    work: Path
    corpus: Path
    missing: frozenset = frozenset()
    deadline: float = math.inf

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.time()


class Rows:
    """Results of one section, appended to a JSON-lines file as they come (so a worker killed at its
    time box still reports what it finished); `plan` names the items it means to report."""

    def __init__(self, section: str, path: Path):
        self.section, self.path = section, path

    def _write(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    def plan(self, items: list[str]) -> None:
        self._write({"plan": items})

    def row(self, item: str, status: str, note: str = "", **values) -> None:
        self._write({"row": {"section": self.section, "item": item, "status": status, "note": note, **values}})

    @staticmethod
    def read(path: Path) -> tuple[list[str], list[dict]]:
        plan, rows = [], []
        if path.exists():
            for line in path.read_text().splitlines():
                obj = json.loads(line)
                plan += obj.get("plan", [])
                rows += [obj["row"]] if "row" in obj else []
        return plan, rows


# --- helpers --------------------------------------------------------------------------------------


def importable(name: str, ctx: Ctx) -> tuple[bool, str]:
    """(imports, version or the error)."""
    if name in ctx.missing:
        return False, "treated as absent (--assume-missing)"
    try:
        module = importlib.import_module(name)
    except Exception as e:  # ImportError, or OSError / RuntimeError of a broken CUDA extension
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return True, str(getattr(module, "__version__", "?"))


def kernel_unavailable(impl: str, ctx: Ctx, backward: bool = True) -> Optional[str]:
    """Why `impl` cannot run here (None: it can)."""
    if impl == "flash" and ctx.cuda and not importable("flash_attn", ctx)[0]:
        return ("flash-attn is not installed here: no wheel of it travels (it builds against the machine's "
                "torch and CUDA; pip install -e .[flash] where a registry is reachable)")
    if impl == "flex" and not ctx.cuda and backward:
        return "torch has no flex_attention backward on CPU (forward only there)"
    return None


def fp8_unavailable(mode: str, ctx: Ctx) -> Optional[str]:
    if mode == "torchao":
        ok, why = importable("torchao", ctx)
        return None if ok else f"torchao does not import: {why}"
    if mode == "te":
        ok, why = importable("transformer_engine", ctx)
        return None if ok else (f"Transformer Engine does not import ({why}); it is too large to carry "
                                "(pip install -e .[te] on a CUDA machine with a registry)")
    return None


def kernel_label(impl: str, ctx: Ctx) -> str:
    return "flash (CPU varlen kernel)" if impl == "flash" and not ctx.cuda else impl


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(line[:300] for line in kept[-lines:])


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(ctx: Ctx) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of a block above what was allocated at its start, in GiB: CUDA's allocator
    statistics; on CPU the resident-set high-water mark (rough: the process's own allocator)."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def __enter__(self):
        if self.ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss()
        return self

    def __exit__(self, *exc):
        if self.ctx.cuda:
            torch.cuda.synchronize()
            self.gib = (torch.cuda.max_memory_allocated() - self.base) / GIB
        else:
            self.gib = (_vm_hwm() - self.base) / GIB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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
                _kill(proc)
            rc = proc.returncode if i in ended else None
            if _judge_launch(job, rc, ended.get(i, time.time()) - job["start"], out) == PASSED:
                passed.add(job["name"])


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the process and all its descendants (torchrun's workers run in sessions of their own),
    SIGKILL to whatever is left after 40 s (torchrun gives its workers 30 s; the trainer checkpoints on
    SIGTERM)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=40)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


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


# --- the driver -----------------------------------------------------------------------------------


def worker_calls(section: str, ctx: Ctx) -> list[tuple[str, dict]]:
    """(worker name, its arguments) in the order they run; each is one process unless --inline."""
    if section == "step":  # the recipes' kernel (flex) first, bf16 before FP8
        calls = [("step", dict(kernel=k, fp8=f)) for f in ("none", "torchao") for k in KERNELS]
        calls.sort(key=lambda c: (c[1]["kernel"] != "flex", c[1]["fp8"] != "none"))
        first = next((c for c in calls if not not_runnable(*c, ctx)), None)
        if first:
            first[1]["syncs"] = True
        return calls
    if section == "memory":
        return [("memory", dict(kernel=k)) for k in ("flex", "flash", "sdpa")]
    return [(section, {})]


WORKERS: dict[str, Callable] = {"versions": check_versions, "parity": check_parity, "step": check_step,
                                "fp8_layers": check_fp8_layers, "memory": check_memory, "decode": check_decode}


def not_runnable(name: str, params: dict, ctx: Ctx) -> Optional[str]:
    """Why a worker call is not made at all (reported as NOT CHECKED without starting a process)."""
    if name == "memory":
        return kernel_unavailable(params["kernel"], ctx)
    if name == "step":
        if ctx.quick and params["fp8"] != "none":
            return "--quick runs fp8=torchao in fp8_layers only (a whole step in FP8 is slow on some CPUs)"
        if ctx.quick and params["kernel"] == "flash":
            return "--quick runs one kernel's step (sdpa)"
        return kernel_unavailable(params["kernel"], ctx) or fp8_unavailable(params["fp8"], ctx)
    return None


def run_section(section: str, ctx: Ctx, inline: bool, box: float) -> list[dict]:
    """Every worker call of the section within `box` seconds; rows of what did not report are NOT
    CHECKED (time box) and a worker that died adds a failed row with its log's tail."""
    rows_dir, logs = ctx.work / "rows", ctx.work / "logs"
    rows_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + box
    collected = []
    for n, (name, params) in enumerate(worker_calls(section, ctx)):
        path = rows_dir / f"{section}_{n}.jsonl"
        path.unlink(missing_ok=True)
        out = Rows(section, path)
        label = " ".join(str(v) for k, v in params.items() if k != "syncs") or section
        why = not_runnable(name, params, ctx)
        if section == "launchers":
            check_launchers(dataclasses.replace(ctx, deadline=deadline), out)
            collected += Rows.read(path)[1]
            continue
        if why and name == "memory":  # reports each length as not checked, without touching the device
            check_memory(ctx, out, **params)
        elif why:
            out.row(_first_item(name, params, ctx), NOT_CHECKED, why)
        elif deadline - time.time() < (30 if ctx.cuda and name == "step" else 3):
            out.row(_first_item(name, params, ctx), NOT_CHECKED, "the section's time box ran out before it started")
        elif inline:
            try:
                WORKERS[name](dataclasses.replace(ctx, deadline=deadline), out, **params)
            except Exception as e:
                out.row(f"{label}: worker", FAILED, f"{type(e).__name__}: {str(e)[:400]}")
        else:
            _spawn(name, params, ctx, path, deadline, logs / f"{section}_{n}.log", out, label)
        plan, rows = Rows.read(path)
        done = {r["item"] for r in rows}
        rows += [dict(section=section, item=i, status=NOT_CHECKED, note="its worker stopped before reaching it "
                      "(time box or failure above)") for i in plan if i not in done]
        collected += rows
    return collected


def _first_item(name: str, params: dict, ctx: Ctx) -> str:
    if name == "step":
        return f"{kernel_label(params['kernel'], ctx)}, fp8={params['fp8']}"
    if name == "memory":
        return f"{kernel_label(params['kernel'], ctx)}: every length"
    return name


def _spawn(name, params, ctx: Ctx, path: Path, deadline: float, log: Path, out: Rows, label: str) -> None:
    cmd = [sys.executable, __file__, "--worker", name, "--params", json.dumps(params), "--rows", str(path),
           "--deadline", str(deadline), "--device", ctx.device, "--work", str(ctx.work), "--corpus", str(ctx.corpus),
           "--assume-missing", ",".join(sorted(ctx.missing))] + (["--quick"] if ctx.quick else [])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time() + 10))  # 10 s grace past the box
    except subprocess.TimeoutExpired:
        _kill(proc)
        plan, rows = Rows.read(path)
        if set(plan) - {r["item"] for r in rows}:
            out.row(f"{label}: worker", NOT_CHECKED, "killed at the section's time box while running: what it had "
                    "not reported is unknown", log=tail(log))
        return
    if rc != 0:
        out.row(f"{label}: worker", FAILED, f"exit {rc}", log=tail(log))


def run_all(ctx: Ctx, sections: list[str], budget: float, inline: bool) -> list[dict]:
    """Sections in ORDER within `budget` seconds; full mode runs BACKGROUND sections in a thread beside
    the others until the first TIMED one. Each section's box is its share of the budget (SECTIONS'
    seconds, scaled to it) on a running schedule: time a section leaves unused goes to the next."""
    start = time.time()
    end = start + budget
    nominal = {s: SECTIONS[s][1] for s in sections}
    overlap = not inline and any(s in BACKGROUND for s in sections)
    foreground = [s for s in ORDER if s in sections and not (overlap and s in BACKGROUND)]
    planned = sum(nominal[s] for s in foreground)
    if overlap:
        before = sum(nominal[s] for s in foreground if s not in TIMED)
        planned += max(0, sum(nominal[s] for s in BACKGROUND if s in sections) - before)
    scale = budget / max(planned, 1)
    results: dict[str, list] = {}
    background = []
    if overlap:
        for s in BACKGROUND & set(sections):
            box = min(nominal[s] * scale, end - time.time())
            print(f"== {s} ({box:.0f} s, in the background)", flush=True)
            t = threading.Thread(target=lambda s=s, box=box: results.__setitem__(s, run_section(s, ctx, inline, box)))
            t.start()
            background.append(t)
    schedule = start
    for s in foreground:
        if s in TIMED:
            for t in background:
                t.join()
            background = []
            schedule = max(schedule, time.time())
        schedule += nominal[s] * scale
        box = min(schedule, end) - time.time()
        print(f"== {s} ({box:.0f} s)", flush=True)
        if box < 2:
            results[s] = [dict(section=s, item=s, status=NOT_CHECKED, note="the whole check's time budget ran out")]
            continue
        began = time.time()
        results[s] = run_section(s, ctx, inline, box)
        print(f"   {s}: {time.time() - began:.0f} s", flush=True)
    for t in background:
        t.join()
    return [r for s in ORDER for r in results.get(s, [])]


def render(rows: list[dict], meta: dict) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in (PASSED, FAILED, NOT_CHECKED, MEASURED)}
    device = next((r.get("version") for r in rows if r["item"] == "device"), meta["device"])
    lines = [
        f"# GPU check ({meta['date']})", "",
        f"`{meta['command']}` on {device}: {meta['seconds']:.0f} s of a {meta['budget']:.0f} s budget"
        + (" (--quick: tiny sizes; timings mean nothing)" if meta["quick"] else "") + ".", "",
        f"**{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_CHECKED]} not checked**, "
        f"{counts[MEASURED]} measured (numbers without a goal). Nothing absent is ever reported as passed.", "",
        "Goals (issue 15):", "",
    ]
    goals = [r for r in rows if (r["section"] == "step" and "fp8=none" in r["item"]) or r["item"].startswith("speedup")
             or (r["item"].endswith(": linear") and not r["item"].startswith("sdpa"))]
    lines += [f"- {r['section']} / {r['item']}: **{r['status']}**"
              + "".join(f", {k} {r[k]}" for k in ("mfu", "speedup", "ratio") if k in r) for r in goals] or ["- none ran"]
    for section in ORDER:
        sec_rows = [r for r in rows if r["section"] == section]
        if not sec_rows:
            continue
        title, _, what = SECTIONS[section]
        lines += ["", f"## {title}", "", what, ""]
        keys = [k for k in dict.fromkeys(k for r in sec_rows for k in r) if k not in ("section", "item", "status", "note", "log")]
        lines.append("| " + " | ".join(["item", "status", *keys, "note"]) + " |")
        lines.append("|" + "---|" * (len(keys) + 3))
        for r in sec_rows:
            cells = [str(r.get(k, "")).replace("|", "/") for k in keys]
            lines.append("| " + " | ".join([r["item"], r["status"], *cells, r.get("note", "")]) + " |")
        for r in sec_rows:
            if r.get("log"):
                lines += ["", f"`{r['item']}`, the end of its log:", "", "```", r["log"], "```"]
    skipped = [r for r in rows if r["status"] == NOT_CHECKED]
    if skipped:
        lines += ["", "## Not checked", ""] + [f"- {r['section']} / {r['item']}: {r.get('note') or '-'}" for r in skipped]
    return "\n".join(lines) + "\n"


def ensure_corpus(path: Path, quick: bool) -> None:
    if (path / "manifest.json").exists():
        return
    print(f"== building the demo corpus at {path}", flush=True)
    subprocess.run([sys.executable, "-m", "data.demo", "build", "--out", str(path), "--scale", "0.02", "--heldout", "16"]
                   + (["--workers", "1"] if quick else []), cwd=ROOT, check=True, timeout=300)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the tiny preset instead of the 33B), 1-2 steps")
    p.add_argument("--out", default=None, help="the report (default: bench/RESULTS-gpu.md on CUDA, "
                                                "out/gpu_check/RESULTS-cpu.md on CPU)")
    p.add_argument("--work", default=str(ROOT / "out" / "gpu_check"), help="logs, rows, launcher runs")
    p.add_argument("--corpus", default=None, help="a demo corpus (default: WORK/corpus, built if missing)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 270; --quick 600)")
    p.add_argument("--sections", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--assume-missing", default="", help="packages to treat as absent (tests: NOT CHECKED paths)")
    p.add_argument("--inline", action=argparse.BooleanOptionalAction, default=None,
                   help="run sections in this process (default with --quick) instead of one process each")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    ctx = Ctx(a.device, a.quick, work, Path(a.corpus).resolve() if a.corpus else work / "corpus",
              frozenset(filter(None, a.assume_missing.split(","))), a.deadline)
    if a.worker:
        WORKERS[a.worker](ctx, Rows(a.worker, Path(a.rows)), **json.loads(a.params))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was checked. "
              "Run it on the GPU machine, or `--device cpu --quick` for the check's own code.", file=sys.stderr)
        return 2
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(ORDER))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {ORDER}")
    out_path = Path(a.out or (ROOT / "bench" / "RESULTS-gpu.md" if a.device == "cuda" else work / "RESULTS-cpu.md"))
    budget = a.budget or (600.0 if a.quick else 270.0)
    inline = a.quick if a.inline is None else a.inline
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if "launchers" in sections:
        ensure_corpus(ctx.corpus, a.quick)
    rows = run_all(ctx, sections, budget - (time.time() - start), inline)
    rows += [dict(section=s, item=s, status=NOT_CHECKED, note="not selected (--sections)") for s in ORDER if s not in sections]
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), device=a.device, quick=a.quick,
                seconds=time.time() - start, budget=budget,
                command="python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render(rows, meta))
    print(out_path.read_text(), flush=True)
    print(f"gpu_check: report written to {out_path}", flush=True)
    return 1 if any(r["status"] == FAILED for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
