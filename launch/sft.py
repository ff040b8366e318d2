"""Chat supervised fine-tuning: the multi-stage curriculum of `sft.stages` (training/sft.py) on the
pretraining trainer.

    torchrun --nproc_per_node 2 launch/sft.py +recipe=sft +scale=mini init_from=out/stage2 run_dir=out/sft
    deepspeed --num_gpus 2 launch/sft.py +recipe=sft +scale=mini parallel.engine=deepspeed   # DeepSpeed ZeRO-2
    torchrun --nproc_per_node 2 launch/sft.py +recipe=sft_long +scale=mini init_from=out/sft  # cp=2 in miniature
    WORLD_SIZE=64 python launch/sft.py +recipe=sft_long dry_run=true                         # memory per stage

Any launcher starts it (torchrun, DeepSpeed's launcher, accelerate, plain python for one process);
the engine is always `parallel.engine` (FSDP2 unless the command line or recipe says deepspeed).
`init_from=` takes a run directory, a checkpoint directory or a Hugging Face directory (the released
EXAONE 4.5 weights). Running the same command again resumes the curriculum where it stopped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.common import RECIPES, finish, launcher_args, loader_factory  # noqa: E402


@hydra.main(config_path=RECIPES, config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from training.config import load_config
    from training.sft import plan, run_curriculum, stage_config

    cfg = load_config(cfg)
    if cfg.dry_run:
        from training.memory import dry_run

        stages = plan(cfg)
        dry_run(cfg, stages=[stage_config(cfg, stages, i, cfg.init_from) for i in range(1, len(stages) + 1)])
        return
    run, finished = run_curriculum(cfg, loader_factory("train"))
    if finished and cfg.export.hf:
        from training.export import export_checkpoint, export_hf

        if run is not None:
            export_hf(run, f"{cfg.run_dir}/hf")
        elif int(os.environ.get("RANK", 0)) == 0:  # nothing left to train: export from the final checkpoint
            export_checkpoint(cfg.run_dir, f"{cfg.run_dir}/hf")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sft: {'done' if finished else 'stopped'}; metrics in {cfg.run_dir}/metrics.jsonl", flush=True)
    finish()


if __name__ == "__main__":
    sys.argv[1:] = launcher_args(sys.argv[1:])
    main()
