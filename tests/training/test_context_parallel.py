"""Context parallelism against the unparallel model (sdpa): 2 real processes over gloo, fp32, a packed
batch of several documents with images, sliding and global layers (trunk and MTP), under every
parallel.cp_impl x model.attn_impl a recipe can name (flex: loss only, as torch has no flex backward
on CPU). One spawn runs every case; the tests below read its results."""

import dataclasses
import json
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import preset
from model.vlm import build_model
from training.context_parallel import (
    apply_context_parallel,
    chunk_owner,
    cp_loss,
    local_token_index,
    shard_batch,
)

CP = 2
SEQ = 256
TOL = 1e-5
# name: (cp_impl, attn_impl, text_config overrides, images in the batch)
CASES = {
    "allgather_window16": ("allgather", "sdpa", dict(sliding_window=16), 2),
    "allgather_window100_halo_spans_two_chunks": ("allgather", "sdpa", dict(sliding_window=100), 1),
    "allgather_flash_window16": ("allgather", "flash", dict(sliding_window=16), 2),
    "allgather_flash_window100_halo_spans_two_chunks": ("allgather", "flash", dict(sliding_window=100), 1),
    "allgather_flex_window16": ("allgather", "flex", dict(sliding_window=16), 2),
    "ulysses_window16": ("ulysses", "sdpa", dict(sliding_window=16), 2),
    "ulysses_mqa_kv_heads_replicated": ("ulysses", "sdpa", dict(sliding_window=16, num_key_value_heads=1), 1),
    "ulysses_flash_window16": ("ulysses", "flash", dict(sliding_window=16), 2),
    "ulysses_flex_window16": ("ulysses", "flex", dict(sliding_window=16), 2),
}


def tiny_config(**text):
    cfg = preset("tiny")
    cfg.text_config = dataclasses.replace(cfg.text_config, **text)
    return cfg


def packed_batch(cfg, images: int, seed: int = 0):
    """Two rows of SEQ tokens, several documents each (one of them padding), and 1 or 2 images."""
    g = torch.Generator().manual_seed(seed)
    vocab, img = cfg.text_config.vocab_size, cfg.image_token_id

    def text(n):
        return torch.randint(80, vocab, (n,), generator=g).tolist()

    def image_doc(pre, tokens, post):
        return text(pre) + [cfg.vision_start_token_id] + [img] * tokens + [cfg.vision_end_token_id] + text(post)

    grids = [(1, 8, 8), (1, 4, 8)][:images]
    if images > 1:  # the first image's tokens straddle chunks 0 and 1 (ranks 0 and 1)
        rows = [[text(40), image_doc(20, 16, 40), text(90), text(48)], [text(100), image_doc(30, 8, 20), text(70)]]
    else:  # rank 1 holds no image token and runs no image
        rows = [[image_doc(20, 16, 40), text(40), text(90), text(48)], [text(100), text(60), text(70)]]
    rows[1].append([0] * 26)  # padding document
    ids, labels, positions, cu = [], [], [], [0]
    for row in rows:
        for d, doc in enumerate(row):
            lab = [t if t not in (img, 0) else -100 for t in doc]
            if d == 1:
                lab[:5] = [-100] * 5  # a prompt without loss
            ids += doc
            labels += lab
            positions += list(range(len(doc)))
            cu.append(cu[-1] + len(doc))
    shape = (len(rows), SEQ)
    return types.SimpleNamespace(
        input_ids=torch.tensor(ids).view(shape), labels=torch.tensor(labels).view(shape),
        position_ids=torch.tensor(positions).view(shape), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        pixel_values=torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g),
        image_grid_thw=torch.tensor(grids),
    )


def run_case(impl, attn_impl, text_overrides, images, group):
    cfg = tiny_config(**text_overrides)
    batch = packed_batch(cfg, images)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_attn_impl(attn_impl)
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    backward = attn_impl != "flex"

    with torch.set_grad_enabled(backward):
        ref = reference(batch.input_ids, batch.pixel_values, batch.image_grid_thw, batch.labels,
                        batch.position_ids, batch.cu_seqlens)
        apply_context_parallel(model, group, impl)
        input_ids, shard = shard_batch(model, batch, group)
        out = model(input_ids, shard=shard)
        loss, total = cp_loss(out, group, cfg.mtp_loss_weight)
    result = dict(loss=float(total), ref_loss=ref.loss.item(), loss_rel=abs(float(total) / ref.loss.item() - 1),
                  grad_rel=None, local_tokens=input_ids.shape[1])
    if not backward:
        return result
    ref.loss.backward()
    loss.backward()

    worst, params = 0.0, 0
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        dist.all_reduce(p.grad, group=group)
        assert r.grad is not None and r.grad.norm() > 0, name
        worst = max(worst, float((p.grad - r.grad).norm() / r.grad.norm()))
        params += 1
    return {**result, "grad_rel": worst, "params": params}


def worker(rank, store, results_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=CP)
    group = dist.group.WORLD
    results = {name: run_case(*case, group) for name, case in CASES.items()}

    # Calling a context-parallel model without shard_batch fails clearly.
    model = apply_context_parallel(build_model(tiny_config(sliding_window=16)), group)
    try:
        model(torch.randint(80, 4000, (1, 32)))
        results["unsharded_call_error"] = ""
    except RuntimeError as e:
        results["unsharded_call_error"] = str(e)
    # Ulysses with query heads that do not divide by cp.
    try:
        apply_context_parallel(build_model(tiny_config(num_attention_heads=3, num_key_value_heads=1)), group, "ulysses")
        results["ulysses_heads_error"] = ""
    except ValueError as e:
        results["ulysses_heads_error"] = str(e)

    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    path = tmp / "results.json"
    mp.spawn(worker, args=(str(tmp / "store"), str(path)), nprocs=CP, join=True)
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_unparallel_model(results, case):
    r = results[case]
    assert r["local_tokens"] == SEQ // CP
    assert r["loss_rel"] < TOL, r
    assert r["grad_rel"] is None if CASES[case][1] == "flex" else r["grad_rel"] < TOL, r


def test_clear_errors(results):
    assert "shard_batch" in results["unsharded_call_error"]
    assert "parallel.cp" in results["ulysses_heads_error"]
    with pytest.raises(ValueError, match="data.seq_len"):
        local_token_index(250, CP, 0)


def test_load_balanced_layout():
    cp, length = 4, 64
    held = [local_token_index(length, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(length))
    causal_work = [int((t + 1).sum()) for t in held]  # keys each query attends to under the causal mask
    assert len(set(causal_work)) == 1
    for j in range(2 * cp):
        rank, slot = chunk_owner(j, cp)
        assert held[rank][slot * 8] == j * 8
