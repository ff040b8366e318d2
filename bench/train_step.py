"""A training step of ours (packed sequences, document masks, chunked loss, AdamW) vs transformers'
Exaone4_5_ForConditionalGeneration in a plain loop on the same documents padded into a batch,
as a ratio measured in one run. Throughput counts real (non-padding) tokens only. MTP is off on our
side (transformers has none), so both train the same network.

    python bench/train_step.py                     # small preset, demo corpus, CPU fp32, our attn_impl=flash
    python bench/train_step.py --attn-impl sdpa    # our dense-mask kernel
    python bench/train_step.py --preset tiny --seq 2048 --steps 4
    python bench/train_step.py --device cuda --dtype bf16 --preset small   # on a GPU
    python bench/train_step.py --against eager --steps 6   # train.compile's blocks vs our eager model

Each side runs in its own fresh process (peak RSS on CPU, max_memory_allocated on GPU); `--rounds N`
alternates the two processes N times and keeps each side's fastest round. The last column is the
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


def packed_batches(seq: int, n: int):
    from data.mixture import build_loader, to_data_config

    cfg = to_data_config({"num_workers": 0, "seq_len": seq})
    loader = build_loader(cfg, tokenizer=None, rank=0, world_size=1, seed=0, micro_batch_size=1, seq_len=seq)
    return [b for _, b in zip(range(n), loader)]


def split_documents(batch, image_token_id: int = 67):
    """The packed row back into documents: (ids, labels, pixel rows, grid rows) each."""
    docs, img, row = [], 0, 0
    cu = batch.cu_seqlens.tolist()
    grids = batch.image_grid_thw.tolist() if batch.image_grid_thw is not None else []
    for s, e in zip(cu[:-1], cu[1:]):
        ids = batch.input_ids.view(-1)[s:e]
        if (batch.labels.view(-1)[s:e] == -100).all() and (ids == 0).all():
            continue  # the padding tail
        n_tokens, pix, grid = int((ids == image_token_id).sum()), [], []
        while n_tokens > 0:
            t, h, w = grids[img]
            pix.append(batch.pixel_values[row : row + t * h * w])
            grid.append(grids[img])
            row, img, n_tokens = row + t * h * w, img + 1, n_tokens - t * h * w // 4
        docs.append((ids, batch.labels.view(-1)[s:e], pix, grid))
    return docs


def padded(docs, pad: int = 0):
    L = max(len(d[0]) for d in docs)
    ids = torch.full((len(docs), L), pad)
    labels = torch.full((len(docs), L), -100)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for i, (d, lab, _, _) in enumerate(docs):
        ids[i, : len(d)], labels[i, : len(d)], mask[i, : len(d)] = d, lab, 1
    pix = [p for d in docs for p in d[2]]
    grid = [g for d in docs for g in d[3]]
    return ids, labels, mask, (torch.cat(pix) if pix else None), (torch.tensor(grid) if grid else None)


def worker(impl, preset_name, seq, steps, device, dtype, attn_impl):
    from model.config import preset
    from model.hf import config_to_hf
    from model.vlm import build_model

    torch.manual_seed(0)
    cfg = preset(preset_name, attn_impl=attn_impl)
    cfg.mtp_loss_weight = 0.0  # transformers has no MTP: train the same network
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batches = packed_batches(seq, steps + 1)
    real = [int(b.num_tokens) for b in batches]
    if impl in ("ours", "compiled"):
        model = build_model(cfg, device=device, dtype=dt)
        if impl == "compiled":  # what train.compile does (training/parallelize.py)
            from training.parallelize import apply_compile

            apply_compile(model)

        def step(b):
            b = b.to(device)
            return model(b.input_ids, b.pixel_values.to(dt) if b.pixel_values is not None else None, b.image_grid_thw,
                         labels=b.labels, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens).loss
    else:
        from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

        model = Exaone4_5_ForConditionalGeneration(Exaone4_5_Config(**config_to_hf(cfg)))
        model.config._attn_implementation = "sdpa"
        model = model.to(device, dt)
        inputs = [padded(split_documents(b)) for b in batches]

        def step(i):
            ids, labels, mask, pix, grid = (t.to(device) if t is not None else None for t in inputs[i])
            return model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pix.to(dt) if pix is not None else None,
                         image_grid_thw=grid).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates, cpu_rates = [], []
    for i, b in enumerate(batches):
        sync()
        t, c = time.perf_counter(), time.process_time()
        step(b if impl != "transformers" else i).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:
            rates.append(real[i] / (time.perf_counter() - t))
            cpu_rates.append(real[i] / (time.process_time() - c))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": statistics.median(rates), "cpu_tokens_per_s": statistics.median(cpu_rates),
            "peak_gib": peak / 1024**3}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--attn-impl", default="flash", help="our model.attn_impl (transformers runs sdpa)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run ours / transformers alternately this many times and keep each side's fastest round "
                        "(on a machine shared with other jobs, the round least disturbed)")
    p.add_argument("--against", default="transformers", choices=["transformers", "eager"],
                   help="eager: our model with train.compile's compiled blocks vs the same model eager "
                        "(the median step excludes the first, which compiles; later recompiles are in it)")
    p.add_argument("--worker", default=None)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.preset, a.seq, a.steps, a.device, a.dtype, a.attn_impl)))
        return
    sides = ("ours", "transformers") if a.against == "transformers" else ("compiled", "ours")
    rows = best_of_rounds(__file__, sides, a.rounds)
    layout = f"packed {a.seq}" + (" vs padded" if a.against == "transformers" else "")
    names = ("ours", "transformers") if a.against == "transformers" else ("compiled", "eager")
    print(ratio_row(f"{a.preset} | {a.device} {a.dtype} attn={a.attn_impl} | {layout}", names,
                    rows[sides[0]], rows[sides[1]]))


if __name__ == "__main__":
    main()
