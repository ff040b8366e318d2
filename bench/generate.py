"""Generation throughput: the KV cache against recomputing the whole prefix for every new token, and
how GRPO rollouts get whole parameters under FSDP2.

    python bench/generate.py [--model small] [--new-tokens 256] [--batch 1 8] [--repeat 3]
    torchrun --nproc_per_node 2 bench/generate.py --fsdp [--model tiny] [--new-tokens 64] [--batch 32]

Default mode: greedy decoding of `--new-tokens` tokens (no stop token) after a 32-token prompt,
with `model.generate.generate` (KV cache; sliding layers keep only their window) and with a
loop that runs the full model over the prompt and everything generated so far for each token
(logits of the last position only). Both must produce the same tokens. Prints a markdown table for
bench/RESULTS.md and exits non-zero if the cache is under 10x faster at any batch size.

--fsdp: the model sharded with FSDP2 over the ranks; tokens/s of `training.engine.Engine.whole_model`
(all-gather every unit once, generate on a hook-free twin), of generating through the FSDP
module after unsharding it with resharding after forward turned off (FSDP's hooks still run per
layer and token), and of the FSDP module with only its root unit unsharded (every layer all-gathers
for every token), against the plain model on each rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.attention import MaskSpec  # noqa: E402
from model.config import preset  # noqa: E402
from model.generate import generate  # noqa: E402
from model.vlm import build_model  # noqa: E402


@torch.no_grad()
def generate_without_cache(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding that recomputes the whole sequence for every token (equal-length prompts)."""
    ids = torch.tensor(prompts)
    B = ids.shape[0]
    for _ in range(new_tokens):
        L = ids.shape[1]
        positions = torch.arange(L).expand(B, L)
        h = model.embed(ids)
        spec = MaskSpec.packed(torch.arange(0, B * L + 1, L, dtype=torch.int32), B, L)
        hidden = model.language_model(h, model.rope(positions, h.dtype), spec)
        nxt = model.lm_head(hidden[:, -1]).float().argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, len(prompts[0]) :].tolist()


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def prompts_for(batch: int, length: int = 32, vocab: int = 4096) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()


def cache_vs_recompute(args) -> int:
    torch.manual_seed(0)
    model = build_model(preset(args.model)).eval()
    vocab = model.cfg.text_config.vocab_size
    rows, worst = [], float("inf")
    for batch in args.batch:
        prompts = prompts_for(batch, vocab=vocab)
        t_cache, cached = timed(lambda: generate(model, prompts, max_new_tokens=args.new_tokens).tokens, args.repeat)
        t_full, full = timed(lambda: generate_without_cache(model, prompts, args.new_tokens), 1)
        if cached != full:
            raise SystemExit("the cached and the recomputing decoders disagree: the KV cache is wrong")
        tokens = batch * args.new_tokens
        ratio = t_full / t_cache
        worst = min(worst, ratio)
        rows.append(f"| {args.model} | {batch} | {args.new_tokens} | {tokens / t_cache:,.0f} | {tokens / t_full:,.0f} | {ratio:.1f}x |")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | batch | new tokens | KV cache tok/s | recompute tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if worst < 10:
        print(f"\nFAIL: the KV cache is only {worst:.1f}x faster (want >= 10x)")
        return 1
    print(f"\nOK: the KV cache is >= 10x faster at every batch size (worst {worst:.1f}x)")
    return 0


def fsdp_modes(args) -> int:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from training.distributed import init_distributed, shutdown
    from training.engine import Engine
    from training.parallelize import apply_fsdp2

    d = init_distributed()
    torch.manual_seed(0)
    plain = build_model(preset(args.model)).eval()
    prompts = prompts_for(args.batch[0], vocab=plain.cfg.text_config.vocab_size)
    with torch.device("meta"):
        from model.vlm import Exaone45

        sharded = Exaone45(plain.cfg)
    sharded.vision_in_every_step = False
    apply_fsdp2(sharded, d, bf16=False)
    sharded.to_empty(device="cpu")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(sharded, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():  # the first forward through the root makes it FSDP's root
        sharded(torch.zeros(1, 1, dtype=torch.long))
    units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
    n = args.new_tokens

    def run(model):
        dist.barrier()
        return generate(model, prompts, max_new_tokens=n).tokens

    def twin():
        with Engine(None, d, sharded, None).whole_model() as model:
            return run(model)

    def unsharded_hooks():
        sharded.set_reshard_after_forward(False)
        for m in units:
            m.unshard()
        try:
            return run(sharded)
        finally:
            for m in units:
                m.reshard()
            sharded.set_reshard_after_forward(True)
            sharded.set_reshard_after_forward(False, recurse=False)

    def per_token_gathers():
        sharded.unshard()  # the root unit only (embeddings, LM head); every layer all-gathers in its forward
        try:
            return run(sharded)
        finally:
            sharded.reshard()

    results = {}
    for name, fn in [("plain model, one process (reference)", lambda: run(plain)),
                     ("whole_model: gather once, hook-free twin (used)", twin),
                     ("unshard, reshard_after_forward=False, FSDP hooks", unsharded_hooks),
                     ("root unsharded, each layer all-gathers per token", per_token_gathers)]:
        seconds, tokens = timed(fn, args.repeat)
        results[name] = (seconds, tokens)
    reference = results["plain model, one process (reference)"][1]
    if d.is_main:
        print(f"\n{d.world} ranks (gloo), {args.model}, batch {args.batch[0]} per rank, {n} new tokens\n")
        print("| FSDP2 generation | tok/s per rank | same tokens |")
        print("|---|---|---|")
        for name, (seconds, tokens) in results.items():
            print(f"| {name} | {args.batch[0] * n / seconds:,.0f} | {tokens == reference} |")
    shutdown()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    return fsdp_modes(args) if args.fsdp else cache_vs_recompute(args)


if __name__ == "__main__":
    sys.exit(main())
