"""Hugging Face export of a run (`export.hf=true`) or of any checkpoint:

    python -m training.export out/stage1 out/stage1/hf          # newest checkpoint of a run dir
    python -m training.export out/stage1/checkpoints/step_200 out/hf
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from model.hf import save_pretrained
from model.vlm import Exaone45


def export_hf(run, out_dir=None) -> Path:
    """Gather the full weights to rank 0 and write a directory transformers loads."""
    out_dir = Path(out_dir or Path(run.cfg.run_dir) / "hf")
    state = run.engine.full_state_dict()
    if run.d.is_main:
        plain = Exaone45(run.module.cfg)
        plain.load_state_dict(state)
        save_pretrained(plain, out_dir)
        print(f"exported Hugging Face checkpoint to {out_dir}", flush=True)
    return out_dir


def export_checkpoint(path: str, out_dir: str) -> Path:
    """Single process: a run or checkpoint directory to a Hugging Face directory."""
    model, _ = load_for_inference(path)
    save_pretrained(model, out_dir)
    return Path(out_dir)


def load_for_inference(path: str, dtype=torch.float32):
    """(model, config) from a Hugging Face directory, a run directory or a checkpoint directory."""
    from model.hf import load_pretrained
    from training.checkpoint import resolve_init_from
    from training.config import model_config

    kind, where = resolve_init_from(path)
    if kind == "hf":
        return load_pretrained(where, dtype=dtype).eval(), None
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import tempfile

    cfg = OmegaConf.load(where.parents[1] / "config.yaml")  # the run's config as it was resolved
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(where / "model"), f"{tmp}/model.pt")
        state = torch.load(f"{tmp}/model.pt", weights_only=False)["model"]
    model = Exaone45(model_config(cfg))
    model.load_state_dict(state)
    return model.to(dtype).eval(), cfg


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(export_checkpoint(sys.argv[1], sys.argv[2]))
