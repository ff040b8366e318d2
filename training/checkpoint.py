"""Checkpoints: save / resume (model, optimizer, scheduler, data-loader state, RNG, step) and
`init_from` (a run directory, a checkpoint directory, or a Hugging Face directory).

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
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the module


def is_zero3(model) -> bool:
    """Parameters partitioned over the ranks by DeepSpeed ZeRO-3 (the engine or its module)."""
    first = next(_unwrap(model).parameters(), None)  # ZeRO-3 partitions every parameter
    return first is not None and hasattr(first, "ds_status")


def full_model_state(model) -> dict:
    """The whole model's state dict under our parameter names, on rank 0's CPU (an empty dict on the
    other ranks); every rank must call it. FSDP2 and plain modules go through DCP's state-dict API;
    a ZeRO-3 engine gathers its partitions layer by layer (DeepSpeed's consolidated state dict, in
    the parameters' own dtype despite its name)."""
    if is_zero3(model):
        state = model._zero3_consolidated_16bit_state_dict()
        return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in (state or {}).items()}
    return get_model_state_dict(_unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def save(run_dir, step: int, model, optimizer, engine: str, rank: int, extra: dict[str, Any], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    module = _unwrap(model)
    if is_zero3(model):  # the same DCP layout, written whole by rank 0 (DCP reshards it on load)
        state = full_model_state(model)
        if rank == 0:
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save({"model": state}, checkpoint_id=str(tmp / "model"), no_dist=True)
    else:
        dcp.save({"model": get_model_state_dict(module)}, checkpoint_id=str(tmp / "model"))
    if engine == "deepspeed":
        model.save_checkpoint(str(tmp / "ds"), tag="ds", save_latest=False, exclude_frozen_parameters=False)
    else:
        dcp.save({"optim": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=str(tmp / "optim"))
    torch.save({**extra, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, model, optimizer, engine: str, rank: int) -> dict:
    """Restore model, optimizer and RNG from a checkpoint of this run; returns this rank's extra state."""
    module = _unwrap(model)
    if engine == "deepspeed":
        model.load_checkpoint(str(path / "ds"), tag="ds", load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False)
        if not is_zero3(model):  # ZeRO-3 restores its partitions and their fp32 masters together
            load_model_weights(path, model)  # DeepSpeed restored its own copy; the DCP one is authoritative
    else:
        load_model_weights(path, model)
        state = {"optim": get_optimizer_state_dict(module, optimizer)}
        dcp.load(state, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(module, optimizer, state["optim"])
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise RuntimeError(f"{path} was written by fewer ranks (no {rank_file.name}); resume with the same world size")
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra.pop("rng"))
    return extra


def load_model_weights(path: Path, model) -> None:
    if is_zero3(model):
        raise NotImplementedError("loading weights into a ZeRO-3 engine: load them into the module before "
                                  "deepspeed.initialize (as init_from does) or resume through its own checkpoint")
    module = _unwrap(model)
    state = {"model": get_model_state_dict(module)}
    dcp.load(state, checkpoint_id=str(Path(path) / "model"))
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=True))


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
