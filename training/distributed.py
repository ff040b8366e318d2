"""Process groups, the (dp x cp) device mesh, and the two engines: FSDP2 and DeepSpeed ZeRO.

Parallelism is applied to the model from outside, torchtitan style: context parallelism, then
activation checkpointing, then FSDP2 (each decoder layer, each vision block and the MTP module
sharded on their own, then the root).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


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


def init_distributed(cp: int = 1) -> Dist:
    """Join the process group torchrun / deepspeed / accelerate set up (or make a group of one)."""
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
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
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


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for blocks in (model.language_model.layers, model.visual.blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp2(model: nn.Module, d: Dist, bf16: bool) -> nn.Module:
    """Shard parameters over the dp x cp ranks (cp ranks hold the same weights, so FSDP treats the
    flattened mesh as its data-parallel dimension and averages gradients over all of it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    mesh = d.mesh._flatten("dp_cp") if d.mesh is not None and d.cp > 1 else d.mesh["dp"]
    for block in model.visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for layer in model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    if model.mtp is not None:
        fully_shard(model.mtp, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def deepspeed_config(zero_stage: int, grad_accum: int, micro_batch: int, grad_clip: float, bf16: bool, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _ModelOutputNotice(logging.Filter):
    """Drops ZeRO-3's notice that it cannot see the tensors inside the root module's ModelOutput: it
    only needs them to gather the root's own parameters for backward, and the root owns none (every
    parameter sits in a submodule returning tensors, or is registered with one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ModelOutput" not in record.getMessage()


_MODEL_OUTPUT_NOTICE = _ModelOutputNotice()  # one instance: addFilter skips one already there


def init_deepspeed(model: nn.Module, optimizer, ds_config: dict):
    """The DeepSpeed engine around a materialized model. ZeRO-3 partitions the parameters here, so
    until then every rank holds the whole model (FSDP2 materializes shard by shard instead)."""
    import warnings

    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm

    # DeepSpeed's collectives call torch's deprecated names, once per call (every ZeRO-3 module)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)

    # On CPU DeepSpeed would compile a shared-memory comm op on first use (+50 s); gloo is enough.
    if not torch.cuda.is_available():
        ds_torch_comm.build_shm_op = lambda: None
    if ds_config["zero_optimization"]["stage"] == 3:
        # ZeRO-3 gathers a module's own parameters around its forward; these are read by another one
        for module, param in model.external_parameters():
            deepspeed.zero.register_external_parameter(module, param)
        logging.getLogger("DeepSpeed").addFilter(_MODEL_OUTPUT_NOTICE)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine, optimizer
