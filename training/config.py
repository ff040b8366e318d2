"""The run configuration schema. Hydra composes recipes/*.yaml; `load_config` merges the result
into these dataclasses so that any unknown key (a typo in a recipe or a `+new.key=` override)
fails at start-up with a message naming it, before any process group or model exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class ModelCfg:
    name: str = "tiny"  # preset: tiny | small | exaone4_5_33b
    fp8: str = "none"  # none | emulated | torchao | te
    fp8_scaling: str = "tensorwise"
    attn_impl: str = "sdpa"
    mtp_loss_weight: float = 0.1
    loss_chunk_size: int = 4096


@dataclass
class TrainCfg:
    steps: int = 200
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this step, schedule unchanged
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    lr_vision: Optional[float] = None  # None: same as lr
    lr_merger: Optional[float] = None
    freeze: list[str] = field(default_factory=list)  # any of vision, merger, language_model, mtp
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    dtype: str = "fp32"  # fp32 | bf16 (parameters stay fp32; compute in bf16)
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    log_every: int = 1
    seed: int = 0
    peak_flops: Optional[float] = None  # per device, for MFU; None: a default per device kind


@dataclass
class ParallelCfg:
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    cp: int = 1
    cp_impl: str = "allgather"  # allgather | ulysses
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)


@dataclass
class CheckpointCfg:
    every: int = 100
    keep: int = 2


@dataclass
class WandbCfg:
    mode: str = "offline"  # offline | online | disabled
    project: str = "exaone-train"
    group: Optional[str] = None
    name: Optional[str] = None
    log_images: int = 4


@dataclass
class EvalCfg:
    every: int = 0  # 0: never (SFT: at each stage's start and end)
    batches: int = 4


@dataclass
class ExportCfg:
    hf: bool = False


@dataclass
class Config:
    run_dir: str = "out/run"
    stage: str = "pretrain"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: Any = None
    train: TrainCfg = field(default_factory=TrainCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    init_from: Optional[str] = None
    dry_run: bool = False
    rl: Any = None  # GRPO knobs (rl.grpo.GRPOConfig), only for launch/grpo.py
    sft: Any = None  # SFT knobs, only for launch/sft.py


CHOICES = {
    "model.fp8": ("none", "emulated", "torchao", "te"),
    "model.attn_impl": ("sdpa", "flex", "flash", "eager"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("fp32", "bf16"),
    "parallel.engine": ("fsdp2", "deepspeed"),
    "parallel.cp_impl": ("allgather", "ulysses"),
    "parallel.zero_stage": (1, 2, 3),
    "wandb.mode": ("offline", "online", "disabled"),
}


def load_config(cfg: DictConfig) -> DictConfig:
    """Validate a Hydra-composed config against the schema; raise ValueError naming the bad key."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ValueError(f"config error at `{key}`: {e.msg if hasattr(e, 'msg') else e}") from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ValueError(f"config error at `{key}`: {value!r} is not one of {allowed}")
    if merged.parallel.cp < 1:
        raise ValueError("config error at `parallel.cp`: must be >= 1")
    if merged.train.grad_accum < 1 or merged.train.micro_batch_size < 1:
        raise ValueError("config error at `train.grad_accum`/`train.micro_batch_size`: must be >= 1")
    bad = set(merged.train.freeze) - {"vision", "merger", "language_model", "mtp"}
    if bad:
        raise ValueError(f"config error at `train.freeze`: unknown modules {sorted(bad)}")
    return merged
