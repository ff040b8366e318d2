"""Peak memory of one decoder layer's forward + backward against sequence length, per attention
kernel: the flash path (flash-attn on CUDA, the CPU varlen kernel here) should grow linearly, the
dense-mask sdpa path quadratically.

    python bench/attention_memory.py                     # tiny width, bf16, global layer, one document
    python bench/attention_memory.py --doc-len 16384     # documents of 16K tokens (compute linear too)
    python bench/attention_memory.py --layer sliding --window 4096

The layer is a global (full-attention) decoder layer of the preset over one document (the worst
case: every query attends to every earlier token, so compute grows as L^2 while flash's memory should
grow as L), or documents of --doc-len tokens; `--layer sliding` takes a sliding-window layer with
window --window. sdpa runs only up to --sdpa-max tokens (its dense mask is L^2 whatever the documents).
Each (kernel, length) runs in a fresh process with all cores. Method as in
bench/context_parallel.py: right before the step the process resets its resident-memory high-water
mark (VmHWM via /proc/self/clear_refs) and records its resident memory; peak = VmHWM after forward +
backward minus that baseline (which holds the weights, the input and the output gradient; a
512-token step runs first, so one-time initialization is not counted), with
glibc serving allocations above 64 KiB by mmap so that freed tensors leave at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from context_parallel import peak_mib, reset_peak, rss_mib  # noqa: E402  (bench/context_parallel.py)

from model.attention import MaskSpec  # noqa: E402
from model.config import FULL, SLIDING, preset  # noqa: E402
from model.layers import text_inv_freq, text_rope  # noqa: E402
from model.text import DecoderLayer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def worker(preset_name: str, layer_type: str, window: int, impl: str, seq: int, doc_len: int, dtype: str) -> dict:
    torch.manual_seed(0)
    tc = preset(preset_name).text_config
    tc.sliding_window = window
    layer = DecoderLayer(tc, FULL if layer_type == "global" else SLIDING, 0).to(DTYPES[dtype])
    layer.self_attn.attn_impl = impl
    inv_freq = text_inv_freq(tc.rope_parameters, tc.head_dim, "cpu")

    def inputs(n):
        x = torch.randn(1, n, tc.hidden_size, dtype=DTYPES[dtype], requires_grad=True)
        doc = min(doc_len or n, n)
        cu = torch.tensor([*range(0, n, doc), n], dtype=torch.int32)
        rope = text_rope((torch.arange(n) % doc)[None], inv_freq, x.dtype)
        return x, torch.randn_like(x), rope, MaskSpec.packed(cu, 1, n, max_seqlen=doc)

    x, grad, rope, spec = inputs(512)
    layer(x, rope, spec).backward(grad)  # one-time initialization (thread pools, kernels) stays out of the peak
    layer.zero_grad(set_to_none=True)
    x, grad, rope, spec = inputs(seq)
    reset_peak()
    base = rss_mib()
    start = time.perf_counter()
    layer(x, rope, spec).backward(grad)
    seconds = time.perf_counter() - start
    return {"impl": impl, "seq": seq, "peak_mib": peak_mib() - base, "seconds": seconds}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layer", default="global", choices=["global", "sliding"])
    p.add_argument("--window", type=int, default=4096, help="sliding window of --layer sliding")
    p.add_argument("--doc-len", type=int, default=0, help="tokens per document (0: one document)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--impls", nargs="+", default=["flash", "sdpa"])
    p.add_argument("--sdpa-max", type=int, default=32768, help="longest sequence run with sdpa (its masks are L^2)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.preset, a.layer, a.window, a.worker[0], int(a.worker[1]), a.doc_len, a.dtype)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    layer = f"{a.layer} layer" + (f" (window {a.window})" if a.layer == "sliding" else "")
    docs = f"documents of {a.doc_len}" if a.doc_len else "one document"
    print(f"| {a.preset} {layer}, {a.dtype}, {docs} | tokens | peak MiB | MiB per 1K tokens | seconds |")
    print("|---|---|---|---|---|")
    for impl in a.impls:
        for seq in a.seqs:
            if impl != "flash" and seq > a.sdpa_max:
                continue
            args = [sys.executable, __file__, "--preset", a.preset, "--layer", a.layer, "--window", str(a.window),
                    "--doc-len", str(a.doc_len), "--dtype", a.dtype, "--worker", impl, str(seq)]
            out = subprocess.run(args, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"| {impl} | {seq} | failed (exit {out.returncode}) | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {impl} | {seq} | {r['peak_mib']:.0f} | {r['peak_mib'] / seq * 1024:.1f} | {r['seconds']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
