"""The run configuration: one typed schema for every key (model, data, train, parallel, rl, sft, ...),
validated once at start-up.

Hydra composes recipes/*.yaml; `load_config` merges the result into `Config` (so any unknown key, a
typo in a recipe or a `+new.key=` override, fails naming it), derives what other parts of the config
only mirror (the stage's mixture from `data.stages`, the data path's token ids and patch sizes from
the model), and `validate` checks what no type can say (choices, the process layout, kernels that
the chosen context-parallel path or dtype cannot run, a DeepSpeed replica that cannot fit): every
error names its key, before any process group or model exists.

One place per fact: the model's knobs default to `model.config.ModelConfig`'s; token ids and patch
sizes are the model config's (the `data` node receives them); GRPO's algorithm and loop knobs are
`RLCfg`, the SFT curriculum `SFTCfg`, the data path `data.mixture.DataConfig`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data.images import PatchGeometry
from data.mixture import DataConfig
from data.text import SpecialTokens
from model.config import ModelConfig, preset

from .tasks import default_reward_weights

_MODEL_DEFAULTS = {f.name: f for f in fields(ModelConfig)}


def _model_default(name: str):
    f = _MODEL_DEFAULTS[name]
    return f.default


@dataclass
class ModelCfg:
    """`model=NAME` picks a preset of model/config.py; the knobs below are ModelConfig's own."""

    name: str = "tiny"  # tiny | small | exaone4_5_33b
    fp8: str = _model_default("fp8")  # none | emulated | torchao | te
    fp8_scaling: str = _model_default("fp8_scaling")  # tensorwise | rowwise
    fp8_modules: Optional[list[str]] = None  # regexes of the linears in FP8; None: the model's default (decoder MLPs)
    attn_impl: str = _model_default("attn_impl")  # sdpa | flex | flash | eager
    mtp_loss_weight: float = _model_default("mtp_loss_weight")
    loss_chunk_size: int = _model_default("loss_chunk_size")


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
    compile: bool = False  # torch.compile each decoder layer and vision block (training/parallelize.py)
    compile_backend: str = "inductor"  # inductor | aot_eager (tracing and autograd without code generation) | eager
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
    gpu_memory_gib: float = 80.0  # per device; a DeepSpeed ZeRO-1/2 replica over it is refused at start-up
    timeout_s: int = 1800  # collectives (NCCL / gloo) that take longer abort the run instead of hanging it


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
class ScaleCfg:
    """`+scale=mini` (recipes/scale/mini.yaml): the miniature of a recipe. `recipes.<recipe>` holds
    that recipe's miniature values; the launchers merge them after the recipe and before the
    command line (launch.common.scale_overrides)."""

    name: str = "full"  # full | mini
    recipes: dict[str, Any] = field(default_factory=dict)


@dataclass
class VLLMCfg:
    """`rl.rollout_engine=vllm`: the rollout server one local rank 0 per node starts (rl/rollout_engine.py)."""

    tensor_parallel_size: int = 1  # GPUs one engine spans (1 on CPU)
    gpu_memory_utilization: float = 0.1  # vLLM's; on CPU the share of host memory it reserves (0.92 fails there)
    kv_cache_gib: Optional[float] = 1.0  # per engine; None: vLLM sizes it (GPU: from gpu_memory_utilization)
    max_model_len: Optional[int] = None  # None: rl.max_prompt_tokens + rl.max_new_tokens
    port: Optional[int] = None  # None: a free one, sent to the node's other ranks
    python: Optional[str] = None  # the venv's interpreter; None: $EXAONE_VLLM_PYTHON, else .venv-vllm/bin/python
    speculative_mtp: int = 0  # MTP draft tokens per step; 0: off (needs the VLM class: GPU only, unverified)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0  # one rollout request or weight sync; longer counts as a hung server


