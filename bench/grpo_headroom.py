"""How much GRPO can raise a checkpoint's held-out accuracy by sharpening alone (by hand, not CI).

    torchrun --nproc_per_node 2 bench/grpo_headroom.py --ckpt out/sft [--samples 16] [--per-source 200] \
        [overrides of +recipe=grpo +scale=mini ...]

GRPO at temperature 1 moves probability toward the answers its rollouts found right; in the 100
steps of the miniature it mostly makes the policy more certain of what it already knows rather than
teaching it to count or add. This measures how much that can be worth, on the held-out prompts GRPO
is judged by (`eval/accuracy`: those of `rl.eval_prompts_per_source`, reasoning as `rl.enable_thinking`):

- sampled: mean correctness of `--samples` answers per prompt at T=1 (what eval/accuracy estimates);
- greedy: one greedy answer per prompt (eval/accuracy_greedy);
- majority: the correctness of each prompt's most frequent final answer among the samples (ties: the
  first drawn; unboxed answers vote only when nothing was boxed): the accuracy of a policy that put
  all its mass on its own most likely answer, i.e. the ceiling of sharpening without new skill.

Standard errors are over prompts (answers to one prompt are correlated): sd of the per-prompt values
/ sqrt(prompts). Per task and overall.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / max(n, 1)
    var = sum((v - m) ** 2 for v in values) / max(n - 1, 1)
    return m, math.sqrt(var / max(n, 1))


def majority(keys: list, correct: list[float]) -> float:
    """Correctness of the most frequent key (None, no box, votes only when nothing else exists)."""
    boxed = [k for k in keys if k is not None]
    if not boxed:
        return correct[0]
    top = Counter(boxed).most_common(1)[0][0]
    return correct[keys.index(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the run dir / checkpoint / HF dir GRPO would start from")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--per-source", type=int, default=200)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from launch.common import RECIPES, scale_overrides
    from rl.rollout import heldout_prompts, judge, sampling
    from rl.rollout_engine import build_rollouts
    from rl.train import prompt_loader
    from training.config import load_config, rl_config
    from training.decoding import Sampling, decode
    from training.distributed import init_distributed, shutdown
    from training.rewards import answer_part, final_box
    from training.trainer import setup

    overrides = ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", "data.num_workers=0", "train.steps=1",  # nothing trains: setup loads the checkpoint
                 f"init_from={args.ckpt}", f"run_dir={Path('/tmp') / f'grpo_headroom_{os.getpid()}'}", *args.overrides]
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        cfg = load_config(compose("grpo", overrides=scale_overrides(overrides)))
    rl = rl_config(cfg.rl)
    d = init_distributed()
    run = setup(cfg, prompt_loader(rl), d)
    rollouts = build_rollouts(run, rl)
    special = run.loader.cfg.special_tokens
    prompts = heldout_prompts(run.loader.cfg, run.tokenizer, args.per_source, d.dp_rank, d.dp, rl.enable_thinking)
    generator = torch.Generator(device=d.device).manual_seed(1000 + d.rank)
    try:
        with rollouts.session() as generate:
            sampled, _, _ = generate(prompts, sampling(rl, 1.0, 0.0), n=args.samples, generator=generator)
            greedy, _, _ = generate(prompts, Sampling(rl.max_new_tokens))
    finally:
        rollouts.close()
    rows = []
    for i, prompt in enumerate(prompts):
        texts = [decode(run.tokenizer, t, special.end_of_turn_token_id) for t in sampled[i * args.samples:(i + 1) * args.samples]]
        correct = [judge(t, prompt, rl, rl.enable_thinking)[2] for t in texts]
        keys = [final_box(answer_part(t)) for t in texts]
        keys = [k.strip() if k is not None else None for k in keys]
        g = judge(decode(run.tokenizer, greedy[i], special.end_of_turn_token_id), prompt, rl, rl.enable_thinking)[2]
        rows.append((prompt.sample.task, sum(correct) / len(correct), g, majority(keys, correct)))
    gathered = [None] * d.world
    dist.all_gather_object(gathered, rows)
    if d.rank == 0:
        everything = [r for part in gathered for r in part]
        print(f"{args.ckpt}: {len(everything)} held-out prompts x {args.samples} answers at T=1, and greedy")
        print("| task | prompts | sampled | greedy | majority (sharpening ceiling) | ceiling - sampled |")
        print("|---|---|---|---|---|---|")
        for task in sorted({r[0] for r in everything}) + ["all"]:
            sel = [r for r in everything if task in ("all", r[0])]
            s, g, m = (mean_se([r[k] for r in sel]) for k in (1, 2, 3))
            gap = mean_se([r[3] - r[1] for r in sel])
            print(f"| {task} | {len(sel)} | {s[0]:.3f} ± {s[1]:.3f} | {g[0]:.3f} ± {g[1]:.3f} | {m[0]:.3f} ± {m[1]:.3f} "
                  f"| {gap[0]:+.3f} ± {gap[1]:.3f} |", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
