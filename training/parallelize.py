"""One parallelize step, in torchtitan's order: FP8 -> context parallelism -> activation
checkpointing -> compile -> FSDP2 (DeepSpeed ZeRO wraps the result in training/engine.py).

    module = build_module(cfg, d)          # parallelized, materialized, seeded and init_from weights loaded
    engine = build_engine(cfg, d, module)  # FSDP2 or DeepSpeed behind one interface

Every model is made the same way: on the meta device (under DeepSpeed ZeRO-3 inside `zero.Init`, so
its parameters are partitioned as they are created and the 33B never exists whole on one rank),
parallelized here, materialized shard by shard, then given its weights by `load_weights`: the
seeded initialization and/or `init_from`, read on rank 0 and broadcast (FSDP2 keeps its shard,
ZeRO-3 its partition), one block at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from model.fp8 import apply_fp8, check_fp8_device
from model.vlm import Exaone45

from . import checkpoint as ckpt
from .config import model_config
from .distributed import Dist

log = logging.getLogger(__name__)
WRAPPED = "_checkpoint_wrapped_module."
BLOCKS = ("visual.blocks.", "language_model.layers.", "mtp.layers.")


def uses_zero3(cfg) -> bool:
    return cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3


def build_module(cfg, d: Dist, *, with_init_from: bool = True) -> Exaone45:
    """The model, parallelized (`parallelize`) and holding its initial weights: the seeded
    initialization of `train.seed`, then `init_from` when `with_init_from` (resuming loads a
    checkpoint over it instead)."""
    mcfg = model_config(cfg)
    if uses_zero3(cfg):
        from .engine import check_zero3_dtype, deepspeed_config, zero3_init

        ds_config = deepspeed_config(cfg, d)
        with zero3_init(ds_config):
            module = Exaone45(mcfg)
        check_zero3_dtype(module, ds_config)
    else:
        with torch.device("meta"):
            module = Exaone45(mcfg)
    parallelize(module, cfg, d)
    if not uses_zero3(cfg):
        module.to_empty(device=d.device)
    load_weights(module, d, seeded_init(mcfg, cfg.train.seed, module))
    if with_init_from and cfg.init_from:
        load_weights(module, d, init_from_weights(cfg.init_from, module))
    return module


def frozen_copy(cfg, d: Dist):
    """The initial weights (init_from, or the seeded initialization) as a frozen model sharded like
    the policy, e.g. GRPO's KL reference. Under ZeRO-3 it is wrapped by an optimizer-less DeepSpeed
    engine, whose hooks gather each module's partitions around its forward. Returns what the forward
    goes through."""
    module = build_module(cfg, d)
    module.requires_grad_(False)
    if not uses_zero3(cfg):
        return module
    from .engine import deepspeed_config, initialize_frozen

    return initialize_frozen(module, deepspeed_config(cfg, d))


def parallelize(module: Exaone45, cfg, d: Dist) -> Exaone45:
    """FP8 -> context parallelism -> activation checkpointing -> compile -> FSDP2, in place."""
    mcfg = module.cfg
    # The vision tower runs every step of every stage (pretraining, SFT, GRPO), on a blank image times zero
    # when the batch has none: FSDP2 and ZeRO issue collectives per module, so every rank must run it; and on
    # one process too, so that an image-free step gives the tower zero gradients, not none. AdamW skips a
    # parameter without a gradient (no momentum, no weight decay), so without the blank pass one process
    # would train the tower differently from N; and the optimizer state covers every parameter from the
    # first step, as a checkpoint's must for resuming.
    module.vision_in_every_step = True
    check_fp8_device(mcfg.fp8, mcfg.fp8_scaling, d.device)  # before any work: a clear error naming the key
    apply_fp8(module, mcfg.fp8, mcfg.fp8_modules, mcfg.fp8_scaling)
    if d.cp > 1:
        from .context_parallel import apply_context_parallel

        apply_context_parallel(module, d.cp_group(), cfg.parallel.cp_impl)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(module)
    if cfg.train.compile:
        apply_compile(module, context_parallel=d.cp > 1, backend=cfg.train.compile_backend)
    if cfg.parallel.engine == "fsdp2":
        apply_fsdp2(module, d, bf16=cfg.train.dtype == "bf16")
    return module


def blocks(module: Exaone45) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every repeated block: vision blocks, decoder layers, MTP layers."""
    lists = [module.visual.blocks, module.language_model.layers] + ([module.mtp.layers] if module.mtp is not None else [])
    return [(blocks, i) for blocks in lists for i in range(len(blocks))]


