"""Chat supervised fine-tuning: the multi-stage curriculum of `sft.stages` (training/sft.py) on the
pretraining trainer.

    deepspeed --num_gpus 2 launch/sft.py +recipe=sft model=tiny data=demo train.steps=20        # DeepSpeed ZeRO-2
    torchrun --nproc_per_node 2 launch/sft.py +recipe=sft model=tiny data=demo train.steps=20   # FSDP2
    python launch/sft.py +recipe=sft model=tiny data=demo init_from=out/stage2 run_dir=out/sft  # one process
    torchrun --nproc_per_node 8 launch/sft.py +recipe=sft_long init_from=out/sft                # 128K -> 256K, cp=8
    python launch/sft.py +recipe=sft_long dry_run=true                                          # memory per stage

On CPU, DeepSpeed's launcher starts one process per `--num_gpus` (gloo). Under it the engine is
DeepSpeed (ZeRO stage `parallel.zero_stage`) unless `parallel.engine=` is given on the command line;
under torchrun or plain python it is the recipe's (FSDP2). `init_from=` takes a run directory, a
checkpoint directory or a Hugging Face directory (the released EXAONE 4.5 weights). Running the
same command again resumes the curriculum where it stopped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`
import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from launch.common import RECIPES, deepspeed_launcher_args, finish, loader_factory, resolve_config  # noqa: E402


@hydra.main(config_path=RECIPES, config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    stages = cfg.data.get("stages") if cfg.data is not None else None
    named_mixtures = OmegaConf.to_container(stages, resolve=True) if stages is not None else {}
    cfg = resolve_config(cfg)
    from training.sft import plan, run_curriculum, stage_config

    if cfg.dry_run:
        from training.memory import dry_run

        stages = plan(cfg, named_mixtures)
        for i, stage in enumerate(stages, 1):
            print(f"stage {i} ({stage.name}):", flush=True)
            dry_run(stage_config(cfg, stages, i, cfg.init_from))
        return
    run, finished = run_curriculum(cfg, named_mixtures, loader_factory("train"))
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
    sys.argv[1:] = deepspeed_launcher_args(sys.argv[1:])
    main()
