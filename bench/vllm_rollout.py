"""GRPO rollout throughput: vLLM (rl.vllm_engine, its own venv and process) against our KV-cache
`model.generate.generate`, on the same prompts and weights, in one run; then vLLM's weight-sync cost.

    bash scripts/setup.sh vllm
    python bench/vllm_rollout.py [--model small] [--prompts 8] [--group 8] [--prompt-len 128]
                                 [--new-tokens 128] [--dtype float32] [--rounds 3] [--syncs 3]

Both sample `--group` completions of each prompt at temperature 1 with no stop token, so both
generate exactly prompts x group x new-tokens tokens. Ours decodes all sequences as one batch (as
rl.rollout does with generation_batch_size >= prompts x group); vLLM gets them as one request of
n = group per prompt. The two alternate for `--rounds` rounds (native, then vLLM) with the server
up throughout (idle while ours runs: ~1% of a core), so both see the same load on a shared
machine; the ratio is the median of the rounds' ratios. Wall time on a shared machine moves with
other jobs, so each round also records CPU seconds (ours: this process; vLLM: every process of the
server's group, from /proc), which moves far less. Then `--syncs` weight updates of the perturbed full state dict:
seconds per step and per GB, split into writing the safetensors to /dev/shm and the server's
in-place reload. Prints markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.config import preset  # noqa: E402
from model.generate import generate  # noqa: E402
from model.vlm import build_model  # noqa: E402
from rl.vllm_engine import VLLMEngine, export_text_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--syncs", type=int, default=3)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = preset(args.model)
    model = build_model(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, cfg.text_config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    total_tokens = args.prompts * args.group * args.new_tokens

    repeated = [q for q in prompts for _ in range(args.group)]

    def run_native(round_: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        out = generate(model, repeated, max_new_tokens=args.new_tokens, temperature=1.0,
                       generator=torch.Generator().manual_seed(round_))
        assert sum(map(len, out.tokens)) == total_tokens
        return time.perf_counter() - start, time.process_time() - cpu

    def run_vllm(round_: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), group_cpu_s(engine.proc.pid)
        outs = engine.generate(prompts, n=args.group, temperature=1.0, max_new_tokens=args.new_tokens, seed=round_)
        assert sum(len(c[0]) for row in outs for c in row) == total_tokens
        return time.perf_counter() - start, group_cpu_s(engine.proc.pid) - cpu

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_text_model(model.state_dict(), cfg, Path(tmp) / "model")
        start = time.perf_counter()
        engine = VLLMEngine.start(model_dir, dtype=args.dtype, max_model_len=args.prompt_len + args.new_tokens,
                                  kv_cache_gib=args.kv_cache_gib, log_path=Path(tmp) / "server.log")
        startup_s = time.perf_counter() - start
        try:
            engine.generate(prompts[:1], n=1, max_new_tokens=4, seed=0)  # warm-up
            rounds = [(run_native(r), run_vllm(r)) for r in range(args.rounds)]
            syncs = []
            for _ in range(args.syncs):
                with torch.no_grad():
                    for param in model.parameters():
                        param.add_(torch.randn_like(param) * 1e-3)
                engine.update_weights(model.state_dict())
                syncs.append(engine.last_sync)
        finally:
            engine.stop()

    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.model} {args.dtype}, {args.prompts} prompts x "
          f"{args.group} completions, {args.prompt_len}-token prompts, {args.new_tokens} new tokens "
          f"({total_tokens} per round); vLLM start-up {startup_s:.1f} s")
    print("| round | native wall s (tok/s) | vLLM wall s (tok/s) | speed-up, wall | native CPU s | vLLM CPU s | speed-up, CPU |")
    print("|---|---|---|---|---|---|---|")
    for r, ((n_s, n_cpu), (v_s, v_cpu)) in enumerate(rounds):
        print(f"| {r + 1} | {n_s:.1f} ({total_tokens / n_s:.0f}) | {v_s:.1f} ({total_tokens / v_s:.0f}) | {n_s / v_s:.2f}x "
              f"| {n_cpu:.1f} | {v_cpu:.1f} | {n_cpu / v_cpu:.2f}x |")
    median = statistics.median
    print(f"| median | {median(n[0] for n, _ in rounds):.1f} | {median(v[0] for _, v in rounds):.1f} | "
          f"**{median(n[0] / v[0] for n, v in rounds):.2f}x** | {median(n[1] for n, _ in rounds):.1f} | "
          f"{median(v[1] for _, v in rounds):.1f} | **{median(n[1] / v[1] for n, v in rounds):.2f}x** |")
    gb = syncs[0].bytes / 1e9
    step_s, write_s, load_s = (statistics.mean(getattr(s, k) for s in syncs) for k in ("total_s", "write_s", "load_s"))
    print()
    print("| weight sync | GB | seconds per step | write to /dev/shm | server reload | seconds per GB |")
    print("|---|---|---|---|---|---|")
    print(f"| mean of {len(syncs)} | {gb:.3f} | {step_s:.2f} | {write_s:.2f} | {load_s:.2f} | {step_s / gb:.2f} |")


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes in a process group (the server's)."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid:
            ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":  # the engine spawns processes
    main()
