"""Held-out accuracy after GRPO with native vs vLLM rollouts from the same start (by hand, not CI).

    bash scripts/setup.sh vllm
    OMP_NUM_THREADS=2 python bench/grpo_engines.py --out out/grpo_engines [--steps 100] [--sft-steps 400] \
        [--native-seeds 0 1]    # more native runs (train.seed) measure the run-to-run spread

1. The start: the tiny model fine-tuned on the demo corpus's math chats (text only; the pretraining
   loop with the loss on assistant turns, as tests/rl/test_grpo_learning.py does for counting).
2. GRPO from it twice, 2 ranks over gloo, `+recipe=grpo +scale=mini` on math only with reasoning off,
   identical but for `rl.rollout_engine=native|vllm` (same train.seed).
3. eval/accuracy (the 200 held-out math prompts x 4 answers sampled at T=1, and greedy) before and
   after, with binomial standard errors (answers to the same prompt are correlated, so these are
   lower bounds), and the difference of the two runs in standard errors. Those cover the
   evaluation's noise only; GRPO runs differ from seed to seed by more, which extra native seeds show.

A run whose directory already holds its final step is not run again (delete it to rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT = ["+scale=mini", "wandb.mode=disabled", "data.num_workers=0", "stage=sft_math", "+data.stages.sft_math={math: 1.0}",
       "data.seq_len=128", "train.micro_batch_size=8", "train.warmup_steps=10", "train.lr=3e-3",
       "model.mtp_loss_weight=0", "checkpoint.every=100000", "eval.batches=0"]
GRPO = ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", "data.num_workers=0", "data.stages.grpo.counting=0",
        "rl.enable_thinking=false", "rl.max_new_tokens=32", "train.lr=3e-4", "checkpoint.every=100000"]


def torchrun(script: str, overrides: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(ROOT / "launch" / script), *overrides]
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def rows(run_dir: Path) -> list[dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return [out[k] for k in sorted(out)]


def done(run_dir: Path, step: int) -> bool:
    return (run_dir / "metrics.jsonl").exists() and rows(run_dir)[-1]["step"] == step


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/grpo_engines")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="train.seed of the SFT start and of both GRPO runs")
    p.add_argument("--native-seeds", type=int, nargs="*", default=[], help="extra native GRPO runs with these seeds")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sft = out / "sft"
    if not done(sft, args.sft_steps):
        s = torchrun("pretrain.py", SFT + [f"run_dir={sft}", f"train.steps={args.sft_steps}", f"train.seed={args.seed}"],
                     out / "sft.log")
        print(f"SFT start: {args.sft_steps} steps in {s:.0f} s", flush=True)
    results = {}
    runs = [("native", "native", args.seed), ("vllm", "vllm", args.seed)]
    runs += [(f"native_seed{s}", "native", s) for s in args.native_seeds if s != args.seed]
    for name, engine, seed in runs:
        run = out / name
        if not done(run, args.steps):
            s = torchrun("grpo.py", GRPO + [f"run_dir={run}", f"init_from={sft}", f"train.steps={args.steps}",
                                            f"train.seed={seed}", f"rl.rollout_engine={engine}"], out / f"{name}.log")
            print(f"GRPO {name}: {args.steps} steps in {s:.0f} s", flush=True)
        results[name] = rows(run)
    n = results["native"][0]["eval/prompts"]
    samples = n * 4
    print(f"\nheld-out math, {n} prompts x 4 sampled answers (T=1) and 1 greedy; binomial standard errors")
    print("| engine | accuracy before | accuracy after | greedy before | greedy after | logprob_diff_max (max over steps) "
          "| sync_s (mean) | rollout_s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        before, after, steps = r[0], r[-1], [x for x in r[1:] if "rollout_s" in x]
        print(f"| {engine} | {before['eval/accuracy']:.3f} ± {se(before['eval/accuracy'], samples):.3f} "
              f"| {after['eval/accuracy']:.3f} ± {se(after['eval/accuracy'], samples):.3f} "
              f"| {before['eval/accuracy_greedy']:.3f} ± {se(before['eval/accuracy_greedy'], n):.3f} "
              f"| {after['eval/accuracy_greedy']:.3f} ± {se(after['eval/accuracy_greedy'], n):.3f} "
              f"| {max(x['rollout/logprob_diff_max'] for x in steps):.1e} "
              f"| {sum(x['rollout/sync_s'] for x in steps) / len(steps):.2f} "
              f"| {sum(x['rollout_s'] for x in steps) / len(steps):.2f} |")
    for key, count in (("eval/accuracy", samples), ("eval/accuracy_greedy", n)):
        a = results["native"][-1][key]
        for name in [r for r in results if r != "native"]:
            b = results[name][-1][key]
            diff_se = math.hypot(se(a, count), se(b, count))
            print(f"after {args.steps} steps, {key}: {name} - native = {b - a:+.3f} ({(b - a) / diff_se:+.2f} standard errors)")


if __name__ == "__main__":
    main()
