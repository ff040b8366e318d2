"""Process groups, the (dp x cp) device mesh, and reductions over ranks. Parallelism is applied to
the model in training/parallelize.py; the engines (FSDP2, DeepSpeed) are training/engine.py."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dp: int
    cp: int
    mesh: Optional[object] = None  # DeviceMesh with dims ("dp", "cp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    def cp_group(self):
        return self.mesh["cp"].get_group() if self.mesh is not None else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(cp: int, world: int) -> None:
    if cp < 1 or world % cp:
        raise ValueError(f"config error at `parallel.cp`: {cp} does not divide the world size {world}")


def init_distributed(cp: int = 1, timeout_s: int = 1800) -> Dist:
    """Join the process group torchrun / deepspeed / accelerate set up (or make a group of one).
    A collective that waits longer than `timeout_s` (parallel.timeout_s: a dead or hung peer) raises
    instead of hanging the job."""
    if "RANK" not in os.environ:  # a plain `python launch/...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    check_layout(cp, world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return Dist(rank, world, local_rank, device, world // cp, cp, mesh)


def shutdown() -> None:
    """Leave cleanly; exiting without destroying the group aborted ~6% of torchrun runs on CPU."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device, group=None, op=None) -> list[float]:
    """Element-wise sum (or `op`, e.g. dist.ReduceOp.MAX) of `values` over the ranks, in float64 on
    `device` (the backend's: NCCL reduces CUDA tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: list[float], device) -> list[float]:
    return all_reduce_sum(values, device, op=dist.ReduceOp.MAX)


def reduce_metrics(sums: dict[str, float], device, maxima: dict[str, float] | None = None) -> dict[str, float]:
    """A dict of per-rank sums (and of per-rank values whose maximum counts) summed / maxed over the
    ranks, in one collective each; every rank must pass the same keys (sorted, so order is theirs)."""
    keys = sorted(sums)
    out = dict(zip(keys, all_reduce_sum([float(sums[k]) for k in keys], device)))
    if maxima:
        keys = sorted(maxima)
        out.update(zip(keys, all_reduce_max([float(maxima[k]) for k in keys], device)))
    return out
