"""Parameter counts and a per-GPU memory estimate for a layout, without allocating the model:

    WORLD_SIZE=128 python launch/pretrain.py +recipe=stage1 dry_run=true    # every launcher has dry_run
    python -m training.memory model=exaone4_5_33b seq_len=262144 parallel.cp=8 parallel.dp=8 attn_impl=flash

`dry_run` prints the layout and the estimate of every stage (every SFT stage; GRPO's training and
decoding phases) and, as its LAST line, one JSON object: recipe, world_size, dp, cp, engine, dtype,
activation_checkpointing, attn_impl, compile, per_gpu_gib (the largest stage or phase).

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
- vision: the vision tower's activations for `vision_patches` patches on the rank (dry runs count
  the worst case, every token of the rank's rows an image token: 4 patches each), the same per-block
  count with the vision tower's widths, checkpointed like the decoder.
- cp_kv: context parallelism's gathered keys/values. allgather: a global layer holds the whole
  sequence's K and V (and their gradient in backward), kept per global layer without activation
  checkpointing, one layer's worth with it; Ulysses: the whole sequence's q, k, v for heads / cp.
- GRPO (`grpo_phases`): the training phase is one micro-batch of `train.micro_batch_size` sequences
  of max_prompt_tokens + max_new_tokens packed tokens; the decoding phase holds the training state
  (parameters and optimizer shards; gradients are freed), the KL reference's shards, and the rollout
  engine: natively the gathered whole model in the compute dtype plus the KV cache of
  `rl.generation_batch_size` sequences (sliding layers keep their window) and the prefill's
  transients; with vLLM (colocated) its tensor-parallel share of the weights and of that KV cache.
- attention_masks: the dense masks of non-flash kernels (attn_impl sdpa, eager, flex; flash needs
  none). Each forward caches one boolean [rows x keys] mask per attention type (sliding, global), 1
  byte per element; sdpa converts it to a float copy (activation_bytes per element) on every call
  and saves that copy for backward, so every layer that keeps its set keeps one. Rows x keys: seq x
  seq at cp=1 and under Ulysses (each rank attends over the whole sequence); with the all-gather
  implementation seq/cp x seq for global layers and seq/cp x (seq/(2cp) + window) for sliding ones.
  These grow with seq^2 and dominate long contexts: use flash (or flex) there. eager also
  materializes [heads x rows x keys] scores, which this does not model.
- loss_chunk: the chunked LM-head loss (model.vlm.chunked_cross_entropy). Pretraining and SFT
  (`summed`): each chunk's [min(chunk, tokens) x vocab] logits once in fp32 (softmax and its
  gradient made in place) next to one compute-dtype copy (the matmul's output, then the gradient
  cast for the two matmuls; none in fp32), and per loss (next token, MTP when weighted) the LM
  head's weight gradient and the hidden states' gradient in the compute dtype, made in the forward
  and held until the backward.
  GRPO's training phase (`per_token_loss`: per-token log-probs, each chunk's logits recomputed in
  backward from its saved log-sum-exp): that chunk once in fp32 (twice with the entropy bonus, whose
  gradient needs log p beside p) next to one compute-dtype copy, the LM head's weight gradient and
  the hidden states' gradient in the compute dtype. The logged entropy (every step, made in the first
  epoch's forward) runs on half-chunks, two fp32 buffers each: one chunk's worth.
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
             activation_bytes: int = 2, cp_impl: str = "allgather", *, engine: str = "fsdp2", zero_stage: int = 3,
             vision_patches: int = 0, per_token_loss: bool = False, entropy: bool = False) -> dict:
    """GiB per rank, by part (see the module docstring); `total` is their sum. DeepSpeed ZeRO-1/2
    keep a whole fp32 replica of the parameters on every rank (ZeRO-1 of the gradients too)."""
    counts = parameter_counts(cfg)
    n = sum(counts.values())
    shards = dp * cp
    sharded = engine == "fsdp2" or zero_stage == 3
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
    if cfg.attn_impl in ("sdpa", "eager"):
        mask_bytes = sum(masks.values()) * micro_batch
    if cfg.attn_impl == "sdpa":
        mask_bytes += float_masks * micro_batch * activation_bytes
    chunk = min(cfg.loss_chunk_size, tokens)
    out = {
        "parameters": n / (shards if sharded else 1) * 4 / GIB,
        "gradients": n / (shards if sharded or zero_stage == 2 else 1) * 4 / GIB,
        "optimizer": n / shards * 8 / GIB,
        "gathered_layer_bf16": 2 * layer_params * 2 / GIB if sharded else 0.0,
        "activations": acts * activation_bytes / GIB,
        "vision": vision_activation_elements(cfg.vision_config, vision_patches, activation_checkpointing) * activation_bytes / GIB,
        "cp_kv": cp_kv_elements(tc, seq_len, cp, cp_impl, activation_checkpointing) * micro_batch * activation_bytes / GIB,
        "attention_masks": mask_bytes / GIB,
        "loss_chunk": loss_chunk_bytes(cfg, tokens, chunk, activation_bytes, per_token_loss, entropy) / GIB,
    }
    out["total"] = sum(out.values())
    return out


def loss_chunk_bytes(cfg, tokens: int, chunk: int, activation_bytes: int, per_token_loss: bool = False,
                     entropy: bool = False) -> int:
    """The chunked LM-head loss's peak (see the module docstring)."""
    tc = cfg.text_config
    vocab, h = tc.vocab_size, tc.hidden_size
    copy = activation_bytes if activation_bytes != 4 else 0
    heads = 2 if tc.num_nextn_predict_layers and cfg.mtp_loss_weight > 0 else 1  # next token, MTP
    fp32_copies = 2 if per_token_loss and entropy else 1
    # each loss's weight gradient and hidden-state gradient (the summed path holds both from its forward)
    return chunk * vocab * (4 * fp32_copies + copy) + heads * (vocab + tokens) * h * activation_bytes


