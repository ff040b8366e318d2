"""Multimodal pretraining (stage 1, then stage 2 of the EXAONE 4.5 curriculum).

    torchrun --nproc_per_node 2 launch/pretrain.py +recipe=stage1 +scale=mini run_dir=out/stage1
    torchrun --nproc_per_node 2 launch/pretrain.py +recipe=stage2 +scale=mini run_dir=out/stage2 init_from=out/stage1
    WORLD_SIZE=128 python launch/pretrain.py +recipe=stage1 dry_run=true     # the 33B layout: memory per GPU
    torchrun --nnodes 16 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HEAD:29500 \\
        launch/pretrain.py +recipe=stage1 run_dir=... data.root=... data.tokenizer=... init_from=...

Any key is overridable (train.steps=20, parallel.engine=deepspeed, model.fp8=emulated, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.common import RECIPES, finish_run, launcher_args, loader_factory  # noqa: E402


@hydra.main(config_path=RECIPES, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from training.config import load_config

    cfg = load_config(cfg)
    if cfg.dry_run:
        from training.memory import dry_run

        dry_run(cfg)
        return
    from training.evaluate import heldout_loss
    from training.trainer import setup, train

    run = setup(cfg, loader_factory("train"))
    train(run, evaluate=heldout_loss)
    finish_run(cfg, run)


if __name__ == "__main__":
    sys.argv[1:] = launcher_args(sys.argv[1:])
    main()
