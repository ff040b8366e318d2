"""Data loader throughput and packing efficiency on the demo corpus.

    python bench/data_loader.py [--root data/demo/corpus] [--seq-len 4096] [--micro-batch 2] [--batches 40] [--repeat 3]

For 1 and 2 data-loader workers: samples/s and tokens/s of the full path (mixture, decode,
image processing, tokenization, packing) against a plain webdataset read of the same shards
(tar reading + JSON and PIL image decoding, nothing else), their ratio, and the packing efficiency
(real tokens / slots) of the default mixture and of the chats-only `sft` stage (no splittable text).
Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from data.mixture import DataConfig, build_loader, ensure_demo_corpus, source_shards, to_data_config  # noqa: E402
from data.text import load_tokenizer  # noqa: E402


def full_path(cfg: DataConfig, tokenizer, workers: int, seq_len: int, micro_batch: int, batches: int, warmup: int = 3):
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": workers})
    loader = build_loader(cfg, tokenizer=tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=micro_batch,
                          seq_len=seq_len)
    samples = tokens = slots = 0
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and first blocks
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(it)
        samples += len(batch.sample_ids)
        tokens += batch.num_tokens
        slots += batch.input_ids.numel()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    it.close()
    return {"samples_s": samples / elapsed, "tokens_s": tokens / elapsed, "efficiency": tokens / slots,
            "samples": samples, "skipped": sum(loader.skipped.values()), "cpu_ms": 1e3 * cpu / samples}


def plain_webdataset(cfg: DataConfig, workers: int, samples: int):
    import webdataset as wds

    shards = [p for paths in source_shards(cfg, "train").values() for p in paths]
    dataset = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .decode("pil").repeat())
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(200):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(samples):
        next(it)
    return {"samples_s": samples / (time.perf_counter() - start), "cpu_ms": 1e3 * (time.process_time() - cpu) / samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="demo corpus root (default: data/demo/corpus, built if missing)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs (the machine may be shared)")
    args = parser.parse_args()

    demo = OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "data" / "demo.yaml"))
    cfg = to_data_config({**demo, "root": args.root})
    ensure_demo_corpus(cfg)
    tokenizer = load_tokenizer(None)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.batches} batches after 3 warm-up batches, best of {args.repeat}")
    print("| workers | full path samples/s | full path tokens/s | plain webdataset samples/s | ratio | packing efficiency |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        full = max((full_path(cfg, tokenizer, workers, args.seq_len, args.micro_batch, args.batches)
                    for _ in range(args.repeat)), key=lambda r: r["samples_s"])
        plain = max((plain_webdataset(cfg, workers, max(1000, full["samples"])) for _ in range(args.repeat)),
                    key=lambda r: r["samples_s"])
        print(f"| {workers} | {full['samples_s']:.0f} | {full['tokens_s']:.0f} | {plain['samples_s']:.0f} | "
              f"{full['samples_s'] / plain['samples_s']:.2f} | {full['efficiency']:.4f} |", flush=True)
    full = min((full_path(cfg, tokenizer, 0, args.seq_len, args.micro_batch, args.batches) for _ in range(args.repeat)),
               key=lambda r: r["cpu_ms"])
    plain = min((plain_webdataset(cfg, 0, 2000) for _ in range(args.repeat)), key=lambda r: r["cpu_ms"])
    print(f"\nIn one process (no workers; CPU time, less sensitive to a busy machine): full path "
          f"{full['cpu_ms']:.2f} ms CPU per sample ({1e3 / full['cpu_ms']:.0f} samples per CPU-second), plain webdataset "
          f"{plain['cpu_ms']:.2f} ms ({1e3 / plain['cpu_ms']:.0f}); ratio {plain['cpu_ms'] / full['cpu_ms']:.2f}")
    print()
    print("| mixture | seq_len | packing efficiency |")
    print("|---|---|---|")
    for stage in [None, "sft", "grpo"]:
        for seq_len in sorted({args.seq_len, 1024}, reverse=True):
            staged = DataConfig(**{**cfg.__dict__, "mixture": dict(cfg.stages[stage]) if stage else dict(cfg.mixture)})
            r = full_path(staged, tokenizer, 0, seq_len, args.micro_batch, 10, warmup=1)
            print(f"| {stage or 'default (pretraining)'} | {seq_len} | {r['efficiency']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
