"""GRPO with zero-variance filtering on correctness and task rewards over text and image prompts
(EXAONE 4.5's joint multimodal RL stage), from a pretrained or SFT checkpoint.

    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo +scale=mini init_from=out/sft
    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo +scale=mini init_from=out/sft rl.kl_coef=0.01 rl.update_epochs=2
    WORLD_SIZE=64 python launch/grpo.py +recipe=grpo dry_run=true     # the 33B layout: training and decoding memory
    torchrun --nproc_per_node 2 launch/grpo.py +recipe=grpo +scale=mini init_from=out/sft rl.rollout_engine=vllm \
        data.stages.grpo.counting=0   # rollouts on vLLM (bash scripts/setup.sh vllm); on CPU text-only data only

Every GRPO knob is under `rl:` (training.config.RLCfg lists them with their defaults); any key is
overridable. Without init_from the policy starts from the seeded initialization (a smoke run only).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.common import RECIPES, finish_run, launcher_args  # noqa: E402


@hydra.main(config_path=RECIPES, config_name="grpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from training.config import load_config, rl_config

    cfg = load_config(cfg)  # config errors (the layout's divisibility included) before any process group exists
    if cfg.dry_run:
        from training.memory import dry_run

        dry_run(cfg)
        return
    from rl.rollout_engine import check_rollout_engine
    from rl.train import prompt_loader, train
    from training.trainer import setup

    check_rollout_engine(cfg)  # vLLM on CPU and images in the data: fail before the model loads
    rl = rl_config(cfg.rl)
    run = setup(cfg, prompt_loader(rl))
    train(run, rl)
    finish_run(cfg, run)


if __name__ == "__main__":
    sys.argv[1:] = launcher_args(sys.argv[1:])
    main()
