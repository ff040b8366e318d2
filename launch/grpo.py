"""GRPO with zero-variance filtering and task rewards over text and image prompts (EXAONE 4.5's
joint multimodal RL stage), from a pretrained or SFT checkpoint.

    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo model=tiny data=demo train.steps=10
    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo model=tiny data=demo init_from=out/sft
    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo model=tiny data=demo rl.kl_coef=0.01 rl.update_epochs=2

Every GRPO knob is under `rl:` (recipes/grpo.yaml lists them); any key is overridable. Without
init_from the policy starts from the seeded initialization (useful only as a smoke run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.common import RECIPES, deepspeed_launcher_args, finish_run, resolve_config  # noqa: E402


@hydra.main(config_path=RECIPES, config_name="grpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cfg = resolve_config(cfg)
    from rl.train import check_layout, prompt_loader, rl_config, train
    from training.distributed import init_distributed
    from training.trainer import setup

    grpo, loop = rl_config(cfg.rl)  # config errors before any process group or model exists
    d = init_distributed(cfg.parallel.cp)
    check_layout(grpo, cfg, d.dp)
    run = setup(cfg, prompt_loader(loop), d)
    train(run, grpo, loop)
    finish_run(cfg, run)


if __name__ == "__main__":
    sys.argv[1:] = deepspeed_launcher_args(sys.argv[1:])
    main()
