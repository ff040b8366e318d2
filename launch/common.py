"""What every launcher does the same way: validate the composed config, pick the stage's mixture,
build the data loader, exit cleanly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python launch/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from training.config import load_config  # noqa: E402

RECIPES = str(ROOT / "recipes")


def resolve_config(cfg: DictConfig) -> DictConfig:
    """Schema-checked config; `data.stages.<stage>` (a mixture per curriculum stage), when the data
    config has one for this stage, becomes `data.mixture`."""
    cfg = load_config(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data is not None else {}
    stages = data.pop("stages", None) or {}
    if cfg.stage in stages:
        data["mixture"] = stages[cfg.stage]
    from data.mixture import to_data_config

    to_data_config(data)  # unknown data keys fail here, at start-up, naming the key
    cfg.data = data
    return cfg


def loader_factory(split: str = "train"):
    def build(cfg, d, tokenizer):
        from data.mixture import build_loader

        return build_loader(cfg.data, tokenizer=tokenizer, rank=d.dp_rank, world_size=d.dp, seed=cfg.train.seed,
                            micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, split=split)

    return build


def deepspeed_launcher_args(argv: list[str], environ=os.environ) -> list[str]:
    """Hydra overrides from argv: DeepSpeed's launcher adds `--local_rank=N` (Hydra would reject it;
    the rank is in LOCAL_RANK too) and, under that launcher, `parallel.engine=deepspeed` unless the
    command line names an engine."""
    out, launched, skip = [], "CROSS_RANK" in environ and "TORCHELASTIC_RUN_ID" not in environ, False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            launched = True
        elif arg in ("--local_rank", "--local-rank"):
            launched, skip = True, True
        else:
            out.append(arg)
    if launched and not any(a.lstrip("+~").startswith("parallel.engine=") for a in out):
        out.append("parallel.engine=deepspeed")
    return out


def finish_run(cfg: DictConfig, run) -> None:
    """The end of a pretraining or GRPO run: Hugging Face export when `export.hf`, a line, exit."""
    if cfg.export.hf:
        from training.export import export_hf

        export_hf(run)
    if run.d.is_main:
        print(f"{cfg.stage}: done at step {run.step}; metrics in {cfg.run_dir}/metrics.jsonl", flush=True)
    finish()


def finish() -> None:
    """Tear the process group down, then exit at once: interpreter shutdown after a torchrun run
    occasionally aborted (SIGABRT) on CPU."""
    from training.distributed import shutdown

    sys.stdout.flush()
    sys.stderr.flush()
    shutdown()
    os._exit(0)
