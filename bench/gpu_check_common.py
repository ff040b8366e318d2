"""What the GPU check's driver (bench/gpu_check.py) and its sections (bench/gpu_check_sections.py)
share: the result statuses and goals, the sections' table, the run context (`Ctx`), the rows a
section reports (`Rows`), and helpers (package and kernel availability, device sync, memory peaks,
killing a process tree)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

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


def kill_tree(proc: subprocess.Popen) -> None:
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
