"""Checkpoints: the directory protocol (atomic, resumable, `checkpoint.keep` newest kept), per-rank
state (step, scheduler, RNG, data-loader state, counters), and `init_from` resolution. What the model
and optimizer write is the engine's (training/engine.py).

Layout of `<run_dir>/checkpoints/step_N/`:
  model/       torch.distributed.checkpoint (DCP) of the model, our parameter names; readable by
               either engine, so one stage may start from another engine's checkpoint
  optim/       DCP of the optimizer (FSDP2), or ds/ for DeepSpeed's own optimizer checkpoint
  rank_R.pt    per-rank state: step, scheduler, RNG, data-loader state, counters
Everything is written into `step_N.tmp/` and renamed when every rank is done, so a crash mid-save
never leaves a directory that resume would pick.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save(run_dir, step: int, engine, rank: int, extra: dict[str, Any], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    torch.save({**extra, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, engine, rank: int) -> dict:
    """Restore model, optimizer and RNG from a checkpoint of this run; returns this rank's extra state."""
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise RuntimeError(f"{path} was written by fewer ranks (no {rank_file.name}); resume with the same world size")
    engine.load(path)
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra.pop("rng"))
    return extra


def read_model_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a checkpoint's model, whole, read in this process (no collective)."""
    reader = dcp.FileSystemReader(str(Path(path) / "model"))
    meta = reader.read_metadata().state_dict_metadata
    state = {n: torch.empty(meta[f"model.{n}"].size, dtype=meta[f"model.{n}"].properties.dtype) for n in names}
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


def resolve_init_from(path: str) -> tuple[str, Path]:
    """('hf', dir) for a Hugging Face directory, ('ckpt', step dir) for our run or checkpoint dir."""
    p = Path(path)
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return "hf", p
    if (p / "model").is_dir() and any(p.glob("rank_*.pt")):
        return "ckpt", p
    latest = latest_checkpoint(p)
    if latest is not None:
        return "ckpt", latest
    raise FileNotFoundError(
        f"config error at `init_from`: {path} is neither a run directory with checkpoints, a checkpoint directory, "
        "nor a Hugging Face directory (config.json + *.safetensors)"
    )
