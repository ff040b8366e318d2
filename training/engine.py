"""FSDP2 and DeepSpeed ZeRO behind one interface: everything the training loops need of an engine.

    engine = build_engine(cfg, d, module)      # module from training.parallelize.build_module
    out = engine.model(...)                    # forward (the DeepSpeed engine, or the module)
    engine.backward(loss * engine.loss_scale, last=k == n - 1)
    grad_norm, finite = engine.step(finite)    # clip, step (a non-finite step changes no weight), zero grads
    engine.save(dir) / engine.load(dir)        # model (DCP, our names) + optimizer state
    engine.full_state_dict()                   # whole model on rank 0 (export, vLLM weight sync)
    with engine.whole_model() as plain: ...    # every parameter whole on this rank, no hooks (decoding)

Losses are normalized by the step's global token (or sequence) count and multiplied by
`loss_scale` (the ranks the engine averages gradients over), so gradient accumulation and data
parallelism give the update one big batch would. `last` marks the micro-batch after which the
gradients are reduced and the optimizer steps (DeepSpeed needs to be told; FSDP2 reduces every
backward).

Checkpoints keep the model in DCP under our parameter names whatever the engine (one stage may start
from another engine's checkpoint): FSDP2 and ZeRO-1/2 write their shards / replicas, ZeRO-3's rank 0
writes the model gathered layer by layer (DCP reshards it on load). The optimizer is DCP for FSDP2
and DeepSpeed's own checkpoint (`ds/`) for DeepSpeed.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from model.vlm import Exaone45

from .distributed import Dist

WRAPPED = "_checkpoint_wrapped_module."


def build_engine(cfg, d: Dist, module: Exaone45) -> "Engine":
    """The optimizer over the module's trainable parameters and the engine of `parallel.engine`."""
    from .optim import build_optimizer

    optimizer = build_optimizer(module, cfg.train, fused=d.device.type == "cuda")
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedEngine(cfg, d, module, optimizer)
    return Engine(cfg, d, module, optimizer)


