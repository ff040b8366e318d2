"""metrics.jsonl (appended on resume), wandb (offline by default), a progress bar on rank 0, and the
FLOPs formula behind tokens/s -> MFU.

FLOPs per trained token (forward + backward = 3x forward):
  decoder: 6 * (non-embedding decoder parameters, LM head included)
           + 6 * 2 * layers * heads * head_dim * attended keys (per token: min(window, doc length)/2 for
             causal attention, averaged as seq_len/2 for global layers and min(window, seq_len/2) for sliding ones)
  MTP:     the same per MTP layer, plus its fc
  vision:  6 * (vision parameters) per patch plus the attention term over each patch's window or frame.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

DEFAULT_PEAK_FLOPS = {"cuda": 989e12, "cpu": 124e9}  # H100 dense bf16; this CPU's measured fp32 matmul


def decoder_flops_per_token(cfg, seq_len: int) -> float:
    tc = cfg.text_config
    h, hd = tc.hidden_size, tc.head_dim
    per_layer = h * (tc.num_attention_heads + 2 * tc.num_key_value_heads) * hd + tc.num_attention_heads * hd * h
    per_layer += 3 * h * tc.intermediate_size
    layers = tc.num_hidden_layers + tc.num_nextn_predict_layers
    params = layers * per_layer + h * tc.vocab_size * (1 + (tc.num_nextn_predict_layers > 0)) + 2 * h * h * tc.num_nextn_predict_layers
    attn = 0.0
    for kind in tc.layer_types:
        keys = min(tc.sliding_window, seq_len / 2) if kind == "sliding_attention" and tc.sliding_window else seq_len / 2
        attn += 2 * 2 * tc.num_attention_heads * hd * keys  # QK^T and AV, 2 FLOPs per MAC
    return 6 * params + 3 * attn


def vision_flops_per_patch(cfg) -> float:
    vc = cfg.vision_config
    h, hd = vc.hidden_size, vc.head_dim
    per_block = h * (vc.num_heads + 2 * vc.num_key_value_heads) * hd + h * h + 3 * h * vc.intermediate_size
    merger = (h * 4) ** 2 / 4 + h * 4 * vc.out_hidden_size / 4
    window = (vc.window_size // vc.patch_size) ** 2
    return 6 * (vc.depth * per_block + merger) + 3 * vc.depth * 4 * vc.num_heads * hd * window


class Metrics:
    """One JSON object per logged step in <run_dir>/metrics.jsonl; the same numbers in wandb."""

    def __init__(self, run_dir: str, cfg, is_main: bool, total_steps: int, start_step: int, config_dict: dict):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.wandb.project, group=cfg.wandb.group, name=cfg.wandb.name or f"{cfg.stage}-{Path(run_dir).name}",
                mode=cfg.wandb.mode, dir=str(Path(run_dir)), config=config_dict, resume="allow",
                id=self._run_id(run_dir),
            )
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.stage, dynamic_ncols=True, leave=True)

    @staticmethod
    def _run_id(run_dir: str) -> str:
        """The same wandb run across resumes of one run_dir."""
        p = Path(run_dir) / ".wandb_id"
        if p.exists():
            return p.read_text().strip()
        import uuid

        rid = uuid.uuid4().hex[:12]
        p.write_text(rid)
        return rid

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.bar is not None:
            self.bar.n = row["step"]
            shown = {k: row[k] for k in ("loss", "eval/loss", "lr", "tokens_per_s") if k in row}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=True)

    def log_images(self, images, captions) -> None:
        if self.is_main and self.wandb is not None and images:
            import wandb

            self.wandb.log({"samples": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, commit=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def peak_flops(device: torch.device, configured: Optional[float]) -> float:
    return configured or DEFAULT_PEAK_FLOPS["cuda" if device.type == "cuda" else "cpu"]