def apply_activation_checkpointing(module: Exaone45) -> None:
    """Decoder layers and vision blocks keep only their input for backward and recompute the rest
    (the MTP layer keeps its activations: it is one layer, and its loss input is needed anyway)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for container in (module.language_model.layers, module.visual.blocks):
        for i, block in enumerate(container):
            container[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(module: Exaone45, context_parallel: bool = False, backend: str = "inductor") -> None:
    """torch.compile each decoder layer, MTP layer and vision block (torchtitan's per-block compile:
    small graphs, one per block kind, reused by every layer). Shapes that change from batch to batch
    (the vision tower's patch count, GRPO's packed lengths) are compiled dynamic after their first
    change instead of once per shape; every recompilation is logged with its reason.

    The masks the layers read are built before them (MaskSpec.prepare), so a compiled block is one
    graph per kind (sliding, global). Under context parallelism the attention runs eagerly (its
    collectives and chunk plans; apply_context_parallel disables compile on it): a whole compiled
    layer would then break around it, and the resumed half guards on the layer's class, which
    FSDP2 makes unique per layer (one recompilation per layer, past dynamo's cache limit at 64
    layers). So each decoder layer's attention module (projections, norms, RoPE; the break inside
    it) and MLP are compiled instead: their classes are shared by every layer."""
    from model.text import DecoderLayer

    torch._logging.set_logs(recompiles=True)
    for container, i in blocks(module):
        block = container[i]
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        if context_parallel and isinstance(inner, DecoderLayer):
            inner.self_attn.compile(dynamic=None, backend=backend)
            inner.mlp.compile(dynamic=None, backend=backend)
        else:
            block.compile(dynamic=None, backend=backend)


def apply_fsdp2(module: Exaone45, d: Dist, bf16: bool) -> Exaone45:
    """Shard parameters over the dp x cp ranks (cp ranks hold the same weights, so FSDP treats the
    flattened mesh as its data-parallel dimension and averages gradients over all of it): each
    vision block, decoder layer, MTP layer and the MTP module on their own, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    # Only the root casts its floating inputs (pixel values) to bf16. The blocks receive bf16 hidden
    # states from it already, and their casting would copy every dataclass argument per layer
    # (torch.distributed.utils._apply_to_tensors rebuilds a MaskSpec and its mask cache) and round the
    # vision tower's fp32 RoPE tables to bf16 (it applies RoPE in fp32, as transformers does).
    block_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    mesh = d.mesh._flatten("dp_cp") if d.mesh is not None and d.cp > 1 else d.mesh["dp"]
    for block in module.visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_mp)
    for layer in module.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=block_mp)
    if module.mtp is not None:
        # its decoder layers on their own too: then they are of the decoder layers' FSDP class, and a
        # compiled decoder-layer graph serves them (a plain DecoderLayer would compile once more)
        for layer in module.mtp.layers:
            fully_shard(layer, mesh=mesh, mp_policy=block_mp)
        fully_shard(module.mtp, mesh=mesh, mp_policy=block_mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


# --- weights --------------------------------------------------------------------------------------

WeightGroups = Callable[[], Iterator[dict[str, torch.Tensor]]]


def parameter_names(module: nn.Module) -> list[str]:
    """State-dict names without the activation-checkpointing wrapper's prefix (our checkpoint names)."""
    return [k.replace(WRAPPED, "") for k in module.state_dict()]


def group_names(names: Iterable[str]) -> list[list[str]]:
    """Names grouped one block per group (each vision block, decoder layer, MTP layer), the rest
    (embeddings, norms, heads, merger) in one group: what one broadcast carries at a time."""
    groups: dict[str, list[str]] = {}
    for name in names:
        block = next((b for b in BLOCKS if name.startswith(b)), None)
        key = name if block is None else block + name[len(block):].split(".", 1)[0]
        groups.setdefault(key if block else "rest", []).append(name)
    return list(groups.values())


def seeded_init(mcfg, seed: int, module: nn.Module, full_init_limit: int = 2_000_000_000) -> Optional[WeightGroups]:
    """The seeded initialization as weight groups, the same however the model is sharded (so 1 and N
    ranks, FSDP2 and DeepSpeed start from the same weights): the whole model initialized on rank
    0's CPU. Models over `full_init_limit` parameters (None) initialize their own shards instead."""
    if sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters()) > full_init_limit:
        return None

    def groups():
        torch.manual_seed(seed)
        full = Exaone45(mcfg)
        full.init_weights()
        state = full.state_dict()
        for names in group_names(state):
            yield {n: state[n] for n in names}

    return groups


