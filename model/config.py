"""Model configuration: dataclasses whose field names are the Hugging Face config's.

`VisionConfig` mirrors `Exaone4_5_VisionConfig`, `TextConfig` mirrors `Exaone4Config` (plus the
released checkpoint's `num_nextn_predict_layers`), `ModelConfig` mirrors `Exaone4_5_Config` and adds
the few knobs that are ours (FP8, attention kernel, MTP loss weight). The same dataclasses are the
Hydra schema of `model=...` (recipes/model/*.yaml hold the preset names).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

SLIDING = "sliding_attention"
FULL = "full_attention"

# Decoder linears that run in FP8 by default: the released FP8 checkpoint of EXAONE 4.5 quantizes
# the decoder MLPs; the vision tower, attention projections, LM head and embeddings stay high precision.
DEFAULT_FP8_MODULES = [r"^(language_model|mtp)\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)$"]


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    num_key_value_heads: int = 8
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 5120
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 153600
    hidden_size: int = 5120
    intermediate_size: int = 27392
    num_hidden_layers: int = 64
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    # HF `rope_parameters`: rope_type default|llama3, rope_theta, and llama3's factor,
    # low_freq_factor, high_freq_factor, original_max_position_embeddings.
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "rope_theta": 1000000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    sliding_window: Optional[int] = 4096
    # One entry per decoder layer, then one per MTP layer (as the released config stores it).
    # Empty: 3 sliding layers then 1 global, repeated, and the last trunk layer global.
    layer_types: list[str] = field(default_factory=list)
    num_nextn_predict_layers: int = 1
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 53
    pad_token_id: Optional[int] = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        total = self.num_hidden_layers + self.num_nextn_predict_layers
        if not self.layer_types:
            pattern = [SLIDING if (i + 1) % 4 else FULL for i in range(self.num_hidden_layers)]
            if self.sliding_window is None:
                pattern = [FULL] * self.num_hidden_layers
            self.layer_types = pattern + [pattern[-1]] * self.num_nextn_predict_layers
        elif len(self.layer_types) == self.num_hidden_layers and self.num_nextn_predict_layers:
            self.layer_types = list(self.layer_types) + [self.layer_types[-1]] * self.num_nextn_predict_layers
        if len(self.layer_types) != total:
            raise ValueError(
                f"text_config.layer_types has {len(self.layer_types)} entries; expected "
                f"num_hidden_layers + num_nextn_predict_layers = {total}"
            )
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"text_config.layer_types: unknown attention types {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("text_config.num_attention_heads must be a multiple of num_key_value_heads")


@dataclass
class ModelConfig:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 67
    video_token_id: int = 68
    vision_start_token_id: int = 73
    vision_end_token_id: int = 74
    # Ours, not Hugging Face's:
    fp8: str = "none"  # none | emulated | torchao | te
    fp8_scaling: str = "tensorwise"  # tensorwise | rowwise
    fp8_modules: list[str] = field(default_factory=lambda: list(DEFAULT_FP8_MODULES))
    attn_impl: str = "sdpa"  # sdpa | flex | flash | eager
    mtp_loss_weight: float = 0.1
    loss_chunk_size: int = 4096  # tokens per chunk of the LM-head + cross-entropy

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig(**self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig(**self.text_config)
        if self.fp8 not in ("none", "emulated", "torchao", "te"):
            raise ValueError(f"model.fp8={self.fp8!r}: expected none | emulated | torchao | te")
        if self.attn_impl not in ("sdpa", "flex", "flash", "eager"):
            raise ValueError(f"model.attn_impl={self.attn_impl!r}: expected sdpa | flex | flash | eager")
        if self.vision_config.out_hidden_size != self.text_config.hidden_size:
            raise ValueError("model.vision_config.out_hidden_size must equal text_config.hidden_size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"name"}
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        d.pop("name", None)
        return cls(**d)


def _tiny() -> ModelConfig:
    return ModelConfig(
        vision_config=VisionConfig(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, num_key_value_heads=2,
            window_size=56, out_hidden_size=128, fullatt_block_indexes=[1],
        ),
        text_config=TextConfig(
            vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=64,
        ),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vision_config=VisionConfig(
            depth=4, hidden_size=256, intermediate_size=768, num_heads=4, num_key_value_heads=2,
            window_size=112, out_hidden_size=768, fullatt_block_indexes=[3],
        ),
        text_config=TextConfig(
            vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=1024,
        ),
    )


def _exaone4_5_33b() -> ModelConfig:
    # The released EXAONE-4.5-33B: EXAONE 4.0 32B decoder (64 layers, LLLG, window 4096, NoPE on
    # global layers, llama3-scaled RoPE theta 1e6), 153,600-token vocabulary, one MTP layer, and a
    # Qwen2.5-VL-shaped vision tower with GQA. Loading the released config.json overrides all of this.
    return ModelConfig()


PRESETS = {"tiny": _tiny, "small": _small, "exaone4_5_33b": _exaone4_5_33b}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration (`tiny`, `small`, `exaone4_5_33b`), optionally with top-level overrides."""
    if name not in PRESETS:
        raise ValueError(f"model={name!r}: unknown preset; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"model.{key}: unknown key")
        setattr(cfg, key, copy.deepcopy(value))
    cfg.__post_init__()
    return cfg
