"""FP8 training for chosen linear layers, applied to a built model from outside (torchtitan style).

    names = apply_fp8(model, cfg.fp8, cfg.fp8_modules, cfg.fp8_scaling)  # cfg: ModelConfig

swaps every `nn.Linear` whose qualified name matches one of the regexes for an FP8 linear of the
chosen backend and returns the swapped names. The model code never changes; the swapped modules keep
the original weight and bias Parameters, so state_dict keys and values (checkpoints, Hugging Face
export) are the same with FP8 on or off. Call it after building the model (on the meta device or
materialized) and before FSDP / torch.compile, like torchtitan.

Backends (`model.fp8`):
- `none`: nothing is swapped.
- `emulated`: `EmulatedFloat8Linear`, plain PyTorch that rounds the GEMM operands to float8 and back
  (the formats of the scaling recipe below) and multiplies in fp32. It runs anywhere and is the
  numerical reference for what FP8 training does to a model (and for the torchao path).
- `torchao`: torchao's `Float8Linear` (real scaled matmuls; on CPU through `torch._scaled_mm`).
- `te`: Transformer Engine's `Linear` inside an FP8 autocast (GPU only).

Scaling (`model.fp8_scaling`): `tensorwise` uses one scale per operand; `rowwise` uses one scale per
row of each GEMM operand along the contracted dimension (per token of the input, per output row of
the weight in the forward), the recipe torchao calls "rowwise". The formats follow torchao's
recipes: tensorwise rounds activations and weights to e4m3 and output gradients to e5m2; rowwise
rounds all three to e4m3 (per-row scales leave little need for e5m2's range). Scales are exact per
tensor and rounded down to a power of two per row, as in torchao, so `emulated` computes what
torchao does up to fp32 summation order (rowwise, up to bf16 rounding: torchao's CPU GEMM writes
bf16), forward and backward.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from typing import Optional

import torch
import torch.nn as nn

from model.config import DEFAULT_FP8_MODULES

log = logging.getLogger(__name__)

MODES = ("none", "emulated", "torchao", "te")
SCALINGS = ("tensorwise", "rowwise")
E4M3 = torch.float8_e4m3fn  # activations and weights: more mantissa
E5M2 = torch.float8_e5m2  # gradients: more range
_AMAX_EPS = 1e-12  # torchao's floor on amax, so an all-zero tensor (or row) gets a finite scale

TE_MISSING = (
    "model.fp8=te needs Transformer Engine (GPU only): pip install 'transformer-engine[pytorch]' "
    "(or this project's `te` extra) on a CUDA machine; use model.fp8=emulated or model.fp8=torchao on CPU"
)


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3, dim: Optional[int] = None,
             power_of_2_scale: bool = False) -> torch.Tensor:
    """Round `x` to float8 `dtype` and back, returned in fp32.

    The scale maps amax(|x|) onto the format's largest value: one amax for the whole tensor when
    `dim` is None, else one per slice, reduced over `dim` (kept for broadcasting). Values are saturated to
    the format's range before the cast. `power_of_2_scale` rounds the scale down to a power of two,
    as torchao's rowwise recipe does, which makes the dequantization exact.
    """
    fmax = torch.finfo(dtype).max
    xf = x.float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    scale = (fmax / amax.double().clamp(min=_AMAX_EPS)).float()
    if power_of_2_scale:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = (xf * scale).clamp(-fmax, fmax).to(dtype)
    return q.float() / scale


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T with float8-rounded operands in all three GEMMs of a linear layer.

    Each operand is scaled along the dimension its GEMM contracts (the layout real rowwise FP8
    kernels need): forward x @ w.T contracts in_features; grad_input = q(g) @ q(w) contracts
    out_features; grad_weight = q(g).T @ q(x) contracts tokens. Tensorwise scaling ignores the
    dimension. High-precision x and w are saved (as nn.Linear does) and re-quantized in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rowwise: bool) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.rowwise = rowwise
        return (_q(x, E4M3, -1, rowwise) @ _q(w, E4M3, -1, rowwise).t()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        rowwise = ctx.rowwise
        grad_x = grad_w = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_format = E4M3 if rowwise else E5M2  # torchao's recipes
            if ctx.needs_input_grad[0]:
                grad_x = (_q(grad_out, grad_format, -1, rowwise) @ _q(w, E4M3, 0, rowwise)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (_q(grad_out, grad_format, 0, rowwise).t() @ _q(x, E4M3, 0, rowwise)).to(w.dtype)
        return grad_x, grad_w, None


def _q(t: torch.Tensor, dtype: torch.dtype, contracted_dim: int, rowwise: bool) -> torch.Tensor:
    # Scales follow torchao's recipes: exact per tensor, power-of-two per row.
    return quantize(t, dtype, contracted_dim if rowwise else None, power_of_2_scale=rowwise)


class EmulatedFloat8Linear(nn.Linear):
    """nn.Linear whose matmuls see float8-rounded operands (see `_Float8Matmul`); bias in high precision."""

    scaling: str = "tensorwise"

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "tensorwise") -> "EmulatedFloat8Linear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight  # the same Parameters: state_dict and optimizer state unchanged
        new.bias = linear.bias
        new.scaling = scaling
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Cast like autocast would for F.linear, then keep autocast out of the fp32 emulation.
            dtype = torch.get_autocast_dtype(device)
            x, w = x.to(dtype), w.to(dtype)
            b = None if b is None else b.to(dtype)
        with torch.autocast(device, enabled=False):
            y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), w, self.scaling == "rowwise")
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if b is None else y + b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=emulated, scaling={self.scaling}"


def apply_fp8(model: nn.Module, mode: str, module_filter: Optional[list[str]] = None,
              scaling: str = "tensorwise") -> list[str]:
    """Swap the `nn.Linear` submodules of `model` whose qualified names match `module_filter`.

    `module_filter` is a list of regexes tried with `re.search` against each name relative to
    `model` (None: `model.config.DEFAULT_FP8_MODULES`, the decoder and MTP MLP linears). Returns the
    names swapped, in module order. `torchao` and `te` skip, with a warning, linears whose
    in/out features are not multiples of 16 (FP8 GEMMs require it).
    """
    if mode not in MODES:
        raise ValueError(f"model.fp8={mode!r}: expected one of {' | '.join(MODES)}")
    if scaling not in SCALINGS:
        raise ValueError(f"model.fp8_scaling={scaling!r}: expected one of {' | '.join(SCALINGS)}")
    if mode == "none":
        return []
    if mode == "te":
        _import_te()  # fail before touching the model

    patterns = [re.compile(p) for p in (DEFAULT_FP8_MODULES if module_filter is None else module_filter)]
    names = [
        name for name, module in model.named_modules()
        if name and type(module) is nn.Linear and any(p.search(name) for p in patterns)
    ]
    if mode in ("torchao", "te"):
        misfits = [n for n in names if _not_16_aligned(model.get_submodule(n))]
        if misfits:
            warnings.warn(f"model.fp8={mode}: leaving {misfits} in high precision: in_features and "
                          f"out_features must be multiples of 16", stacklevel=2)
            names = [n for n in names if n not in misfits]
    if not names:
        warnings.warn(f"model.fp8={mode}: model.fp8_modules matched no nn.Linear; nothing runs in FP8",
                      stacklevel=2)
        return []

    if mode == "torchao":
        _apply_torchao(model, names, scaling)
    else:
        make = EmulatedFloat8Linear.from_linear if mode == "emulated" else _te_linear
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, make(getattr(parent, child), scaling))
    log.info("model.fp8=%s (%s): %d linears in FP8", mode, scaling, len(names))
    return names


def check_fp8_device(mode: str, scaling: str, device: torch.device | str) -> None:
    """Fail at start-up, naming the keys, where this device's FP8 GEMM (`torch._scaled_mm`, what
    torchao's linears call) cannot run the configured scaling: CPU builds before torch 2.13 take one
    scale per operand only (torch 2.11 answers rowwise scales with an internal assert, mid-step), GPUs
    before compute capability 8.9 have no FP8 GEMM. One 16 x 16 GEMM on `device` tells."""
    if mode != "torchao":
        return  # emulated runs anywhere; te checks its own hardware when it builds its linears
    a = torch.ones(16, 16, device=device).to(E4M3)
    b = torch.ones(16, 16, device=device).to(E4M3).t()  # column-major, as _scaled_mm wants its second operand
    if scaling == "rowwise":
        scales = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    else:
        scales = torch.ones((), device=device), torch.ones((), device=device)
    try:
        torch._scaled_mm(a, b, scale_a=scales[0], scale_b=scales[1], out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        hint = ("model.fp8_scaling=tensorwise (one scale per operand)" if scaling == "rowwise" else
                "a GPU of compute capability 8.9+ (H100, L40S, ...)")
        raise ValueError(f"model.fp8=torchao with model.fp8_scaling={scaling}: torch {torch.__version__} cannot run "
                         f"this FP8 GEMM on {torch.device(device).type} ({str(e).splitlines()[0][:200]}); use {hint}, "
                         "or model.fp8=emulated (the numerical reference, in any precision)") from e


def _not_16_aligned(linear: nn.Linear) -> bool:
    return linear.in_features % 16 != 0 or linear.out_features % 16 != 0


def _apply_torchao(model: nn.Module, names: list[str], scaling: str) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig() if scaling == "tensorwise" else Float8LinearConfig.from_recipe_name("rowwise")
    chosen = set(names)
    # torchao's Float8Linear.from_float reassigns the original weight and bias Parameters.
    convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn in chosen, config=config)


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or OSError/RuntimeError when CUDA libraries are missing
        raise RuntimeError(TE_MISSING) from e
    return te


@functools.cache
def _te_linear_class():
    te = _import_te()
    from transformer_engine.common import recipe

    class TEFloat8Linear(te.Linear):
        """te.Linear that runs its own forward under FP8 autocast with a stateless recipe."""

        fp8_recipe = None
        is_linear = True  # initialized like nn.Linear (model.vlm.init_module_weights)
        # Current and block scaling keep no amax history, so there is no FP8 state to checkpoint:
        # drop TE's `_extra_state` entry to keep state_dict keys identical to nn.Linear's.
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            autocast = getattr(te, "autocast", None)
            if autocast is not None:
                with autocast(enabled=True, recipe=self.fp8_recipe):
                    return super().forward(x)
            with te.fp8_autocast(enabled=True, fp8_recipe=self.fp8_recipe):
                return super().forward(x)

    def make_recipe(scaling):
        if scaling == "tensorwise":
            return recipe.Float8CurrentScaling()
        return recipe.Float8BlockScaling()  # TE's nearest to rowwise: 1x128 activation blocks

    return TEFloat8Linear, make_recipe


def _te_linear(linear: nn.Linear, scaling: str) -> nn.Module:
    cls, make_recipe = _te_linear_class()
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
              params_dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():  # TE allocates its own Parameters; copy values, names stay weight / bias
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.fp8_recipe = make_recipe(scaling)
    new.train(linear.training)
    return new
