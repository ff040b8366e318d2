"""What every launcher does the same way: read the command line (DeepSpeed's launcher arguments, the
scale overlay), validate the composed config, build the data loader, exit cleanly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python launch/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from training.config import register_schema  # noqa: E402

RECIPES = str(ROOT / "recipes")
register_schema()


def scale_overrides(overrides: list[str]) -> list[str]:
    """With `+scale=NAME` and `+recipe=R` on the command line: the overrides with the overlay moved
    after the recipe, plus one that merges `scale.recipes.R` of recipes/scale/NAME.yaml (R's
    miniature schedule) after both, and before the command line's own values, which Hydra applies
    last.

    Hydra's defaults lists cannot pick a file by another group's choice from a non-primary config, so
    the values are registered in Hydra's ConfigStore (group `scale_recipe`) and appended as a group."""
    def is_group(arg: str, group: str) -> bool:
        return arg.split("=", 1)[0].lstrip("+") == group

    scale = next((o.split("=", 1)[1] for o in overrides if is_group(o, "scale")), None)
    recipe = next((o.split("=", 1)[1] for o in overrides if is_group(o, "recipe")), None)
    # Hydra merges appended groups in command-line order: the overlay goes after the recipe whatever
    # order they were typed in
    overrides = [o for o in overrides if not is_group(o, "scale")] + [o for o in overrides if is_group(o, "scale")]
    if scale is None or recipe is None:
        return list(overrides)
    path = Path(RECIPES) / "scale" / f"{scale}.yaml"
    if not path.exists():
        return list(overrides)  # Hydra reports the unknown scale itself
    values = OmegaConf.select(OmegaConf.load(path), f"scale.recipes.{recipe}")
    if values is None:
        return list(overrides)
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="scale_recipe", name=f"{scale}_{recipe}", node=values, package="_global_")
    return list(overrides) + [f"+scale_recipe={scale}_{recipe}"]


def loader_factory(split: str = "train"):
    def build(cfg, d, tokenizer):
        from data.mixture import build_loader

        return build_loader(cfg.data, tokenizer=tokenizer, rank=d.dp_rank, world_size=d.dp, seed=cfg.train.seed,
                            micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, split=split)

    return build


def launcher_args(argv: list[str]) -> list[str]:
    """Hydra overrides from argv: without the `--local_rank=N` DeepSpeed's launcher adds (Hydra would
    reject it; the rank is in LOCAL_RANK too), plus the scale overlay's per-recipe values
    (`scale_overrides`). The launcher only starts processes: the engine is `parallel.engine`'s."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return scale_overrides(out)


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