class Engine:
    """FSDP2 (fully_shard applied in training/parallelize.py); in a world of one also the plain case."""

    name = "fsdp2"

    def __init__(self, cfg, d: Dist, module: Exaone45, optimizer: torch.optim.Optimizer):
        self.cfg, self.d, self.module, self.optimizer = cfg, d, module, optimizer

    @property
    def model(self) -> nn.Module:
        """What the forward goes through."""
        return self.module

    @property
    def loss_scale(self) -> float:
        """FSDP2 and DeepSpeed average gradients over every rank (dp x cp)."""
        return float(self.d.world)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def backward_nothing(self, last: bool = True) -> None:
        """In place of the backward of a micro-batch whose loss was not finite (on every rank)."""

    def step(self, finite: bool) -> tuple[float, bool]:
        """Clip to train.grad_clip and step; a non-finite loss (`finite` False, agreed by every rank)
        or gradient norm skips the update on every rank alike. Returns (gradient norm, finite)."""
        grad_norm = float("nan")
        if finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip))
        finite = finite and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        dcp.save({"model": get_model_state_dict(self.module)}, checkpoint_id=str(path / "model"))
        dcp.save({"optim": get_optimizer_state_dict(self.module, self.optimizer)}, checkpoint_id=str(path / "optim"))

    def load(self, path: Path) -> None:
        self.load_model(path)
        state = {"optim": get_optimizer_state_dict(self.module, self.optimizer)}
        dcp.load(state, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])

    def load_model(self, path: Path) -> None:
        state = {"model": get_model_state_dict(self.module)}
        dcp.load(state, checkpoint_id=str(Path(path) / "model"))
        set_model_state_dict(self.module, state["model"], options=StateDictOptions(strict=True))

    def full_state_dict(self, ranks: tuple[int, ...] = (0,)) -> dict[str, torch.Tensor]:
        """The whole model under our parameter names on the CPU of the global `ranks` (rank 0 by
        default; the vLLM weight sync asks for every node's local rank 0), an empty dict elsewhere.
        Gathered tensor by tensor; every rank must call it."""
        from torch.distributed._state_dict_utils import _gather_state_dict

        # what get_model_state_dict(full_state_dict=True, cpu_offload=True) does, for any set of ranks
        state = _gather_state_dict(get_model_state_dict(self.module), cpu_offload=True, ranks_only=tuple(ranks))
        return {k.replace(WRAPPED, ""): v for k, v in state.items()}

    # --- decoding ------------------------------------------------------------------------------

    @contextmanager
    def whole_model(self) -> Iterator[Exaone45]:
        """A hook-free copy of the model holding every parameter whole on this rank (no copy of the
        tensors), in eval mode with plain attention over whole sequences, a KV-cache kernel and no
        FP8: what decoding runs on (SFT generation metrics, GRPO rollouts). Inside, ranks may
        generate different numbers of tokens: there is no collective in it. FSDP2 all-gathers every
        unit once on entry (the same units in the same order on every rank) and frees them on exit;
        decoding through FSDP's hooks instead would run them per layer and per token and record
        every call for backward prefetching (bench/RESULTS.md: the copy decodes at the plain
        model's speed, the hooked module at 0.7x). Parameters are in the compute dtype."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        with torch.no_grad():
            for unit in units:
                unit.unshard()
            try:
                yield decoding_copy(self.module)
            finally:
                for unit in reversed(units):
                    unit.reshard()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 around the module (ZeRO-3's was built partitioned, under `zero3_init`),
    with a torch AdamW and our schedule (DeepSpeed's fused Adam would compile ops)."""

    name = "deepspeed"

    def __init__(self, cfg, d: Dist, module: Exaone45, optimizer: torch.optim.Optimizer):
        super().__init__(cfg, d, module, optimizer)
        self.zero3 = cfg.parallel.zero_stage == 3
        self.engine = _initialize(module, optimizer, deepspeed_config(cfg, d), self.zero3)

    @property
    def model(self) -> nn.Module:
        return self.engine

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalized over the step

    def backward_nothing(self, last: bool = True) -> None:
        # DeepSpeed reduces gradients inside backward at the boundary: every rank must still run one
        self.backward(sum(p.sum() for p in self.module.parameters() if p.requires_grad) * 0.0, last)

    def step(self, finite: bool) -> tuple[float, bool]:
        # DeepSpeed steps at the boundary whatever happened (it has no skip in fp32 and bf16): a
        # non-finite step runs at learning rate 0, which leaves the weights as they were (Adam's
        # moments still advance)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if not finite:
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
        self.engine.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        return grad_norm, finite and math.isfinite(grad_norm)

    def save(self, path: Path) -> None:
        if self.zero3:  # the same DCP layout, written whole by rank 0 (DCP reshards it on load)
            state = self.full_state_dict()
            if self.d.is_main:
                with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.save({"model": state}, checkpoint_id=str(path / "model"), no_dist=True)
        else:
            dcp.save({"model": get_model_state_dict(self.module)}, checkpoint_id=str(path / "model"))
        self.engine.save_checkpoint(str(path / "ds"), tag="ds", save_latest=False, exclude_frozen_parameters=False)

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path / "ds"), tag="ds", load_module_strict=True, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        if not self.zero3:  # ZeRO-3 restores its partitions and their fp32 masters together
            self.load_model(path)  # DeepSpeed restored its own copy; the DCP one is authoritative

    def load_model(self, path: Path) -> None:
        if self.zero3:
            raise NotImplementedError("ZeRO-3 loads weights before deepspeed.initialize (training.parallelize.load_weights) "
                                      "or resumes through its own checkpoint")
        super().load_model(path)

    def full_state_dict(self, ranks: tuple[int, ...] = (0,)) -> dict[str, torch.Tensor]:
        if not self.zero3:
            return super().full_state_dict(ranks)
        if tuple(ranks) == (0,):
            # gathered layer by layer, in the parameters' own dtype despite the method's name
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = _zero3_gathered(self.module, self.d.rank in ranks)
        return {k.replace(WRAPPED, ""): v for k, v in (state or {}).items()}

    @contextmanager
    def whole_model(self) -> Iterator[Exaone45]:
        if not self.zero3:  # ZeRO-1/2: the module is whole on every rank
            with torch.no_grad():
                yield decoding_copy(self.module)
            return
        import deepspeed

        # gather every partition once (ZeRO-3's per-module hooks would gather per token)
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            yield decoding_copy(self.module)


def _zero3_gathered(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """ZeRO-3's partitions gathered one module at a time (collective on every rank), copied to the
    CPU where `keep`: `_zero3_consolidated_16bit_state_dict` without its rank-0-only copy."""
    import deepspeed

    out = {}

    def visit(m: nn.Module, prefix: str) -> None:
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False))):
            if keep:
                out.update({prefix + n: p.detach().cpu().clone() for n, p in m.named_parameters(recurse=False)})
                out.update({prefix + n: b.detach().cpu().clone() for n, b in m.named_buffers(recurse=False)
                            if n not in m._non_persistent_buffers_set})
        for name, child in m.named_children():
            visit(child, f"{prefix}{name}.")

    visit(module, "")
    return out


