"""The chunked LM-head loss's forward + backward (model.vlm.chunked_cross_entropy) against the same loss
through autograd with each chunk recomputed under activation checkpointing (log-softmax over the
chunk's logits, as the model did until 2026-12-03), as a ratio measured in one run.

    python bench/loss_step.py                         # 2,048 tokens, hidden 768, vocab 32,768 (small preset), bf16
    python bench/loss_step.py --tokens 8192 --hidden 5120 --vocab 153600 --device cuda   # the 33B's head

Two losses: `summed` (pretraining and SFT: the sum of the per-token losses) and `per-token` (GRPO:
every token's log-prob and entropy weighted by its own number). Median of --steps after a warm-up,
the two implementations alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from model.vlm import chunked_cross_entropy  # noqa: E402


def _recomputed_chunk(h, w, t, scale: float, entropy: bool):
    logits = F.linear(h, w).float() * scale
    log_p = logits.log_softmax(-1)
    loss = -log_p.gather(1, t[:, None]).squeeze(1)
    return loss, (-(log_p.exp() * log_p).sum(-1) if entropy else loss.new_zeros(0))


def recomputing(h, w, t, chunk: int, scale: float, entropy: bool):
    parts = [checkpoint(_recomputed_chunk, h[i : i + chunk], w, t[i : i + chunk], scale, entropy, use_reentrant=False)
             for i in range(0, h.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def ours(h, w, t, chunk: int, scale: float, entropy: bool, summed: bool):
    out = chunked_cross_entropy(h[None], w, t[None], chunk, scale, entropy=entropy, summed=summed)
    return (out[3] if summed else out[0]), (out[2] if entropy else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=4096, help="model.loss_chunk_size")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dt)
    w0 = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(args.device, dt)
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(args.device)
    a = torch.randn(args.tokens, generator=g).to(args.device)  # per-token weights (GRPO's advantages)
    b = torch.randn(args.tokens, generator=g).to(args.device) * 0.01  # and entropy bonus
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step(fn, summed: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        sync()
        start = time.perf_counter()
        if summed:
            loss, _ = fn(h, w, t, args.chunk, 1.0, False)
            (loss if loss.dim() == 0 else loss.sum()).backward()
        else:
            loss, ent = fn(h, w, t, args.chunk, 0.9, True)
            ((a * loss).sum() + (b * ent).sum()).backward()
        sync()
        return time.perf_counter() - start

    print(f"{args.tokens} tokens x {args.vocab} vocab, hidden {args.hidden}, chunk {args.chunk}, {args.dtype}, "
          f"{args.device}; median of {args.steps} after a warm-up")
    print("| loss | ours | recomputed in backward | speed-up |\n|---|---|---|---|")
    for summed, name in ((True, "summed (pretraining, SFT)"), (False, "per-token + entropy (GRPO)")):
        mine = lambda h, w, t, c, s, e, summed=summed: ours(h, w, t, c, s, e, summed)  # noqa: E731
        times = {"ours": [], "ref": []}
        for i in range(args.steps + 1):
            for key, fn in (("ours", mine), ("ref", recomputing)):
                took = step(fn, summed)
                if i:
                    times[key].append(took)
        o, r = statistics.median(times["ours"]), statistics.median(times["ref"])
        print(f"| {name} | {o:.3f} s | {r:.3f} s | x{r / o:.2f} |")


if __name__ == "__main__":
    main()
