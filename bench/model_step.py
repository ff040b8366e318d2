"""Forward + backward of our model vs transformers' Exaone4_5_ForConditionalGeneration on the same
config, weights and input (text + one image), as a ratio measured in one run.

    python bench/model_step.py                      # small preset, CPU, fp32, our attn_impl=flash
    python bench/model_step.py --dtype bf16 --attn-impl sdpa
    python bench/model_step.py --preset tiny --seq 1024 --steps 5
    python bench/model_step.py --device cuda --dtype bf16 --fp8 torchao   # on a GPU

Each implementation is timed in its own fresh process (so peak memory is its own: peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU); timings are the median of --steps after one warm-up step.
`--rounds N` alternates the two processes N times and keeps each side's fastest round. The last column is the
same ratio in process CPU time (with OMP_NUM_THREADS=1, the time a process waits for a core on a
shared machine is left out).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.sides import best_of_rounds, ratio_row  # noqa: E402


def make_inputs(cfg, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 16, 16]])  # a 224x224 image: 256 patches, 64 tokens
    n_img = 64
    text = seq - n_img - 2
    ids = torch.randint(100, cfg.text_config.vocab_size, (1, seq), generator=g)
    ids[0, text // 2] = cfg.vision_start_token_id
    ids[0, text // 2 + 1 : text // 2 + 1 + n_img] = cfg.image_token_id
    ids[0, text // 2 + 1 + n_img] = cfg.vision_end_token_id
    pixels = torch.randn(256, 3 * 2 * 14 * 14, generator=g)
    return ids, pixels, grid


def worker(impl: str, preset_name: str, seq: int, steps: int, device: str, dtype: str, fp8: str, attn_impl: str) -> dict:
    from model.config import preset
    from model.fp8 import apply_fp8
    from model.hf import config_to_hf
    from model.vlm import build_model

    torch.manual_seed(0)
    cfg = preset(preset_name, attn_impl=attn_impl)
    cfg.mtp_loss_weight = 0.0  # transformers has no MTP: compare the same network
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ids, pixels, grid = make_inputs(cfg, seq)
    ids, pixels, grid = ids.to(device), pixels.to(device, dt), grid.to(device)
    if impl == "ours":
        model = build_model(cfg, device=device, dtype=dt)
        apply_fp8(model, fp8, cfg.fp8_modules)
        step = lambda: model(ids, pixels, grid, labels=ids).loss  # noqa: E731
    else:
        from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

        model = Exaone4_5_ForConditionalGeneration(Exaone4_5_Config(**config_to_hf(cfg)))
        model.config._attn_implementation = "sdpa"
        model = model.to(device, dt)
        step = lambda: model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=ids).loss  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, cpu_times = [], []
    for i in range(steps + 1):
        sync()
        t, c = time.perf_counter(), time.process_time()
        step().backward()
        sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "tokens_per_s": seq / statistics.median(times[1:]),
            "cpu_tokens_per_s": seq / statistics.median(cpu_times[1:]), "peak_gib": peak / 1024**3}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attn-impl", default="flash", help="our model.attn_impl (transformers runs sdpa)")
    p.add_argument("--fp8", default="none")
    p.add_argument("--rounds", type=int, default=1,
                   help="run ours / transformers alternately this many times and keep each side's fastest round "
                        "(on a machine shared with other jobs, the round least disturbed)")
    p.add_argument("--worker", default=None)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.preset, a.seq, a.steps, a.device, a.dtype, a.fp8, a.attn_impl)))
        return
    rows = best_of_rounds(__file__, ("ours", "transformers"), a.rounds)
    print(ratio_row(f"{a.preset} | {a.device} {a.dtype} fp8={a.fp8} attn={a.attn_impl} | seq {a.seq}",
                    ("ours", "transformers"), rows["ours"], rows["transformers"]))


if __name__ == "__main__":
    main()