def decoding_copy(module: Exaone45) -> Exaone45:
    """A copy of `module` built on the meta device around its (whole, gathered) parameter tensors (no
    copy of them), without FSDP/ZeRO hooks, context parallelism, compile or FP8 linears (decoding
    runs the high-precision GEMMs: TE's FP8 needs token counts divisible by 8, which decoding one
    token per sequence does not give), and with a kernel that reads a KV cache."""
    from dataclasses import replace

    cfg = replace(module.cfg, fp8="none", attn_impl=module.cfg.attn_impl if module.cfg.attn_impl in ("sdpa", "eager") else "sdpa")
    with torch.device("meta"):
        twin = Exaone45(cfg)
    params = {name.replace(WRAPPED, ""): p.data for name, p in module.named_parameters()}
    twin.load_state_dict(params, assign=True)
    return twin.eval()


# --- DeepSpeed ------------------------------------------------------------------------------------


def deepspeed_config(cfg, d: Dist) -> dict:
    """DeepSpeed's config for the run. DeepSpeed knows no cp group: it averages gradients over every
    rank, as the loss scale assumes, and counts every rank in its (bookkeeping) batch size."""
    tc = cfg.train
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * d.world,
        "gradient_clipping": tc.grad_clip,
        # memory_efficient_linear would replace torch.nn.functional.linear process-wide (zero.Init
        # "persists unless manually reset"): every F.linear, ours included, would run DeepSpeed's
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "memory_efficient_linear": False},
        "bf16": {"enabled": tc.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed() -> Any:
    """deepspeed, its communication initialized on the torch process group (once)."""
    import importlib

    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    # DeepSpeed's collectives call torch's deprecated names, once per call (every ZeRO-3 module)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    # On CPU DeepSpeed would compile a shared-memory comm op on first use (+40-50 s); gloo is enough.
    # (By module name: `import deepspeed.comm.torch as m` binds deepspeed.comm's attribute `torch`,
    # which is the torch package, so patching that name missed DeepSpeed's module.)
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    return deepspeed


@contextmanager
def zero3_init(ds_config: dict):
    """Modules created inside have their parameters partitioned over the ranks as they are created, in
    the config's dtype (bf16 when its `bf16` is enabled, else fp32).

    The dtype comes from the config, not zero.Init's `dtype` argument: DeepSpeed 0.19 honours that
    argument only where the accelerator supports fp16 (`dtype or fp16 if is_fp16_supported() else
    bf16 ...`), so on a CPU without mkldnn fp16 (AMD EPYC; Intel Xeons with AMX have it) `dtype=fp32`
    built bf16 parameters, the fp32 run's ZeRO-3 masters started from bf16-rounded weights and its
    first loss differed from FSDP2's by 2.6e-5."""
    deepspeed = prepare_deepspeed()
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None):
        yield


def check_zero3_dtype(module: nn.Module, ds_config: dict) -> None:
    """Raises when zero.Init built `module`'s parameters below the config's precision (an fp32 run's in
    bf16: see `zero3_init`); a bf16 run's may hold fp32 ones (DeepSpeed's keep-in-fp32 modules)."""
    allowed = (torch.bfloat16, torch.float32) if ds_config.get("bf16", {}).get("enabled") else (torch.float32,)
    wrong = sorted({str(p.dtype) for p in module.parameters() if p.dtype not in allowed})
    if wrong:
        raise RuntimeError(f"ZeRO-3 built parameters in {wrong} for a run whose train.dtype allows only {allowed}: "
                           "DeepSpeed's zero.Init did not follow the config's dtype")


class _ModelOutputNotice(logging.Filter):
    """Drops ZeRO-3's notice that it cannot see the tensors inside the root module's ModelOutput: it
    only needs them to gather the root's own parameters for backward, and the root owns none (every
    parameter sits in a submodule returning tensors, or is registered with one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ModelOutput" not in record.getMessage()


_MODEL_OUTPUT_NOTICE = _ModelOutputNotice()  # one instance: addFilter skips one already there


def _initialize(module: Exaone45, optimizer, ds_config: dict, zero3: bool):
    deepspeed = prepare_deepspeed()
    if zero3:
        # ZeRO-3 gathers a module's own parameters around its forward; these are read by another one
        for owner, param in module.external_parameters():
            deepspeed.zero.register_external_parameter(owner, param)
        logging.getLogger("DeepSpeed").addFilter(_MODEL_OUTPUT_NOTICE)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def initialize_frozen(module: Exaone45, ds_config: dict):
    """An optimizer-less ZeRO-3 engine around a frozen (partitioned) module, for its forward only."""
    deepspeed = prepare_deepspeed()
    for owner, param in module.external_parameters():
        deepspeed.zero.register_external_parameter(owner, param)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False)
    return engine
