"""Every entry point starts under DeepSpeed's launcher and under `accelerate launch` (2 processes on
CPU), besides torchrun (the other tests): short smoke runs of the launchers the other tests don't use.
A launcher only starts processes: the engine is `parallel.engine` (DeepSpeed here where the command
line says so); accelerate starts the same 2-rank FSDP2 run torchrun does, step for step."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from .helpers import ENV, ROOT, free_port, launch, metrics

TINY = ["+scale=mini", "wandb.mode=disabled", "data.num_workers=0", "data.seq_len=128",
        "train.micro_batch_size=1", "checkpoint.every=1000", "eval.every=0"]
GRPO = ["+recipe=grpo", "+data.stages.grpo.ocr=0.5", "train.steps=1", "train.micro_batch_size=4", "rl.group_size=2",
        "rl.train_prompts_per_step=2", "rl.rollout_prompts_per_batch=2", "rl.max_gen_batches=1",
        "rl.on_underfilled=warn", "rl.max_new_tokens=6", "rl.eval_prompts_per_source=0"]


def _run(launcher: str, script: str, overrides: list[str]):
    port = str(free_port())
    if launcher == "deepspeed":
        prefix = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port]
    else:
        prefix = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    cmd = [sys.executable, *prefix, str(ROOT / "launch" / script), *overrides]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("script,extra", [
    ("pretrain.py", ["train.steps=2"]),
    ("grpo.py", GRPO),
])
def test_deepspeed_launcher(tmp_path, demo_corpus, script, extra):
    run_dir = tmp_path / "run"
    _run("deepspeed", script, TINY + extra + ["parallel.engine=deepspeed", f"run_dir={run_dir}", f"data.root={demo_corpus}"])
    assert OmegaConf.load(run_dir / "config.yaml").parallel.engine == "deepspeed"
    steps = int(next(e for e in extra if e.startswith("train.steps=")).split("=")[1])
    assert metrics(run_dir)[-1]["step"] == steps and (run_dir / "checkpoints" / f"step_{steps}" / "ds").is_dir()


def test_accelerate_launch_runs_the_torchrun_run(tmp_path, demo_corpus):
    common = TINY + ["train.steps=2", f"data.root={demo_corpus}"]
    _run("accelerate", "pretrain.py", common + [f"run_dir={tmp_path / 'accelerate'}"])
    launch("pretrain.py", common + [f"run_dir={tmp_path / 'torchrun'}"], nproc=2)
    a, t = metrics(tmp_path / "accelerate"), metrics(tmp_path / "torchrun")
    assert [r["loss"] for r in a] == [r["loss"] for r in t] and [r["tokens"] for r in a] == [r["tokens"] for r in t]
    assert OmegaConf.load(tmp_path / "accelerate" / "config.yaml").parallel.engine == "fsdp2"


@pytest.mark.parametrize("script,extra", [
    ("sft.py", ["+recipe=sft", "train.steps=2", "sft.generation_eval.limit_per_task=0"]),
    ("grpo.py", GRPO),
])
def test_accelerate_launch(tmp_path, demo_corpus, script, extra):
    run_dir = tmp_path / "run"
    _run("accelerate", script, TINY + extra + [f"run_dir={run_dir}", f"data.root={demo_corpus}"])
    steps = int(next(e for e in extra if e.startswith("train.steps=")).split("=")[1])
    assert metrics(run_dir)[-1]["step"] == steps
