"""Parameter counts and a per-GPU memory estimate for a layout, without allocating the model:

    python launch/pretrain.py +recipe=stage1 dry_run=true
    python -m training.memory model=exaone4_5_33b seq_len=262144 parallel.cp=8 parallel.dp=8

Estimate (bytes per parameter, sharded over dp x cp ranks with FSDP2/ZeRO-3): fp32 master weights 4,
fp32 gradients 4, AdamW moments 8, plus the bf16 compute copy of the largest gathered layer. Activations
per rank with activation checkpointing: the layer inputs (seq/cp x hidden x 2 bytes per layer) plus one
layer's working set recomputed in backward (~ seq/cp x (14 x hidden + 2 x intermediate) x 2 bytes), plus
the chunked loss (chunk x vocab x 4 bytes).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from model.config import preset
from model.vlm import Exaone45


def parameter_counts(cfg) -> Counter:
    with torch.device("meta"):
        model = Exaone45(cfg)
    counts = Counter()
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        key = "merger" if name.startswith("visual.merger") else ("vision" if top == "visual" else top)
        counts[key] += p.numel()
    return counts


def estimate(cfg, seq_len: int, dp: int, cp: int, micro_batch: int = 1, activation_checkpointing: bool = True) -> dict:
    counts = parameter_counts(cfg)
    n = sum(counts.values())
    shards = dp * cp
    tc = cfg.text_config
    layer_params = 4 * tc.hidden_size * tc.head_dim * tc.num_attention_heads + 3 * tc.hidden_size * tc.intermediate_size
    tokens = seq_len // cp * micro_batch
    layers = tc.num_hidden_layers + tc.num_nextn_predict_layers
    per_layer_act = tokens * tc.hidden_size * 2
    working = tokens * (14 * tc.hidden_size + 2 * tc.intermediate_size) * 2
    acts = layers * per_layer_act + working if activation_checkpointing else layers * working
    gib = 1024**3
    out = {
        "parameters": n / shards * 4 / gib,
        "gradients": n / shards * 4 / gib,
        "optimizer": n / shards * 8 / gib,
        "gathered_layer_bf16": 2 * layer_params * 2 / gib,
        "activations": acts / gib,
        "loss_chunk": cfg.loss_chunk_size * tc.vocab_size * 4 * 2 / gib,
    }
    out["total"] = sum(out.values())
    return out


def report(cfg, seq_len: int, dp: int, cp: int, micro_batch: int = 1, activation_checkpointing: bool = True) -> str:
    lines = ["parameters per module:"]
    counts = parameter_counts(cfg)
    for k, v in counts.items():
        lines.append(f"  {k:<16} {v / 1e9:8.3f} B")
    lines.append(f"  {'total':<16} {sum(counts.values()) / 1e9:8.3f} B")
    lines.append(f"per-GPU memory estimate (GiB), seq_len={seq_len}, dp={dp}, cp={cp}, micro_batch={micro_batch}, "
                 f"activation_checkpointing={activation_checkpointing}:")
    for k, v in estimate(cfg, seq_len, dp, cp, micro_batch, activation_checkpointing).items():
        lines.append(f"  {k:<20} {v:8.2f}")
    return "\n".join(lines)


def dry_run(cfg) -> None:
    from training.trainer import model_config

    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    dp = max(1, world // cfg.parallel.cp)
    print(report(model_config(cfg), cfg.data.seq_len, dp, cfg.parallel.cp, cfg.train.micro_batch_size,
                 cfg.train.activation_checkpointing), flush=True)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    cfg = preset(args.get("model", "exaone4_5_33b"))
    print(report(cfg, int(args.get("seq_len", 8192)), int(args.get("parallel.dp", 1)), int(args.get("parallel.cp", 1)),
                 int(args.get("micro_batch", 1)), args.get("activation_checkpointing", "true") == "true"))


if __name__ == "__main__":
    main(sys.argv[1:])
