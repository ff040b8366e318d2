"""Context-parallel memory benchmark: one long packed sequence (several documents and an image) trains,
forward and backward, on the tiny model at cp=1 and at cp=N (N real processes, gloo, CPU, fp32);
we compare each rank's peak activation memory, then time the sliding-window attention with and
without exploiting locality.

    python bench/context_parallel.py --seq-len 32768 --cp 2 --checkpoint-layers
    python bench/context_parallel.py --seq-len 16384 --cp 2

`--checkpoint-layers` recomputes each decoder layer in backward (activation checkpointing, as
long-context training runs): without it, one 32K-token forward at cp=1 keeps a float copy of the
dense [L, L] attention mask per layer (SDPA's CPU kernel converts the boolean mask and saves the
copy for backward) and was killed for memory at 22.8 GB on this 23 GB machine.

Method: each configuration runs in fresh processes. Just before the step a process resets its
resident-memory high-water mark (Linux VmHWM, through /proc/self/clear_refs) and records its resident
memory; after forward + backward, activation memory = VmHWM - that baseline. The baseline holds the
interpreter, the weights, the batch and the communication buffers, so the difference is what the
step itself allocated: activations, attention masks, gradients and the kernels' workspaces. glibc's
malloc is told to serve every allocation above 64 KiB with its own mmap (MALLOC_MMAP_THRESHOLD_), so
freed tensors go back to the OS at once and resident memory follows the live tensors instead of
the allocator's history.
Threads are split so each configuration uses every core (cp=1: all cores; cp=N: cores / N each).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.checkpoint import checkpoint  # noqa: E402

from model.config import preset  # noqa: E402
from model.vlm import build_model  # noqa: E402
from training.context_parallel import (  # noqa: E402
    apply_context_parallel,
    chunk_owner,
    cp_loss,
    gathered_attention,
    shard_batch,
    sliding_window_attention,
)

MIB = 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


def config(window: int):
    cfg = preset("tiny")
    cfg.text_config.sliding_window = window
    return cfg


def long_batch(cfg, length: int, seed: int = 0):
    """One row: an image document first, then text documents of 1K-8K tokens, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    grid = (1, 16, 16)
    docs = [[cfg.vision_start_token_id] + [cfg.image_token_id] * 64 + [cfg.vision_end_token_id]
            + torch.randint(80, vocab, (500,), generator=g).tolist()]
    used = len(docs[0])
    while used < length:
        n = min(int(torch.randint(1024, 8192, (1,), generator=g)), length - used)
        docs.append(torch.randint(80, vocab, (n,), generator=g).tolist())
        used += n
    ids = [t for d in docs for t in d]
    labels = [t if t != cfg.image_token_id else -100 for t in ids]
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    return types.SimpleNamespace(
        input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
        position_ids=torch.tensor([[i for d in docs for i in range(len(d))]]), cu_seqlens=cu,
        pixel_values=torch.randn(grid[1] * grid[2], 1176, generator=g), image_grid_thw=torch.tensor([grid]),
    )


def checkpoint_layers(model) -> None:
    """Recompute every decoder layer (trunk and MTP) in backward; only layer inputs are kept."""
    layers = list(model.language_model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def train_step(model, batch, cfg, group):
    if group is None:
        out = model(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.labels,
                    batch.position_ids, batch.cu_seqlens)
        loss = total = out.loss
    else:
        input_ids, shard = shard_batch(model, batch, group)
        out = model(input_ids, shard=shard)
        loss, total = cp_loss(out, group, cfg.mtp_loss_weight)
    loss.backward()
    return float(total.detach())


def sliding_comparison(cfg, batch, group, rank):
    """One sliding layer's attention at this sequence length: halo exchange vs all-gathered K/V."""
    tc = cfg.text_config
    _, shard = shard_batch(apply_context_parallel(build_model(cfg), group), batch, group)
    spec, window = shard.mask_spec, tc.sliding_window
    L_local = shard.position_ids.shape[1]
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, tc.num_attention_heads, L_local, tc.head_dim, generator=g, requires_grad=True)
    k = torch.randn(1, tc.num_key_value_heads, L_local, tc.head_dim, generator=g, requires_grad=True)
    v = torch.randn(1, tc.num_key_value_heads, L_local, tc.head_dim, generator=g, requires_grad=True)
    kv_token_bytes = 2 * tc.num_key_value_heads * tc.head_dim * 4
    span, recvs, _ = spec.halo_plan(window)
    remote = sum(chunk_owner(p, spec.cp)[0] != rank for _, p in recvs)
    results = {
        "halo": dict(fn=sliding_window_attention, recv_mib=remote * span * kv_token_bytes / MIB),
        "allgather": dict(fn=gathered_attention, recv_mib=(spec.cp - 1) * L_local * kv_token_bytes / MIB),
    }
    outs = {}
    for name, r in results.items():
        dist.barrier(group)
        base = rss_mib()
        reset_peak()
        start = time.perf_counter()
        out = r.pop("fn")(q, k, v, spec, group, scale=tc.head_dim**-0.5, window=window)
        out.square().sum().backward()
        r["seconds"] = time.perf_counter() - start
        r["peak_mib"] = peak_mib() - base
        outs[name] = out.detach()
        q.grad = k.grad = v.grad = None
        del out
    results["max_abs_diff"] = float((outs["halo"] - outs["allgather"]).abs().max())
    return results


