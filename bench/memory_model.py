"""The memory model (training/memory.py) against measured peaks, at small scale on CPU.

    python bench/memory_model.py                          # the table in bench/RESULTS.md
    python bench/memory_model.py --layouts tiny:1024:ac tiny:1024:noac --json

A layout is PRESET:SEQ_LEN:ac|noac (ac: training.distributed.apply_activation_checkpointing). Each
runs in a fresh process with one thread: two training steps of model.vlm.Exaone45 (fp32, sdpa) on
one packed random row of SEQ_LEN tokens (an image document, then text documents), then one AdamW
step (training.optim.build_optimizer). Measured per part:

- parameters, gradients, optimizer state: bytes of the tensors (the parameters, the gradients the
  first backward allocated, the optimizer's state after its step); exact.
- activation peak: the second step's peak resident memory above the resident memory just before it,
  the way bench/context_parallel.py measures it: the high-water mark (Linux VmHWM) is reset through
  /proc/self/clear_refs, and glibc serves every allocation above 64 KiB with its own mmap
  (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once. Weights, gradients
  (zeroed, accumulated into in place) and the batch are in the baseline; the first step has already
  loaded the kernels' code and JIT-compiled matmul kernels (~20 MiB, not the step's memory). What is
  left is what forward + backward allocate: saved activations, attention masks, the chunked loss's
  logits, transient gradients.

The estimate is training.memory.estimate(cfg, seq_len, dp=1, cp=1, micro_batch=1, ac,
activation_bytes=4), fp32 like the measurement; its activation peak is activations +
attention_masks + loss_chunk. Its FSDP term (gathered_layer_bf16) has no counterpart at one rank
without FSDP and is left out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
DEFAULT_LAYOUTS = ["tiny:1024:ac", "tiny:1024:noac", "tiny:4096:ac", "tiny:4096:noac", "small:1024:ac", "small:1024:noac"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def packed_row(cfg, seq_len: int, seed: int = 0):
    """One packed row of exactly seq_len tokens: an image document (8x8 patches -> 16 image tokens)
    first, then random text documents of seq_len/8 .. seq_len/2 tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    grid = (1, 8, 8)
    merged = grid[1] * grid[2] // cfg.vision_config.spatial_merge_size**2
    docs = [[cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id]
            + torch.randint(80, vocab, (min(100, seq_len // 4),), generator=g).tolist()]
    used = len(docs[0])
    while used < seq_len:
        n = min(int(torch.randint(seq_len // 8, seq_len // 2 + 1, (1,), generator=g)), seq_len - used)
        docs.append(torch.randint(80, vocab, (n,), generator=g).tolist())
        used += n
    ids = [t for d in docs for t in d]
    labels = [t if t != cfg.image_token_id else -100 for t in ids]
    vc = cfg.vision_config
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return types.SimpleNamespace(
        input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
        position_ids=torch.tensor([[i for d in docs for i in range(len(d))]]),
        cu_seqlens=torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32),
        pixel_values=torch.randn(grid[1] * grid[2], patch, generator=g), image_grid_thw=torch.tensor([grid]),
    )


def forward(model, batch):
    return model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.labels, batch.position_ids, batch.cu_seqlens)


def measure(preset_name: str, seq_len: int, ac: bool) -> dict:
    """One training step in this process (call it in a fresh one); bytes per part."""
    import torch

    from model.config import preset
    from model.vlm import build_model
    from training.parallelize import apply_activation_checkpointing
    from training.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = preset(preset_name)
    batch = packed_row(cfg, seq_len)
    torch.manual_seed(0)
    model = build_model(cfg)
    if ac:
        apply_activation_checkpointing(model)
    train = types.SimpleNamespace(lr=1e-4, lr_vision=None, lr_merger=None, freeze=[], weight_decay=0.1, betas=[0.9, 0.95])
    optimizer = build_optimizer(model, train)
    params = list(model.parameters())
    # A first step (same length, other tokens) allocates the gradients and loads the kernels' code
    # pages and JIT-compiled matmul kernels into the resident set. The second step is measured, its
    # gradients accumulating into the zeroed ones, so what it adds is its activations alone.
    forward(model, packed_row(cfg, seq_len, seed=1)).loss.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    without_grad = sum(p.numel() for p in params if p.grad is None)
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    gc.collect()

    base = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    out = forward(model, batch)
    forward_peak = peak_bytes() - base
    after_forward = rss_bytes() - base
    reset_peak()
    out.loss.backward()
    backward_peak = peak_bytes() - base
    seconds = time.perf_counter() - start
    loss = float(out.loss.detach())
    del out
    gc.collect()

    before_step = rss_bytes()
    optimizer.step()
    optimizer_rss = rss_bytes() - before_step
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "layout": f"{preset_name}:{seq_len}:{'ac' if ac else 'noac'}",
        "preset": preset_name, "seq_len": seq_len, "ac": ac, "seconds": seconds, "loss": loss,
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": gradients, "params_without_grad": without_grad,
        "optimizer": sum(t.numel() * t.element_size() for t in state),
        "optimizer_rss": optimizer_rss,
        "activations": max(forward_peak, backward_peak),
        "forward_peak": forward_peak, "after_forward": after_forward, "backward_peak": backward_peak,
    }


def run_layout(layout: str, timeout: int = 300) -> dict:
    """measure() in a fresh process: one thread, glibc returning freed blocks above 64 KiB at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", layout], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {layout} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse(layout: str) -> tuple[str, int, bool]:
    name, seq, ac = layout.split(":")
    if ac not in ("ac", "noac"):
        raise ValueError(f"layout {layout!r}: expected PRESET:SEQ_LEN:ac|noac")
    return name, int(seq), ac == "ac"


def estimate_for(layout: str) -> dict:
    """training.memory.estimate for the layout at one rank, fp32 activations, in bytes."""
    from model.config import preset
    from training.memory import estimate

    name, seq, ac = parse(layout)
    est = estimate(preset(name), seq, 1, 1, 1, ac, activation_bytes=4)
    return {k: v * 1024**3 for k, v in est.items()}


ACTIVATION_PARTS = ("activations", "attention_masks", "loss_chunk")


def compare(measured: dict, est: dict) -> list[tuple[str, float, float]]:
    """(part, estimate bytes, measured bytes) for the parts that exist at one rank without FSDP."""
    rows = [(part, est[part], measured[part]) for part in ("parameters", "gradients", "optimizer")]
    rows.append(("activation peak", sum(est[p] for p in ACTIVATION_PARTS), measured["activations"]))
    return rows


def table(results: list[dict]) -> str:
    lines = ["| layout | part | estimate MiB | measured MiB | estimate / measured |", "|---|---|---|---|---|"]
    for m in results:
        est = estimate_for(m["layout"])
        for part, e, got in compare(m, est):
            if part == "activation peak":
                part += " (" + " + ".join(f"{est[p] / MIB:.1f} {p.replace('_', ' ')}" for p in ACTIVATION_PARTS) + ")"
            lines.append(f"| {m['layout']} | {part} | {e / MIB:.1f} | {got / MIB:.1f} | {e / got:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, help="PRESET:SEQ_LEN:ac|noac")
    p.add_argument("--json", action="store_true", help="also print each measurement as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(*parse(args.worker))), flush=True)
        return
    results = []
    for layout in args.layouts:
        m = run_layout(layout)
        results.append(m)
        print(f"{layout}: step {m['seconds']:.1f} s, loss {m['loss']:.4f}, forward peak {m['forward_peak'] / MIB:.0f} MiB, "
              f"backward peak {m['backward_peak'] / MIB:.0f} MiB", flush=True)
        if args.json:
            print(json.dumps(m), flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
