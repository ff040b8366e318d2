"""FP8 on the real model and real data: the tiny model trained on the demo corpus with FP8 decoder
MLPs (the emulated path, the numerical reference; tests/model/test_fp8.py checks torchao against it)
ends as close to the fp32 run's held-out loss as a change of seed would move it.

The bound is a noise floor measured in the same test, in a set-up chosen to be stable: micro-batch 2
x 256 tokens at lr 1e-3 for 80 steps. There a change of reduction order (fp32 on 2 threads instead of
1) moves the held-out loss by ~1e-5 relative, so the numbers do not depend on the CPU's kernels; the
earlier set-up (micro-batch 1 at lr 2e-3, 100 steps) was chaotic: an Intel Xeon ended 3.4% away from
fp32 where an AMD EPYC ended 0.7% away.

Measured on an Intel Xeon (AMX): fp32 seeds 0 / 1 end at 4.6180 / 4.6499 (the seed floor, 0.032);
FP8 is +0.0208 / +0.0188 from them (0.65x the floor); 2 threads moved fp32 by 5e-5.
"""

import pytest
import torch

from model.config import preset
from model.fp8 import apply_fp8
from model.vlm import build_model

STEPS, MICRO_BATCH, LR = 80, 2, 1e-3


@pytest.fixture(scope="module")
def demo_batches(demo_corpus, demo_tokenizer):
    from data.mixture import build_loader, to_data_config

    cfg = to_data_config({"root": str(demo_corpus), "num_workers": 0, "seq_len": 256})
    train = build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=MICRO_BATCH,
                         seq_len=256)
    held = build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=2, seq_len=256,
                        split="heldout")
    return [b for _, b in zip(range(STEPS), train)], [b for _, b in zip(range(12), held)]


def _train(mode: str, batches, heldout, seed: int = 0, threads: int = 1) -> float:
    """Held-out next-token loss after STEPS AdamW steps from the seeded initialization."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        cfg = preset("tiny")
        model = build_model(cfg)
        converted = apply_fp8(model, mode, cfg.fp8_modules)
        assert (mode == "none") == (not converted)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for b in batches:
            out = model(b.input_ids, b.pixel_values, b.image_grid_thw, labels=b.labels, position_ids=b.position_ids,
                        cu_seqlens=b.cu_seqlens)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            sums = [model(b.input_ids, b.pixel_values, b.image_grid_thw, labels=b.labels, position_ids=b.position_ids,
                          cu_seqlens=b.cu_seqlens) for b in heldout]
        return sum(o.lm_loss_sum.item() for o in sums) / sum(o.lm_tokens for o in sums)
    finally:
        torch.set_num_threads(saved)


def test_fp8_moves_the_loss_less_than_a_change_of_seed(demo_batches):
    """The four single-thread runs go two at a time to 2 spawned processes (one per core; each run
    is the same computation as in this process: one thread, the same seed), then the 2-thread one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    batches, heldout = demo_batches
    runs = [("none", 0), ("none", 1), ("emulated", 0), ("emulated", 1)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        fp32_0, fp32_1, fp8_0, fp8_1 = pool.map(_train, *zip(*[(m, batches, heldout, s) for m, s in runs]))
    fp32, fp8 = [fp32_0, fp32_1], [fp8_0, fp8_1]
    reordered = _train("none", batches, heldout, seed=0, threads=2)
    seed_floor = abs(fp32[0] - fp32[1])
    print(f"fp32 {fp32}, fp8 {fp8}, fp32 on 2 threads {reordered:.5f}; seed floor {seed_floor:.4f}")
    initial = 8.3  # ~ln(4096): the untrained loss, so the check is on a model that learned
    assert max(fp32) < initial - 3.0
    # the set-up is stable on this CPU: the comparison below is not a coin toss of a chaotic trajectory
    assert abs(reordered - fp32[0]) < seed_floor / 20, (reordered, fp32[0], seed_floor)
    assert max(abs(a - b) for a, b in zip(fp8, fp32)) < seed_floor, (fp8, fp32)
