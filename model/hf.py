"""Hugging Face checkpoint import/export (config.json + safetensors, sharded or not).

Our state-dict names are the checkpoint's without the `model.` prefix of `visual.*` and
`language_model.*`; `lm_head.*` and `mtp.*` are stored as they are. transformers drops `mtp.*` on
load; we keep them, so released MTP weights survive fine-tuning and export. The released
config.json carries `num_nextn_predict_layers` and one extra `layer_types` entry for the MTP layer,
which transformers rejects: we read it as is, and write the trunk's entries only (the MTP layer's
type is kept under `mtp_layer_types`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, TextConfig, VisionConfig
from .vlm import Exaone45, init_module_weights

_TEXT_KEYS = [f for f in TextConfig.__dataclass_fields__ if f != "layer_types"]
_VISION_KEYS = [f for f in VisionConfig.__dataclass_fields__ if f != "rope_theta"]
_TOP_KEYS = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"]


def config_from_hf(d: dict) -> ModelConfig:
    t, v = d["text_config"], d["vision_config"]
    text = {k: t[k] for k in _TEXT_KEYS if k in t}
    if "rope_parameters" not in t and "rope_theta" in t:  # transformers 4.x style
        text["rope_parameters"] = {"rope_type": "default", **(t.get("rope_scaling") or {}), "rope_theta": t["rope_theta"]}
    if t.get("head_dim") is None:
        text["head_dim"] = t["hidden_size"] // t["num_attention_heads"]
    text["num_nextn_predict_layers"] = t.get("num_nextn_predict_layers", 0)
    layer_types = list(t.get("layer_types") or [])
    text["layer_types"] = layer_types + list(t.get("mtp_layer_types", []))
    vision = {k: v[k] for k in _VISION_KEYS if k in v}
    vision["rope_theta"] = (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    top = {k: d[k] for k in _TOP_KEYS if k in d}
    return ModelConfig(vision_config=VisionConfig(**vision), text_config=TextConfig(**text), **top)


def config_to_hf(cfg: ModelConfig) -> dict:
    tc, vc = cfg.text_config, cfg.vision_config
    text = {k: getattr(tc, k) for k in _TEXT_KEYS}
    text.update(model_type="exaone4", layer_types=tc.layer_types[: tc.num_hidden_layers])
    text["sliding_window_pattern"] = None if tc.sliding_window is None else 4
    if tc.num_nextn_predict_layers:
        text["mtp_layer_types"] = tc.layer_types[tc.num_hidden_layers :]
    vision = {k: getattr(vc, k) for k in _VISION_KEYS}
    vision.update(model_type="exaone4_5_vision", rope_parameters={"rope_type": "axial", "rope_theta": vc.rope_theta})
    return {
        "architectures": ["Exaone4_5_ForConditionalGeneration"],
        "model_type": "exaone4_5",
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": vision,
        **{k: getattr(cfg, k) for k in _TOP_KEYS},
    }


def hf_key(name: str) -> str:
    if name.startswith(("visual.", "language_model.")):
        return "model." + name
    return name


def our_key(name: str) -> str:
    return name[len("model.") :] if name.startswith(("model.visual.", "model.language_model.")) else name


def _weight_map(path: Path) -> dict[str, tuple[str, str]]:
    """Our tensor name -> (the safetensors file holding it, its name there)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {our_key(k): (f, k) for k, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {our_key(k): ("model.safetensors", k) for k in f.keys()}


def checkpoint_names(path: str | os.PathLike) -> set[str]:
    """The tensors a Hugging Face directory holds, by our names (nothing is read but the headers)."""
    return set(_weight_map(Path(path)))


def read_tensors(path: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors (our names) of a Hugging Face directory, each read from its file."""
    path, where = Path(path), _weight_map(Path(path))
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name][0], []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(path / file, framework="pt") as f:
            for name in group:
                out[name] = f.get_tensor(where[name][1])
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_tensors(path, sorted(checkpoint_names(path)))


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", **overrides) -> Exaone45:
    """Our model from a directory written by transformers' save_pretrained or the released checkpoint."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with torch.device("meta"):
        model = Exaone45(cfg)
    state = read_state_dict(path)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing and not all(k.startswith("mtp.") for k in missing):
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
    if unexpected:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} unknown tensors, e.g. {sorted(unexpected)[:5]}")
    if missing:
        # transformers drops mtp.* when it saves: start the MTP module fresh rather than refuse.
        warnings.warn(f"{path}: no mtp.* weights in the checkpoint; the MTP module starts freshly initialized")
        model.mtp.to_empty(device="cpu")
        init_module_weights(model.mtp, cfg.text_config.initializer_range)
        state.update({f"mtp.{k}": v for k, v in model.mtp.state_dict().items()})
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.to(device)


def save_pretrained(model: Exaone45, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and safetensors (sharded above max_shard_bytes) that transformers loads.
    Written into a temporary sibling directory and renamed, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    state = {hf_key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        _rmtree(old)
    else:
        os.replace(tmp, path)


def _rmtree(p: Path):
    import shutil

    shutil.rmtree(p, ignore_errors=True)
