"""Supervised fine-tuning as a curriculum: a list of stages run one after another in one command.

    sft:
      stages:
        - {name: general, mixture: sft, steps: 120}                      # a data.stages name ...
        - {name: reasoning, mixture: {math: 0.5, chat: 0.3, stem: 0.2},  # ... or an inline mixture
           steps: 80, lr_scale: 0.5, train: {warmup_steps: 2}, data: {seq_len: 2048}}
      generation_eval: {tasks: [math, digits, counting], limit_per_task: 64, max_new_tokens: 32}

Each stage is one run of the shared trainer (training/trainer.py) in its own directory
`<run_dir>/stages/<k>-<name>/` (config.yaml, metrics.jsonl, checkpoints/): stage 1 starts from
`init_from` (our checkpoint or a Hugging Face directory), stage k from the final checkpoint of stage
k-1, which is always written, so every stage boundary is a checkpoint. A stage's learning rate is
`train.lr x lr_scale` (lr_vision and lr_merger scale alike), its schedule runs over its own steps,
its data loader is seeded with `train.seed + k - 1`, and `train` / `data` entries override the
run's for that stage only. `train.steps` is the length of the whole curriculum: when it differs
from the sum of the stages' steps, the stages are scaled to it proportionally (`train.steps=20`
makes a 120 + 80 curriculum 12 + 8). `train.stop_after` counts curriculum steps too. Evaluation
(held-out loss per task, plus generation metrics when `sft.generation_eval.limit_per_task` > 0)
runs at each stage's start and end and every `eval.every` steps (`eval.every=0`: start and end).

Resuming (run the same command again): finished stages are skipped, the stage in progress resumes
from its newest checkpoint with its own data-loader state, the next ones start from it.
`<run_dir>/plan.json` pins the plan; a different plan in the same run_dir is an error.

What the run directory holds besides the stages:
  metrics.jsonl          every stage's rows, `step` counted over the curriculum, plus `stage` and
                         `stage_step`; rewritten after each stage
  generation_eval.json   the evaluation of the starting model ("init") and at the end of each stage
  checkpoints/step_N     (N = train.steps) a link to the last stage's final checkpoint, so
                         `init_from=<run_dir>` continues from the fine-tuned model
  config.yaml            the composed config

Reasoning and non-reasoning data mix per sample: a sample whose last assistant turn has a
`reasoning` trains the reasoning mode (prompt ending in `<think>\n`, loss on the reasoning, the
closing `</think>` and the answer), one without trains the non-reasoning mode (the empty think
block is part of the prompt, loss on the answer) (data/text.py); `data.enable_thinking=false` drops
the reasoning of every sample.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from data.mixture import DataConfig

from . import checkpoint as ckpt
from .config import TrainCfg
from .distributed import Dist, init_distributed


@dataclass
class Stage:
    name: str
    mixture: dict[str, float]
    steps: int
    lr_scale: float = 1.0
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


STAGE_KEYS = {f.name for f in fields(Stage)}


def plan(cfg) -> list[Stage]:
    """The stages to run, mixtures resolved (a name is one of `data.stages`) and steps scaled to
    `train.steps` (see the module doc)."""
    sft = cfg.sft
    named_mixtures = OmegaConf.to_container(cfg.data.stages, resolve=True)
    if not sft.stages:
        raise ValueError("config error at `sft.stages`: no stages (give at least one {name, mixture, steps})")
    stages = []
    for i, raw in enumerate(OmegaConf.to_container(sft.stages, resolve=True)):
        where = f"sft.stages[{i}]"
        if not isinstance(raw, dict) or not {"name", "mixture", "steps"} <= set(raw):
            raise ValueError(f"config error at `{where}`: expected a mapping with name, mixture and steps")
        unknown = sorted(set(raw) - STAGE_KEYS)
        if unknown:
            raise ValueError(f"config error at `{where}`: unknown keys {unknown}; known: {sorted(STAGE_KEYS)}")
        stage = Stage(**raw)
        if isinstance(stage.mixture, str):
            if stage.mixture not in named_mixtures:
                raise ValueError(f"config error at `{where}.mixture`: {stage.mixture!r} is not in data.stages "
                                 f"({sorted(named_mixtures)}); name one or give {{source: weight}}")
            stage.mixture = dict(named_mixtures[stage.mixture])
        bad = sorted(set(stage.train) - {f.name for f in fields(TrainCfg)} | ({"steps", "stop_after"} & set(stage.train)))
        if bad:
            raise ValueError(f"config error at `{where}.train`: cannot set {bad} per stage")
        if "mixture" in stage.data:
            raise ValueError(f"config error at `{where}.data.mixture`: use the stage's `mixture`")
        unknown = sorted(set(stage.data) - {f.name for f in fields(DataConfig)} | ({"special_tokens", "patch"} & set(stage.data)))
        if unknown:
            raise ValueError(f"config error at `{where}.data`: cannot set {unknown} per stage")
        if not (isinstance(stage.steps, int) and stage.steps > 0) or stage.lr_scale <= 0:
            raise ValueError(f"config error at `{where}`: steps must be a positive integer and lr_scale > 0")
        stages.append(stage)
    if len({s.name for s in stages}) != len(stages):
        raise ValueError("config error at `sft.stages`: stage names must be unique")
    total, wanted = sum(s.steps for s in stages), cfg.train.steps
    if wanted != total:
        if wanted < len(stages):
            raise ValueError(f"config error at `train.steps`: {wanted} steps cannot cover {len(stages)} stages")
        bounds, acc = [0], 0
        for s in stages:
            acc += s.steps
            bounds.append(round(acc * wanted / total))
        for i, s in enumerate(stages):
            s.steps = max(1, bounds[i + 1] - bounds[i])
        stages[-1].steps += wanted - sum(s.steps for s in stages)
        if stages[-1].steps < 1:
            raise ValueError(f"config error at `train.steps`: {wanted} steps cannot cover {len(stages)} stages")
    return stages


def stage_dir(run_dir, index: int, stage: Stage) -> Path:
    return Path(run_dir) / "stages" / f"{index}-{stage.name}"


def stage_config(cfg, stages: list[Stage], index: int, init_from: Optional[str]) -> DictConfig:
    """The run config of stage `index` (1-based)."""
    stage = stages[index - 1]
    offset = sum(s.steps for s in stages[: index - 1])
    c = copy.deepcopy(cfg)
    c.run_dir = str(stage_dir(cfg.run_dir, index, stage))
    c.stage = stage.name
    c.init_from = init_from
    c.data.mixture = stage.mixture
    for key, value in stage.data.items():
        c.data[key] = value
    tc = c.train
    tc.steps = stage.steps
    tc.stop_after = None if cfg.train.stop_after is None else min(stage.steps, cfg.train.stop_after - offset)
    tc.seed = cfg.train.seed + index - 1
    tc.lr = cfg.train.lr * stage.lr_scale
    tc.lr_vision = None if cfg.train.lr_vision is None else cfg.train.lr_vision * stage.lr_scale
    tc.lr_merger = None if cfg.train.lr_merger is None else cfg.train.lr_merger * stage.lr_scale
    for key, value in stage.train.items():
        tc[key] = value
    c.eval.every = cfg.eval.every or stage.steps  # 0: at the start and end of each stage
    c.wandb.group = cfg.wandb.group or Path(cfg.run_dir).name
    c.wandb.name = f"{c.wandb.group}-{index}-{stage.name}"
    return c


def sft_evaluate(cfg) -> Callable:
    """Held-out loss per task plus, when
    sft.generation_eval.limit_per_task > 0, generation metrics."""
    from .evaluate import heldout_loss
    from .generation_eval import evaluate_generation

    gen = cfg.sft.generation_eval
    end_of_stage: dict = {}

    def evaluate(run) -> dict:
        if run.step == 0 and end_of_stage:  # a stage starts from the weights the previous one ended with
            return dict(end_of_stage)
        row = heldout_loss(run)
        if gen.limit_per_task > 0:
            row.update(evaluate_generation(run.engine, run.tokenizer, run.cfg.data, tasks=gen.tasks,
                                           limit_per_task=gen.limit_per_task, max_new_tokens=gen.max_new_tokens,
                                           rank=run.d.rank, world=run.d.world, enable_thinking=gen.enable_thinking,
                                           batch_size=gen.batch_size))
        end_of_stage.clear()
        if run.step == run.cfg.train.steps:
            end_of_stage.update(row)
        return row

    return evaluate


def run_curriculum(cfg, build_loader: Callable, d: Optional[Dist] = None):
    """Run (or resume) the stages; returns (the Run of the last stage trained here or None, whether
    the whole curriculum is done)."""
    from .trainer import setup, train

    stages = plan(cfg)
    d = d or init_distributed(cfg.parallel.cp)
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        _pin_plan(cfg, stages)
        print("sft plan: " + " -> ".join(f"{s.name} ({s.steps} steps, lr {cfg.train.lr * s.lr_scale:.3g})" for s in stages),
              flush=True)
        if cfg.init_from is None:
            warnings.warn("init_from is not set: fine-tuning a freshly initialized model (give init_from=<run, "
                          "checkpoint or Hugging Face dir>)")
    evaluate, init_from, offset, run = sft_evaluate(cfg), cfg.init_from, 0, None
    for index, stage in enumerate(stages, 1):
        if cfg.train.stop_after is not None and cfg.train.stop_after <= offset:
            return run, False
        directory = stage_dir(run_dir, index, stage)
        latest = ckpt.list_checkpoints(directory)
        if not latest or latest[-1][0] < stage.steps:
            run = None  # free the previous stage's model and optimizer first
            run = setup(stage_config(cfg, stages, index, init_from), build_loader, d)
            train(run, evaluate=evaluate)
            if d.is_main:
                _merge_metrics(run_dir, stages)
            if run.preempted or run.step < stage.steps:
                return run, False
        init_from, offset = str(directory), offset + stage.steps
    if d.is_main:
        _merge_metrics(run_dir, stages)
        _link_final_checkpoint(run_dir, stages)
    return run, True


def final_checkpoint(run_dir, stages: list[Stage]) -> Path:
    return stage_dir(run_dir, len(stages), stages[-1]) / "checkpoints" / f"step_{stages[-1].steps}"


def _pin_plan(cfg, stages: list[Stage]) -> None:
    path = Path(cfg.run_dir) / "plan.json"
    current = [{"name": s.name, "steps": s.steps, "mixture": s.mixture} for s in stages]
    if path.exists() and json.loads(path.read_text()) != current:
        raise ValueError(f"{path}: this run_dir was started with another curriculum ({path.read_text()}); "
                         "use a new run_dir or restore the settings")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1))
    OmegaConf.save(cfg, path.parent / "config.yaml")


def _merge_metrics(run_dir: Path, stages: list[Stage]) -> None:
    """metrics.jsonl over the curriculum, and generation_eval.json: the first evaluation ("init")
    and each stage's last one."""
    rows, offset, evals = [], 0, {}
    for index, stage in enumerate(stages, 1):
        path = stage_dir(run_dir, index, stage) / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = {**json.loads(line), "stage": stage.name}
            if index > 1 and row["step"] == 0:
                continue  # a later stage's start is the previous stage's end
            row["stage_step"], row["step"] = row["step"], offset + row["step"]
            rows.append(row)
            scores = {k: v for k, v in row.items() if k.startswith(("eval/", "gen/"))}
            if scores and row["step"] == 0:
                evals["init"] = {"step": 0, **scores}
            elif scores:
                evals[stage.name] = {"step": row["step"], **scores}
        offset += stage.steps
    for name, text in (("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
                       ("generation_eval.json", json.dumps(evals, indent=1))):
        (run_dir / f"{name}.tmp").write_text(text)
        os.replace(run_dir / f"{name}.tmp", run_dir / name)


def _link_final_checkpoint(run_dir: Path, stages: list[Stage]) -> None:
    """<run_dir>/checkpoints/step_<total> -> the last stage's final checkpoint (a relative link)."""
    target = final_checkpoint(run_dir, stages)
    link = run_dir / "checkpoints" / f"step_{sum(s.steps for s in stages)}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