@dataclass
class RLCfg:
    """GRPO (launch/grpo.py, rl/): the algorithm's knobs (rl/grpo.py) and the loop's (rl/train.py)."""

    # groups, zero-variance filter and refill
    group_size: int = 8  # completions per prompt (G)
    train_prompts_per_step: int = 16  # groups with reward variance per optimizer step, over all ranks
    rollout_prompts_per_batch: int = 16  # prompts per rollout batch, over all ranks
    zero_std_tol: float = 1e-6  # groups whose filter signal has std at most this carry no signal and are dropped
    # the rewards whose per-group spread decides which groups train (summed, unweighted); None: each
    # task's correctness reward (training/tasks.py), the format reward excluded (DAPO: 0 < correct < G)
    filter_on: Optional[list[str]] = None
    max_gen_batches: int = 4  # rollout batches per step at most; then train on what there is
    on_underfilled: str = "warn"  # warn | fail
    # advantages and loss
    adv_eps: float = 1e-6
    norm_adv_by_std: bool = True  # False: advantages are r - mean (Dr. GRPO)
    clip_eps_low: float = 0.2  # ratio clipped to [1 - clip_eps_low, 1 + clip_eps_high]
    clip_eps_high: float = 0.28  # higher than low ("clip-higher"): rare tokens can still grow
    clip_ratio_c: Optional[float] = 3.0  # dual-clip: with a negative advantage the loss is capped at -c A; None: off
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    kl_coef: float = 0.0  # weight of the k3 KL to the frozen reference; 0 skips the reference
    entropy_coef: float = 0.0
    update_epochs: int = 1  # optimizer passes over one rollout batch (old log-probs fixed)
    # sampling; on-policy by default: the loss scores samples under the model's own distribution,
    # which top-p or a presence penalty would change (the model card's top_p 0.95 / presence 1.5 are
    # for serving)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    max_new_tokens: int = 1024
    rollout_engine: str = "native"  # native (model/generate.py) | vllm (rl/rollout_engine.py, one server per node)
    vllm: VLLMCfg = field(default_factory=VLLMCfg)  # the vLLM server's settings (rollout_engine=vllm)
    # rewards: {task: {reward: weight}} (training/rewards.py); a task's entry replaces its default
    reward_weights: dict[str, dict[str, float]] = field(default_factory=default_reward_weights)
    # the loop
    enable_thinking: bool = True  # prompts end in `<think>\n` (the model card's default)
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted in skipped_samples)
    generation_batch_size: int = 64  # sequences decoded at once: per generate call on a rank; vLLM: per engine
    eval_prompts_per_source: int = 0  # held-out prompts per mixture source for eval/reward; 0: none
    eval_samples: int = 1  # completions per held-out prompt (more: a less noisy mean when sampling)
    eval_temperature: float = 0.0  # 0: greedy
    eval_presence_penalty: float = 0.0
    eval_at_start: bool = True  # evaluate before the first update too (a row with step 0)


@dataclass
class GenerationEvalCfg:
    tasks: list[str] = field(default_factory=lambda: ["math", "digits", "counting"])
    limit_per_task: int = 0  # 0: no generation eval
    max_new_tokens: int = 32
    enable_thinking: bool = False  # true: the prompt ends in `<think>\n` and the model reasons first
    batch_size: int = 32


@dataclass
class SFTCfg:
    """The SFT curriculum (training/sft.py): stages {name, mixture, steps, lr_scale, train, data}."""

    stages: list[Any] = field(default_factory=list)
    generation_eval: GenerationEvalCfg = field(default_factory=GenerationEvalCfg)


@dataclass
class LayoutCfg:
    """The machines a recipe is written for (its header says why); `dry_run` estimates this layout
    unless WORLD_SIZE is set. A run's real layout is the launcher's (WORLD_SIZE)."""

    nodes: int = 1
    gpus_per_node: int = 1


