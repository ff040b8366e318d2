"""Parameter counts and a per-GPU memory estimate for a layout, without allocating the model:

    python launch/pretrain.py +recipe=stage1 dry_run=true
    python -m training.memory model=exaone4_5_33b seq_len=262144 parallel.cp=8 parallel.dp=8 attn_impl=flash

Estimate, per rank, in parts (bench/memory_model.py checks them against one measured CPU step):
- parameters, gradients, optimizer: fp32 master weights 4, fp32 gradients 4 and AdamW moments 8
  bytes per parameter, sharded over dp x cp ranks (FSDP2/ZeRO-3).
- gathered_layer_bf16: the bf16 compute copy of the two largest decoder layers FSDP2 holds
  gathered (the current one and the prefetched one).
- activations, `activation_bytes` per element (2: bf16 compute; 4: fp32) over the rank's
  seq/cp x micro_batch tokens. Counted with autograd's saved-tensor hooks, one decoder layer saves
  6 x hidden + 4 x (query width) + 4 x (key/value width) + 4 x intermediate elements per token for
  backward (layer input; q/k/v projections and their QK-norms; attention output; the two
  post-norms' inputs and outputs; MLP gate, up, activation and product); outside the layers the
  final norm and loss input keep 3 x hidden, the MTP module's input norms, concatenation, norm and
  loss input 9 x hidden more. Without activation checkpointing every layer
  keeps its set; with it (training.distributed.apply_activation_checkpointing: decoder layers and
  vision blocks, not the MTP layers) the trunk keeps only its layer inputs (hidden per token per
  layer), the MTP layers keep their whole sets, and backward recomputes one trunk layer at a time.
  Parts are summed, so without MTP the recomputed layer and the loss are counted as if at once.
  Not modelled: the vision tower (its images, not seq_len, set its size) and the keys/values that
  context parallelism all-gathers for global layers.
- attention_masks: the dense masks of non-flash kernels (attn_impl sdpa, eager, flex; flash needs
  none). Each forward caches one boolean [rows x keys] mask per attention type (sliding, global), 1
  byte per element; sdpa converts it to a float copy (activation_bytes per element) on every call
  and saves that copy for backward, so every layer that keeps its set keeps one. Rows x keys: seq x
  seq at cp=1 and under Ulysses (each rank attends over the whole sequence); with the all-gather
  implementation seq/cp x seq for global layers and seq/cp x (seq/(2cp) + window) for sliding ones.
  These grow with seq^2 and dominate long contexts: use flash (or flex) there. eager also
  materializes [heads x rows x keys] scores, which this does not model.
- loss_chunk: the chunked LM-head loss (model.vlm.chunked_cross_entropy, fp32 whatever the compute
  dtype): its backward holds three fp32 copies of a chunk's [min(chunk, tokens) x vocab] logits
  (recomputed logits, log-softmax, their gradient) and the LM head's whole fp32 weight gradient.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from model.config import FULL, SLIDING, preset
from model.vlm import Exaone45

GIB = 1024**3


def parameter_counts(cfg) -> Counter:
    with torch.device("meta"):
        model = Exaone45(cfg)
    counts = Counter()
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        key = "merger" if name.startswith("visual.merger") else ("vision" if top == "visual" else top)
        counts[key] += p.numel()
    return counts


def mask_elements(tc, seq_len: int, cp: int, cp_impl: str = "allgather") -> dict:
    """Elements of one sequence's dense mask per attention type, on one rank: {layer type: rows x keys}."""
    sliding = tc.sliding_window is not None
    if cp == 1 or cp_impl == "ulysses":
        sizes = {FULL: seq_len * seq_len, SLIDING: seq_len * seq_len}
    else:
        rows = seq_len // cp
        sizes = {FULL: rows * seq_len, SLIDING: rows * (seq_len // (2 * cp) + (tc.sliding_window or 0))}
    return {t: sizes[t if sliding else FULL] for t in set(tc.layer_types)}


def estimate(cfg, seq_len: int, dp: int, cp: int, micro_batch: int = 1, activation_checkpointing: bool = True,
             activation_bytes: int = 2, cp_impl: str = "allgather") -> dict:
    """GiB per rank, by part (see the module docstring); `total` is their sum."""
    counts = parameter_counts(cfg)
    n = sum(counts.values())
    shards = dp * cp
    tc = cfg.text_config
    h, i = tc.hidden_size, tc.intermediate_size
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    layer_params = 2 * h * q + 2 * h * kv + 3 * h * i
    tokens = seq_len // cp * micro_batch
    trunk, mtp = tc.num_hidden_layers, tc.num_nextn_predict_layers
    per_layer = 6 * h + 4 * q + 4 * kv + 4 * i
    outside = 3 * h + (9 * h if mtp else 0)
    masks = mask_elements(tc, seq_len, cp, cp_impl)
    if activation_checkpointing:
        acts = tokens * (trunk * h + max(mtp, 1) * per_layer + outside)
        float_masks = max(mtp, 1) * max(masks.values())
    else:
        acts = tokens * ((trunk + mtp) * per_layer + outside)
        float_masks = sum(masks[t] for t in tc.layer_types)
    mask_bytes = 0
    if cfg.attn_impl in ("sdpa", "eager", "flex"):
        mask_bytes = sum(masks.values()) * micro_batch
    if cfg.attn_impl == "sdpa":
        mask_bytes += float_masks * micro_batch * activation_bytes
    chunk = min(cfg.loss_chunk_size, tokens)
    out = {
        "parameters": n / shards * 4 / GIB,
        "gradients": n / shards * 4 / GIB,
        "optimizer": n / shards * 8 / GIB,
        "gathered_layer_bf16": 2 * layer_params * 2 / GIB,
        "activations": acts * activation_bytes / GIB,
        "attention_masks": mask_bytes / GIB,
        "loss_chunk": (3 * chunk * tc.vocab_size + tc.vocab_size * h) * 4 / GIB,
    }
    out["total"] = sum(out.values())
    return out


def report(cfg, seq_len: int, dp: int, cp: int, micro_batch: int = 1, activation_checkpointing: bool = True,
           activation_bytes: int = 2, cp_impl: str = "allgather") -> str:
    lines = ["parameters per module:"]
    counts = parameter_counts(cfg)
    for k, v in counts.items():
        lines.append(f"  {k:<16} {v / 1e9:8.3f} B")
    lines.append(f"  {'total':<16} {sum(counts.values()) / 1e9:8.3f} B")
    lines.append(f"per-GPU memory estimate (GiB), seq_len={seq_len}, dp={dp}, cp={cp}, micro_batch={micro_batch}, "
                 f"activation_checkpointing={activation_checkpointing}, activation_bytes={activation_bytes}, "
                 f"attn_impl={cfg.attn_impl}" + (f", cp_impl={cp_impl}" if cp > 1 else "") + ":")
    for k, v in estimate(cfg, seq_len, dp, cp, micro_batch, activation_checkpointing, activation_bytes, cp_impl).items():
        lines.append(f"  {k:<20} {v:8.2f}")
    return "\n".join(lines)


def dry_run(cfg) -> None:
    from training.trainer import model_config

    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    dp = max(1, world // cfg.parallel.cp)
    print(report(model_config(cfg), cfg.data.seq_len, dp, cfg.parallel.cp, cfg.train.micro_batch_size,
                 cfg.train.activation_checkpointing, 2 if cfg.train.dtype == "bf16" else 4, cfg.parallel.cp_impl), flush=True)


def main(argv: list[str]) -> None:
    """key=value arguments: model, seq_len, parallel.dp, parallel.cp, parallel.cp_impl, micro_batch,
    activation_checkpointing (true|false), dtype (bf16|fp32: the activations), attn_impl."""
    args = dict(a.split("=", 1) for a in argv)
    cfg = preset(args.get("model", "exaone4_5_33b"), **{k: args[k] for k in ("attn_impl",) if k in args})
    print(report(cfg, int(args.get("seq_len", 8192)), int(args.get("parallel.dp", 1)), int(args.get("parallel.cp", 1)),
                 int(args.get("micro_batch", 1)), args.get("activation_checkpointing", "true") == "true",
                 {"bf16": 2, "fp32": 4}[args.get("dtype", "bf16")], args.get("parallel.cp_impl", "allgather")))


if __name__ == "__main__":
    main(sys.argv[1:])