def worker(rank, cp, args, path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    group = None
    if cp > 1:
        dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=cp)
        group = dist.group.WORLD
    cfg = config(args.window)
    batch = long_batch(cfg, args.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg)
    if group is not None:
        apply_context_parallel(model, group, args.impl)
        dist.barrier(group)
    if args.checkpoint_layers:
        checkpoint_layers(model)
    base = rss_mib()
    reset_peak()
    start = time.perf_counter()
    loss = train_step(model, batch, cfg, group)
    result = dict(rank=rank, seconds=time.perf_counter() - start, baseline_mib=base,
                  activation_mib=peak_mib() - base, loss=loss)
    if group is not None:
        del model
        result["sliding"] = sliding_comparison(cfg, batch, group, rank)
        everyone = [None] * cp
        dist.all_gather_object(everyone, result, group=group)
        dist.destroy_process_group()
    else:
        everyone = [result]
    if rank == 0:
        with open(path, "w") as f:
            json.dump(everyone, f)


def run(cp: int, args) -> list[dict]:
    path = os.path.join(tempfile.mkdtemp(), f"cp{cp}.json")
    mp.spawn(worker, args=(cp, args, path), nprocs=cp, join=True)
    with open(path) as f:
        return json.load(f)


def main():
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the spawned processes' malloc
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--impl", default="allgather", choices=["allgather", "ulysses"])
    p.add_argument("--window", type=int, default=1024, help="sliding window of the tiny model's local layers")
    p.add_argument("--checkpoint-layers", action="store_true", help="activation checkpointing per decoder layer")
    args = p.parse_args()

    single, sharded = run(1, args)[0], run(args.cp, args)
    worst = max(r["activation_mib"] for r in sharded)
    ac = "per-layer activation checkpointing" if args.checkpoint_layers else "no activation checkpointing"
    print(f"\ntiny model, {args.seq_len} tokens, sliding window {args.window}, cp_impl={args.impl}, {ac}, fp32, CPU")
    print("| cp | rank | step s | activation peak MiB | loss |")
    print("|---|---|---|---|---|")
    print(f"| 1 | 0 | {single['seconds']:.1f} | {single['activation_mib']:.0f} | {single['loss']:.6f} |")
    for r in sharded:
        print(f"| {args.cp} | {r['rank']} | {r['seconds']:.1f} | {r['activation_mib']:.0f} | {r['loss']:.6f} |")
    print(f"\nper-rank peak activation memory, cp={args.cp} / cp=1: {worst / single['activation_mib']:.3f}")
    print(f"loss, cp={args.cp} vs cp=1: relative difference {abs(sharded[0]['loss'] / single['loss'] - 1):.2e}")
    print("\none sliding layer's attention (forward + backward) on each rank's shard:")
    print("| rank | K/V from | K/V received MiB | seconds | peak MiB |")
    print("|---|---|---|---|---|")
    for r in sharded:
        for name in ("halo", "allgather"):
            s = r["sliding"][name]
            print(f"| {r['rank']} | {name} | {s['recv_mib']:.2f} | {s['seconds']:.2f} | {s['peak_mib']:.0f} |")
    print(f"halo vs allgather outputs: max abs difference {max(r['sliding']['max_abs_diff'] for r in sharded):.1e}")


if __name__ == "__main__":
    main()