@dataclass
class Config:
    run_dir: str = "out/run"
    stage: str = "pretrain"
    recipe: Optional[str] = None  # the +recipe= preset this config came from (set by the recipe file)
    layout: LayoutCfg = field(default_factory=LayoutCfg)
    scale: ScaleCfg = field(default_factory=ScaleCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainCfg = field(default_factory=TrainCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    init_from: Optional[str] = None
    dry_run: bool = False
    rl: RLCfg = field(default_factory=RLCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)


CHOICES = {
    "model.fp8": ("none", "emulated", "torchao", "te"),
    "model.fp8_scaling": ("tensorwise", "rowwise"),
    "model.attn_impl": ("sdpa", "flex", "flash", "eager"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("fp32", "bf16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "parallel.engine": ("fsdp2", "deepspeed"),
    "parallel.cp_impl": ("allgather", "ulysses"),
    "parallel.zero_stage": (1, 2, 3),
    "wandb.mode": ("offline", "online", "disabled"),
    "scale.name": ("full", "mini"),
    "rl.loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "rl.on_underfilled": ("warn", "fail"),
    "rl.rollout_engine": ("native", "vllm"),
}
MODULES = ("vision", "merger", "language_model", "mtp")


def register_schema() -> None:
    """Make `Config` the base of the recipes: recipes/pretrain.yaml starts its defaults with
    `schema`, so every key exists (any key can be overridden without `+`) and is typed while Hydra
    composes; an unknown key fails there, naming it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"config error at `{key}`: {message}")


def load_config(cfg: DictConfig | dict, world_size: Optional[int] = None) -> DictConfig:
    """The composed config merged into the schema, with the derived parts filled in and every check
    of `validate` passed; raises ValueError naming the bad key. `world_size` defaults to `run_world_size`."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    raw.pop("hydra", None)
    given = {k: (raw.get("data") or {}).get(k) for k in ("special_tokens", "patch")}  # a resolved config has them
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise _error(key, e.msg if hasattr(e, "msg") else str(e)) from None
    if merged.stage in merged.data.stages:  # a mixture per curriculum stage: this stage's becomes the mixture
        merged.data.mixture = merged.data.stages[merged.stage]
    mcfg = model_config(merged)
    vc = mcfg.vision_config
    derived = {"special_tokens": special_tokens(mcfg),
               "patch": PatchGeometry(vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)}
    for key, value in derived.items():
        if given[key] is not None and OmegaConf.to_container(OmegaConf.structured(value)) != given[key]:
            raise _error(f"data.{key}", f"comes from the model config (model.name={merged.model.name}: {value}); "
                         "it cannot be set on the data node")
        merged.data[key] = OmegaConf.structured(value)
    validate(merged, world_size or run_world_size(merged))
    return merged


def run_world_size(cfg) -> int:
    """The ranks the run has (WORLD_SIZE); a dry run without WORLD_SIZE estimates the recipe's layout."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.layout.nodes * cfg.layout.gpus_per_node if cfg.dry_run else 1


def model_config(cfg) -> ModelConfig:
    """The model's own config: the `model.name` preset with the `model.*` knobs."""
    m = cfg.model
    knobs = {k: m[k] for k in ("fp8", "fp8_scaling", "attn_impl", "mtp_loss_weight", "loss_chunk_size")}
    if m.fp8_modules is not None:
        knobs["fp8_modules"] = list(m.fp8_modules)
    try:
        return preset(m.name, **knobs)
    except ValueError as e:
        raise _error("model.name", str(e)) from None


def special_tokens(mcfg: ModelConfig) -> SpecialTokens:
    """The token ids the data path writes, from the model config (end of turn is the decoder's EOS)."""
    tc = mcfg.text_config
    return SpecialTokens(mcfg.image_token_id, mcfg.video_token_id, mcfg.vision_start_token_id,
                         mcfg.vision_end_token_id, tc.eos_token_id, tc.pad_token_id)


def rl_config(node) -> RLCfg:
    """The `rl` node (a config node or a dict) as a checked RLCfg object; unknown keys are an error."""
    raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    try:
        rl = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RLCfg), raw))
    except (ConfigKeyError, ValidationError) as e:
        raise _error(f"rl.{getattr(e, 'full_key', '')}", getattr(e, "msg", str(e))) from None
    _check_rl(rl)
    return rl


def _check_rl(rl: RLCfg) -> None:
    for key in ("loss_agg", "on_underfilled", "rollout_engine"):
        if getattr(rl, key) not in CHOICES[f"rl.{key}"]:
            raise _error(f"rl.{key}", f"{getattr(rl, key)!r} is not one of {CHOICES[f'rl.{key}']}")
    v = rl.vllm
    if not (v.tensor_parallel_size >= 1 and 0 < v.gpu_memory_utilization <= 1 and v.speculative_mtp >= 0
            and (v.kv_cache_gib is None or v.kv_cache_gib > 0) and (v.max_model_len is None or v.max_model_len > 0)):
        raise _error("rl.vllm", f"need tensor_parallel_size >= 1, 0 < gpu_memory_utilization <= 1, kv_cache_gib > 0 "
                     f"or null, max_model_len > 0 or null, speculative_mtp >= 0; got {v}")
    if rl.group_size < 2:
        raise _error("rl.group_size", "must be >= 2: one completion has no variance")
    for key in ("max_gen_batches", "train_prompts_per_step", "rollout_prompts_per_batch", "update_epochs",
                "max_new_tokens", "generation_batch_size"):
        if getattr(rl, key) < 1:
            raise _error(f"rl.{key}", "must be >= 1")
    if not (0 <= rl.clip_eps_low < 1 and rl.clip_eps_high >= 0):
        raise _error("rl.clip_eps_low", "need 0 <= rl.clip_eps_low < 1 and rl.clip_eps_high >= 0")
    if rl.clip_ratio_c is not None and rl.clip_ratio_c <= 1:
        raise _error("rl.clip_ratio_c", f"{rl.clip_ratio_c} must be > 1 (the dual clip caps ratios above it), or null")
    from .rewards import REWARDS

    unknown = sorted(set(rl.filter_on or ()) - set(REWARDS))
    if unknown:
        raise _error("rl.filter_on", f"unknown rewards {unknown}; known: {sorted(REWARDS)}")
    from .rewards import task_weights

    for task in rl.reward_weights:
        try:
            task_weights(task, rl.reward_weights)
        except (KeyError, ValueError) as e:
            raise _error(f"rl.reward_weights.{task}", str(e)) from None


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Everything no type can say, checked at start-up (see the module docstring)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise _error(key, f"{value!r} is not one of {allowed}")
    tc, pc = cfg.train, cfg.parallel
    if pc.cp < 1 or world_size % pc.cp:
        raise _error("parallel.cp", f"{pc.cp} does not divide the world size {world_size}")
    for key in ("grad_accum", "micro_batch_size", "steps", "log_every"):
        if tc[key] < 1:
            raise _error(f"train.{key}", "must be >= 1")
    if cfg.checkpoint.every < 1:
        raise _error("checkpoint.every", "must be >= 1")
    if cfg.eval.every < 0 or cfg.eval.batches < 0:
        raise _error("eval.every", "eval.every and eval.batches must be >= 0")
    bad = sorted(set(tc.freeze) - set(MODULES))
    if bad:
        raise _error("train.freeze", f"unknown modules {bad}; known: {list(MODULES)}")
    if set(MODULES) <= set(tc.freeze):
        raise _error("train.freeze", "every module is frozen, nothing to train")
    _check_data(cfg)
    if cfg.sft.stages:
        from .sft import plan

        plan(cfg)  # the curriculum's stages, mixtures and per-stage keys
    mcfg = model_config(cfg)
    _check_kernels(cfg, mcfg)
    if pc.engine == "deepspeed" and pc.zero_stage in (1, 2):
        _check_replica(cfg, mcfg, world_size)
    if cfg.stage == "grpo" or cfg.rl.rollout_engine != "native":
        rl = rl_config(cfg.rl)
        if pc.cp != 1:
            raise _error("parallel.cp", "GRPO shards prompts over data-parallel ranks only; use parallel.cp=1")
        dp = world_size // pc.cp
        for key in ("train_prompts_per_step", "rollout_prompts_per_batch"):
            if getattr(rl, key) % dp:
                raise _error(f"rl.{key}", f"{getattr(rl, key)} is not a multiple of the {dp} data-parallel ranks")


def _check_data(cfg) -> None:
    data = cfg.data
    for where, mixture in [("data.mixture", data.mixture)] + [(f"data.stages.{k}", v) for k, v in data.stages.items()]:
        if not OmegaConf.is_dict(mixture):
            raise _error(where, f"expected {{source: weight}}, got {mixture!r}")
        bad = {n: w for n, w in mixture.items() if not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise _error(where, f"weights must be non-negative numbers, got {bad}")
    if cfg.stage not in ("sft", "sft_long") and not any(w > 0 for w in data.mixture.values()) and not cfg.sft.stages:
        raise _error("data.mixture", "no source with a positive weight")
    if data.seq_len < 2:
        raise _error("data.seq_len", "must be >= 2")


def _check_kernels(cfg, mcfg: ModelConfig) -> None:
    """Combinations of kernel, dtype and context-parallel path that cannot run."""
    impl, pc = cfg.model.attn_impl, cfg.parallel
    if impl == "flash" and cfg.train.dtype == "fp32":
        raise _error("model.attn_impl", "flash-attn computes in fp16/bf16 only: set train.dtype=bf16, or "
                     "model.attn_impl=sdpa|flex for fp32")
    if pc.cp > 1 and pc.cp_impl == "ulysses" and mcfg.text_config.num_attention_heads % pc.cp:
        heads = mcfg.text_config.num_attention_heads
        raise _error("parallel.cp_impl", f"ulysses splits the {heads} attention heads over parallel.cp={pc.cp} ranks: "
                     f"choose a parallel.cp that divides {heads} or parallel.cp_impl=allgather")
    if pc.cp > 1 and cfg.data.seq_len % (2 * pc.cp):
        raise _error("data.seq_len", f"context parallelism cuts each row into 2 x parallel.cp = {2 * pc.cp} equal chunks: "
                     f"{cfg.data.seq_len} is not a multiple of {2 * pc.cp}")
    if cfg.train.compile and pc.engine == "deepspeed" and pc.zero_stage == 3:
        raise _error("train.compile", "ZeRO-3 gathers parameters in hooks inside every module, which torch.compile "
                     "of the blocks cannot trace: use parallel.engine=fsdp2 with train.compile=true, or train.compile=false")


def _check_replica(cfg, mcfg: ModelConfig, world_size: int) -> None:
    """DeepSpeed ZeRO-1/2 keep a whole fp32 replica of the parameters (and, at ZeRO-1, of the
    gradients) on every rank: refuse a layout whose memory estimate is over parallel.gpu_memory_gib."""
    from .memory import estimate_config

    est = estimate_config(cfg, mcfg, world_size)
    if est["total"] > cfg.parallel.gpu_memory_gib:
        raise _error("parallel.zero_stage", f"DeepSpeed ZeRO-{cfg.parallel.zero_stage} keeps a whole replica of the "
                     f"{est['parameters_b']:.1f}B parameters on every rank: the memory model puts this layout at "
                     f"{est['total']:.1f} GiB per GPU, over parallel.gpu_memory_gib={cfg.parallel.gpu_memory_gib:g}; "
                     "use parallel.zero_stage=3 or parallel.engine=fsdp2")