def init_from_weights(path: str, module: nn.Module) -> WeightGroups:
    """`init_from` as weight groups read on rank 0: our checkpoint (DCP, any engine) or a Hugging
    Face directory (safetensors, read tensor by tensor). A Hugging Face checkpoint without `mtp.*`
    (transformers drops them) leaves the MTP module at its seeded initialization, with a warning."""
    kind, where = ckpt.resolve_init_from(path)
    names = parameter_names(module)
    if kind == "hf":
        from model.hf import checkpoint_names, read_tensors

        available = checkpoint_names(where)
        missing = [n for n in names if n not in available]
        if any(not n.startswith("mtp.") for n in missing):
            raise ValueError(f"init_from={where}: the Hugging Face checkpoint lacks {missing[:5]}")
        if missing:
            warnings.warn(f"init_from={where}: no mtp.* weights; the MTP module keeps its fresh initialization")
        present = [n for n in names if n in available]
        return lambda: (read_tensors(where, group) for group in group_names(present))
    return lambda: (ckpt.read_model_tensors(where, group) for group in group_names(names))


@torch.no_grad()
def load_weights(module: nn.Module, d: Dist, groups: Optional[WeightGroups]) -> None:
    """Load weight groups (read on rank 0; the other ranks' reads are skipped) into the module,
    however it is sharded: FSDP2 broadcasts each group from rank 0 and keeps its shard, ZeRO-3
    gathers each group's partitions for rank 0 to fill and re-partitions them, a whole module (one
    process, ZeRO-1/2 replicas) receives the tensors by broadcast. `groups` None: each parameter
    initializes itself (`Exaone45.init_weights`, shard by shard) from the seed already set."""
    if groups is None:
        _init_in_place(module, d)
        return
    rank0 = d.rank == 0
    stream = groups() if rank0 else None
    names = parameter_names(module)
    for names_of_group in group_names(names):
        state = next(stream) if rank0 else {}
        if rank0 and set(state) - set(names_of_group):
            raise RuntimeError(f"weight group {sorted(state)[:3]}... does not match the model's {names_of_group[:3]}...")
        _load_group(module, d, names_of_group, state)


def _init_in_place(module: Exaone45, d: Dist) -> None:
    """Each parameter initialized where it lives (models too large to initialize whole on one CPU):
    FSDP2 shards and whole modules directly, ZeRO-3 partitions gathered one module at a time for
    rank 0 to initialize."""
    from model.vlm import init_module_weights

    if not any(hasattr(p, "ds_status") for p in module.parameters()):
        module.init_weights()
        return
    import deepspeed

    mcfg = module.cfg
    for name, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        if not params:
            continue
        std = mcfg.vision_config.initializer_range if name.startswith("visual") else mcfg.text_config.initializer_range
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if d.rank == 0:
                init_module_weights(sub, std)


def _load_group(module: nn.Module, d: Dist, names: list[str], state: dict[str, torch.Tensor]) -> None:
    params = dict(_named_tensors(module))
    if any(hasattr(params[n], "ds_status") for n in names if n in params):
        import deepspeed

        wanted = [params[n] for n in names if n in params]
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=0):
            if d.rank == 0:
                for n in names:
                    if n in state:
                        params[n].data.copy_(state[n].to(params[n].dtype))
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(params[n], DTensor) for n in names if n in params):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        wrapped = {_wrapped_name(module, n): v for n, v in state.items()}
        set_model_state_dict(module, wrapped, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                       strict=False))
        return
    import torch.distributed as dist

    for n in names:
        if n not in params:
            continue
        target = params[n]
        if d.rank == 0:
            if n in state:
                target.copy_(state[n].to(target.dtype))
        if d.world > 1:
            present = torch.tensor([float(n in state)], device=d.device)
            dist.broadcast(present, src=0)
            if present.item():
                dist.broadcast(target.data, src=0)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        yield name.replace(WRAPPED, ""), t


def _wrapped_name(module: nn.Module, name: str) -> str:
    """Our name as the (activation-checkpoint-wrapped) module spells it."""
    for key in module.state_dict():
        if key.replace(WRAPPED, "") == name:
            return key
    return name