def vision_activation_elements(vc, patches: int, activation_checkpointing: bool) -> int:
    """Elements the vision tower saves for backward over `patches` patches (the decoder's per-block
    count with the tower's widths; the merger keeps its 4x-wide input and hidden, a quarter as many rows)."""
    if patches == 0:
        return 0
    h, i = vc.hidden_size, vc.intermediate_size
    q, kv = vc.num_heads * vc.head_dim, vc.num_key_value_heads * vc.head_dim
    per_block = 6 * h + 4 * q + 4 * kv + 4 * i
    blocks = vc.depth * h + per_block if activation_checkpointing else vc.depth * per_block
    merger = 3 * 4 * h // 4  # per patch: [patches / 4, 4h] input, hidden, activation
    return patches * (blocks + merger)


def cp_kv_elements(tc, seq_len: int, cp: int, cp_impl: str, activation_checkpointing: bool) -> int:
    """Context parallelism's extra key/value (and Ulysses' query) elements on one rank (see the docstring)."""
    if cp == 1:
        return 0
    kv = tc.num_key_value_heads * tc.head_dim
    if cp_impl == "ulysses":  # the whole sequence of heads / cp, q, k and v (KV heads replicated up to cp)
        per_layer = seq_len * (tc.num_attention_heads * tc.head_dim // cp + 2 * max(kv // cp, tc.head_dim))
        return 2 * per_layer * (1 if activation_checkpointing else len(tc.layer_types))
    global_layers = sum(t == FULL for t in tc.layer_types) if tc.sliding_window is not None else len(tc.layer_types)
    per_layer = 2 * seq_len * kv * 2  # K and V of the whole sequence, and their gradient
    return per_layer * (1 if activation_checkpointing else global_layers)


def kv_cache_bytes(tc, sequences: int, length: int, dtype_bytes: int) -> float:
    """Our KV cache (model/text.py) for `sequences` of `length` tokens: global layers keep every
    token, sliding layers their window - 1."""
    kv = tc.num_key_value_heads * tc.head_dim
    slots = sum(min(length, tc.sliding_window - 1) if t == SLIDING and tc.sliding_window else length for t in tc.layer_types)
    return 2 * kv * slots * sequences * dtype_bytes


def grpo_phases(cfg, mcfg, dp: int) -> dict[str, dict]:
    """GRPO's training phase and decoding phase, GiB per rank by part (see the module docstring)."""
    rl, tc = cfg.rl, mcfg.text_config
    compute = 2 if cfg.train.dtype == "bf16" else 4
    length = rl.max_prompt_tokens + rl.max_new_tokens
    train = estimate(mcfg, length, dp, 1, cfg.train.micro_batch_size, cfg.train.activation_checkpointing, compute,
                     engine=cfg.parallel.engine, zero_stage=cfg.parallel.zero_stage,
                     vision_patches=4 * rl.max_prompt_tokens * cfg.train.micro_batch_size, per_token_loss=True,
                     entropy=rl.entropy_coef > 0)
    n = sum(parameter_counts(mcfg).values())
    reference = n / dp * 4 / GIB if rl.kl_coef > 0 else 0.0
    train["kl_reference"] = reference
    train["total"] += reference
    decode = {"parameters": train["parameters"], "optimizer": train["optimizer"], "kl_reference": reference}
    batch = rl.generation_batch_size
    cache = kv_cache_bytes(tc, batch, length, compute) / GIB
    if rl.rollout_engine == "vllm":
        tp = rl.vllm.tensor_parallel_size
        decode["vllm_weights"] = n * 2 / tp / GIB
        decode["vllm_kv_cache"] = cache / tp
    else:
        decode["gathered_model"] = n * compute / GIB
        decode["kv_cache"] = cache
        prefill = batch * rl.max_prompt_tokens
        decode["prefill"] = (prefill * (tc.hidden_size * 3 + 2 * tc.intermediate_size) * compute
                             + batch * rl.max_prompt_tokens ** 2 * (1 + compute)  # sdpa's dense prefill mask
                             + 2 * batch * tc.vocab_size * 4) / GIB  # last-position logits, fp32
    decode["total"] = sum(decode.values())
    return {"training": train, "decoding": decode}


def estimate_config(cfg, mcfg, world_size: int) -> dict:
    """The estimate of a resolved run config at `world_size` ranks: {"total": the largest stage or
    phase, "parameters_b", "phases": {name: parts}}."""
    cp = cfg.parallel.cp
    dp = max(1, world_size // cp)
    if cfg.stage == "grpo":
        phases = grpo_phases(cfg, mcfg, dp)
    else:
        tokens = cfg.data.seq_len // cp * cfg.train.micro_batch_size
        phases = {cfg.stage: estimate(mcfg, cfg.data.seq_len, dp, cp, cfg.train.micro_batch_size,
                                      cfg.train.activation_checkpointing, 2 if cfg.train.dtype == "bf16" else 4,
                                      cfg.parallel.cp_impl, engine=cfg.parallel.engine, zero_stage=cfg.parallel.zero_stage,
                                      vision_patches=4 * tokens)}
    return {"total": max(p["total"] for p in phases.values()), "phases": phases,
            "parameters_b": sum(parameter_counts(mcfg).values()) / 1e9}


def parameter_lines(cfg) -> list[str]:
    counts = parameter_counts(cfg)
    return (["parameters per module:"] + [f"  {k:<16} {v / 1e9:8.3f} B" for k, v in counts.items()]
            + [f"  {'total':<16} {sum(counts.values()) / 1e9:8.3f} B"])


def report(cfg, seq_len: int, dp: int, cp: int, micro_batch: int = 1, activation_checkpointing: bool = True,
           activation_bytes: int = 2, cp_impl: str = "allgather") -> str:
    lines = parameter_lines(cfg)
    lines.append(f"per-GPU memory estimate (GiB), seq_len={seq_len}, dp={dp}, cp={cp}, micro_batch={micro_batch}, "
                 f"activation_checkpointing={activation_checkpointing}, activation_bytes={activation_bytes}, "
                 f"attn_impl={cfg.attn_impl}" + (f", cp_impl={cp_impl}" if cp > 1 else "") + ":")
    for k, v in estimate(cfg, seq_len, dp, cp, micro_batch, activation_checkpointing, activation_bytes, cp_impl).items():
        lines.append(f"  {k:<20} {v:8.2f}")
    return "\n".join(lines)


def dry_run(cfg, stages: list | None = None) -> dict:
    """Print the layout at WORLD_SIZE ranks (default: the recipe's `layout`) and the per-GPU
    estimate of each stage (`stages`: SFT's per-stage configs) or phase; the last line is one JSON
    object, the largest of them (see the module docstring). Returns that object."""
    import json

    from .config import model_config, run_world_size

    world = run_world_size(cfg)
    cp = cfg.parallel.cp
    mcfg = model_config(cfg)
    lines = parameter_lines(mcfg)
    lines.append(f"layout: world_size={world} = dp {world // cp} x cp {cp}, engine={cfg.parallel.engine}"
                 + (f" (ZeRO-{cfg.parallel.zero_stage})" if cfg.parallel.engine == "deepspeed" else "")
                 + f", dtype={cfg.train.dtype}, activation_checkpointing={cfg.train.activation_checkpointing}, "
                 f"attn_impl={mcfg.attn_impl}, compile={cfg.train.compile}, fp8={mcfg.fp8}")
    largest = None
    for stage_cfg in stages or [cfg]:
        est = estimate_config(stage_cfg, model_config(stage_cfg), world)
        for phase, parts in est["phases"].items():
            name = f"{stage_cfg.stage}" + (f" ({phase})" if phase != stage_cfg.stage else "")
            lines.append(f"per-GPU memory estimate (GiB), {name}: seq_len={stage_cfg.data.seq_len}, "
                         f"micro_batch={stage_cfg.train.micro_batch_size}")
            lines += [f"  {k:<20} {v:8.2f}" for k, v in parts.items()]
            if largest is None or parts["total"] > largest[1]:
                largest = (name, parts["total"])
    summary = {"recipe": cfg.recipe, "world_size": world, "dp": world // cp, "cp": cp, "engine": cfg.parallel.engine,
               "dtype": cfg.train.dtype, "activation_checkpointing": cfg.train.activation_checkpointing,
               "attn_impl": mcfg.attn_impl, "compile": cfg.train.compile, "per_gpu_gib": round(largest[1], 2),
               "largest": largest[0], "fits": largest[1] <= cfg.parallel.gpu_memory_gib}
    print("\n".join(lines), flush=True)
    print(json.dumps(summary), flush=True)
    return summary


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
