"""Held-out accuracy after GRPO with native vs vLLM rollouts from the same start (by hand, not CI).

    bash scripts/setup.sh vllm
    OMP_NUM_THREADS=2 python bench/grpo_engines.py --out out/grpo_engines [--steps 100] [--sft-steps 400] \
        [--seeds 0 1]                      # both engines, each seed (train.seed): the run-to-run spread
    python bench/grpo_engines.py --out out/engines_sft300 --start out/weak/sft300 --recipe-defaults --seeds 0 1

1. The start: the tiny model fine-tuned on the demo corpus's math chats (text only; the pretraining
   loop with the loss on assistant turns, as tests/rl/test_grpo_learning.py does for counting), or
   `--start DIR`, any checkpoint GRPO can start from (e.g. a demo SFT run).
2. GRPO from it with each engine and each seed, 2 ranks over gloo, `+recipe=grpo +scale=mini` on math
   only (vLLM on CPU serves text), identical but for `rl.rollout_engine=native|vllm`; with reasoning
   off, 32 new tokens and lr 3e-4, or the miniature's own defaults with `--recipe-defaults`.
3. eval/accuracy (the 200 held-out math prompts x 4 answers sampled at T=1, and greedy) before and
   after, with binomial standard errors (answers to the same prompt are correlated, so these are
   lower bounds), and the difference of the engines' means over the seeds in standard errors. Those
   cover the evaluation's noise only; GRPO runs differ from seed to seed by more, which the spread
   of one engine's seeds shows.

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
        "checkpoint.every=100000"]
BENCH_SETTINGS = ["rl.enable_thinking=false", "rl.max_new_tokens=32", "train.lr=3e-4"]  # unless --recipe-defaults


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
    p.add_argument("--start", default=None, help="start from this checkpoint instead of the math SFT")
    p.add_argument("--recipe-defaults", action="store_true",
                   help="GRPO at +scale=mini's defaults (reasoning on, lr 3e-5) instead of " + " ".join(BENCH_SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of the GRPO runs, each engine")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = Path(args.start).resolve() if args.start else out / "sft"
    if args.start is None and not done(start, args.sft_steps):
        s = torchrun("pretrain.py", SFT + [f"run_dir={start}", f"train.steps={args.sft_steps}", f"train.seed={args.seeds[0]}"],
                     out / "sft.log")
        print(f"SFT start: {args.sft_steps} steps in {s:.0f} s", flush=True)
    settings = GRPO + ([] if args.recipe_defaults else BENCH_SETTINGS)
    results = {}
    for seed in args.seeds:
        for engine in ("native", "vllm"):
            name = f"{engine}_seed{seed}"
            run = out / name
            if not done(run, args.steps):
                s = torchrun("grpo.py", settings + [f"run_dir={run}", f"init_from={start}", f"train.steps={args.steps}",
                                                    f"train.seed={seed}", f"rl.rollout_engine={engine}"], out / f"{name}.log")
                print(f"GRPO {name}: {args.steps} steps in {s:.0f} s", flush=True)
            results[(engine, seed)] = rows(run)
    n = results[("native", args.seeds[0])][0]["eval/prompts"]
    samples = n * 4
    print(f"\nheld-out math, {n} prompts x 4 sampled answers (T=1) and 1 greedy; binomial standard errors")
    print("| engine, seed | accuracy before | accuracy after | greedy before | greedy after "
          "| logprob_diff_max (max over steps) | sync_s (mean) | rollout_s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for (engine, seed), r in results.items():
        before, after, steps = r[0], r[-1], [x for x in r[1:] if "rollout_s" in x]
        print(f"| {engine}, {seed} | {before['eval/accuracy']:.3f} ± {se(before['eval/accuracy'], samples):.3f} "
              f"| {after['eval/accuracy']:.3f} ± {se(after['eval/accuracy'], samples):.3f} "
              f"| {before['eval/accuracy_greedy']:.3f} ± {se(before['eval/accuracy_greedy'], n):.3f} "
              f"| {after['eval/accuracy_greedy']:.3f} ± {se(after['eval/accuracy_greedy'], n):.3f} "
              f"| {max(x['rollout/logprob_diff_max'] for x in steps):.1e} "
              f"| {sum(x['rollout/sync_s'] for x in steps) / len(steps):.2f} "
              f"| {sum(x['rollout_s'] for x in steps) / len(steps):.2f} |")
    k = len(args.seeds)
    for key, count in (("eval/accuracy", samples), ("eval/accuracy_greedy", n)):
        after = {e: [results[(e, s)][-1][key] for s in args.seeds] for e in ("native", "vllm")}
        mean = {e: sum(v) / k for e, v in after.items()}
        # the SE of a mean of k independent runs' evaluations, each with its binomial SE
        se_mean = {e: math.sqrt(sum(se(x, count) ** 2 for x in v)) / k for e, v in after.items()}
        diff, diff_se = mean["vllm"] - mean["native"], math.hypot(se_mean["vllm"], se_mean["native"])
        line = (f"after {args.steps} steps, {key}, mean of {k} seed(s): vllm {mean['vllm']:.3f} - native "
                f"{mean['native']:.3f} = {diff:+.3f} ({diff / diff_se:+.2f} standard errors)")
        if k > 1:
            spread = {e: max(v) - min(v) for e, v in after.items()}
            line += f"; seed spread (max - min): native {spread['native']:.3f}, vllm {spread['vllm']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
