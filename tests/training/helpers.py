"""Running the real launchers and the trainer from tests (real processes, gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
TINY = ["+scale=mini", "wandb.mode=disabled", "data.num_workers=0"]  # the miniature, in this process's data path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


def launch(script: str, overrides: list[str], nproc: int = 1, check: bool = True, timeout: int = 300, popen: bool = False,
           env: dict | None = None, launcher: str = "torchrun"):
    """`torchrun --nproc_per_node N launch/<script> overrides...` (plain python for N=0), or the same N
    processes started by DeepSpeed's launcher (`deepspeed --num_gpus N`) or by `accelerate launch`
    (`launcher`); a launcher only starts processes: the engine is `parallel.engine`'s. `env` adds
    variables."""
    env = {**ENV, **(env or {})}
    port = str(free_port())
    if launcher not in LAUNCHERS or (launcher != "torchrun" and not nproc):
        raise ValueError(f"launcher={launcher!r} with nproc={nproc}: expected one of {LAUNCHERS} with nproc >= 1")
    if not nproc:
        prefix = []
    elif launcher == "torchrun":
        prefix = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
    elif launcher == "deepspeed":
        prefix = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
    else:
        prefix = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines",
                  "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    cmd = [sys.executable, *prefix, str(ROOT / "launch" / script), *overrides]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir) -> list[dict]:
    """Logged rows, the last row per step (a resumed run logs again the steps after its checkpoint)."""
    rows = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def compose(overrides: list[str], config_name: str = "pretrain"):
    from hydra import compose as hydra_compose, initialize_config_dir

    from launch.common import RECIPES, scale_overrides
    from training.config import load_config

    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        return load_config(hydra_compose(config_name, overrides=scale_overrides(overrides)))


class ListLoader:
    """Fixed packed batches dealt to ranks: micro-batch m of step s on rank r is batch (s*accum+m)*world+r,
    so 1 process with grad_accum=W and W ranks with grad_accum=1 see the same global batch."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world, self.i = batches, rank, world, 0
        self.skipped = {}

    def __iter__(self):
        while True:
            self.i += 1  # before yielding: a checkpoint taken after this batch resumes at the next one
            yield self.batches[((self.i - 1) * self.world + self.rank) % len(self.batches)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def _worker(rank: int, world: int, port: int, runs: list[list[str]], batches_path: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    import gc

    from launch.common import finish
    from training.evaluate import heldout_loss
    from training.trainer import setup, train

    batches = torch.load(batches_path, weights_only=False)
    for overrides in runs:  # one after the other in this process group, each from its own seeded set-up
        cfg = compose(overrides)
        run = setup(cfg, lambda cfg, d, tok: ListLoader(batches, d.dp_rank, d.dp))
        train(run, evaluate=heldout_loss)  # when eval.every > 0
        if cfg.export.hf:
            from training.export import export_hf

            export_hf(run)
        del run
        gc.collect()
        torch._dynamo.reset()  # a compiled run leaves no compiled code to the next one
    finish()  # as the launchers end: interpreter shutdown after DeepSpeed occasionally aborts (SIGABRT) on CPU


def run_workers(world: int, runs: list[list[str]], batches_path) -> list[list[dict]]:
    """Train each run (a list of overrides) on fixed batches, one after the other, in the same `world`
    spawned processes (one start-up for all: seconds of CPU per process); returns each run's logged metric
    rows. A run that resumes another belongs in a later call: a resume is tested from a fresh process."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(world, free_port(), runs, str(batches_path)), nprocs=world, join=True,
                       start_method="spawn")
    return [metrics(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))) for overrides in runs]
