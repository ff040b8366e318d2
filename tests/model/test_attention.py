"""Attention kernels agree, the flash and flex paths build nothing [L, L], and packing documents
changes nothing about any document."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import MaskSpec, attention, cpu_varlen_attention
from model.config import preset
from model.vlm import build_model


def _qkv(B=2, Hq=4, Hkv=2, L=40, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=dtype) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("impl", ["sdpa", "flex", "flash"])
def test_kernels_match_eager(impl, window):
    q, k, v = _qkv()
    cu = torch.tensor([0, 13, 40, 41, 80], dtype=torch.int32)  # a 1-token document and a row boundary
    spec = MaskSpec.packed(cu, 2, 40)
    ref = attention(q, k, v, spec, scale=0.25, window=window, impl="eager")
    out = attention(q, k, v, spec, scale=0.25, window=window, impl=impl)
    assert (out - ref).abs().max() < 1e-5


def _flash_reference(q, k, v, cu_q, cu_k, scale, causal, window_size):
    """flash-attn's documented varlen semantics, written out densely per segment (eager, fp64)."""
    left, right = window_size
    right = 0 if causal else right
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    for qs, qe, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        lq, lk = qe - qs, ke - ks
        pos = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right alignment
        key = torch.arange(lk)[None, :]
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if right >= 0:
            mask &= key <= pos + right
        if left >= 0:
            mask &= key >= pos - left
        qq = q[qs:qe].transpose(0, 1)
        kk, vv = (t[ks:ke].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
        scores = (qq @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row that sees no key gives 0
        out[qs:qe] = (probs @ vv).transpose(0, 1)
    return out


@pytest.mark.parametrize(
    "causal,window_size", [(True, (-1, -1)), (True, (4, 0)), (False, (-1, -1)), (False, (3, -1)), (False, (2, 5))]
)
def test_cpu_varlen_kernel_matches_flash_semantics(causal, window_size):
    """Packed segments with Lq < Lk, Lq == Lk and Lq > Lk (bottom-right causal alignment: the first
    Lq - Lk queries see nothing), GQA, windows; segments longer than one query block; outputs and
    gradients, against the dense per-segment reference."""
    g = torch.Generator().manual_seed(1)
    q_lens, k_lens = [5, 300, 9, 1, 7, 260], [12, 300, 4, 1, 7, 270]
    cu_q = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(k_lens).cumsum(0).tolist()
    q = torch.randn(cu_q[-1], 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(cu_k[-1], 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = cpu_varlen_attention(
        q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), max(q_lens), max(k_lens),
        softmax_scale=0.3, causal=causal, window_size=window_size,
    )
    ref = _flash_reference(q, k, v, cu_q, cu_k, 0.3, causal, window_size)
    assert (out - ref).abs().max() < 1e-10
    if causal:
        assert out[cu_q[2] : cu_q[2] + 5].abs().max() == 0  # 9 queries on 4 keys: the first 5 see none
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-10


def _chunked_spec(B=2, L=96, chunks=((16, 32), (64, 80)), cu=(0, 10, 40, 70, 96, 150, 192)):
    """Context parallelism's layout: this rank's query chunks (global positions) against all keys."""
    cu = torch.tensor(cu, dtype=torch.int32)
    whole = MaskSpec.packed(cu, B, L)
    idx = torch.cat([torch.arange(a, b) for a, b in chunks])
    return MaskSpec(whole.q_idx[:, idx], whole.k_idx, whole.q_doc[:, idx], whole.k_doc, True)


@pytest.mark.parametrize("window", [None, 5, 30])
def test_flash_segments_of_query_chunks_against_gathered_keys(window):
    """Each chunk's share of a document attends to that document's keys up to the chunk's end, or
    its window (flash's cu_seqlens_q / cu_seqlens_k, keys repeated through k_index)."""
    spec = _chunked_spec()
    q = _qkv(L=32)[0]
    _, k, v = _qkv(L=96, seed=1)
    ref = attention(q, k, v, spec, scale=0.25, window=window, impl="eager")
    out = attention(q, k, v, spec, scale=0.25, window=window, impl="flash")
    assert (out - ref).abs().max() < 1e-5
    plan = spec.varlen(window)
    assert plan.k_index is not None and plan.cu_k[-1] <= 2 * 2 * 96  # O(L) keys in all
    assert int(plan.cu_q[-1]) == 2 * 32 and plan.max_q <= 16


def test_flash_refuses_padded_cache_slots():
    spec = MaskSpec(torch.arange(4)[None], torch.arange(4)[None], torch.zeros(1, 4), torch.zeros(1, 4),
                    k_valid=torch.tensor([[False, True, True, True]]))
    q, k, v = _qkv(B=1, L=4)
    with pytest.raises(RuntimeError, match="KV cache"):
        attention(q, k, v, spec, scale=0.25, impl="flash")


def _blocks(bm):
    """(partial, full) block presence [B, nq, nk] of a BlockMask."""
    def present(num, idx):
        B, _, nq = num.shape
        out = torch.zeros(B, nq, idx.shape[-1], dtype=torch.bool)
        for b in range(B):
            for i in range(nq):
                out[b, i, idx[b, 0, i, : num[b, 0, i]].long()] = True
        return out

    return present(bm.kv_num_blocks, bm.kv_indices), present(bm.full_kv_num_blocks, bm.full_kv_indices)


@pytest.mark.parametrize("layout", ["packed", "packed_window", "chunks_window", "cache_slots"])
def test_flex_block_tables_cover_create_block_mask(layout):
    """Eager flex on CPU reads only the mask_mod, so the block tables (what a GPU kernel skips or
    runs unmasked) are checked against create_block_mask's: every full block of ours is full there,
    and every block that has a visible pair there is listed by ours."""
    from torch.nn.attention.flex_attention import create_block_mask

    window = None
    if layout.startswith("packed"):
        spec = MaskSpec.packed(torch.tensor([0, 300, 330, 500, 700, 1000], dtype=torch.int32), 2, 500)
        window = 300 if layout == "packed_window" else None
    elif layout == "chunks_window":
        spec, window = _chunked_spec(L=640, chunks=((128, 256), (384, 512)), cu=(0, 100, 500, 640, 1280)), 300
    else:
        valid = torch.ones(1, 512, dtype=torch.bool)
        valid[0, :130] = False  # a left-padded prompt's slots
        spec = MaskSpec(torch.arange(384, 512)[None], torch.arange(512)[None], torch.zeros(1, 128, dtype=torch.long),
                        torch.zeros(1, 512, dtype=torch.long), k_valid=valid)
    ours = spec.block_mask(window)
    B, Lq, Lk = spec.q_idx.shape[0], spec.q_idx.shape[1], spec.k_idx.shape[1]
    theirs = create_block_mask(ours.mask_mod, B, None, Lq, Lk, device="cpu")
    (p_ours, f_ours), (p_theirs, f_theirs) = _blocks(ours), _blocks(theirs)
    assert not (f_ours & ~f_theirs).any()
    assert not ((p_theirs | f_theirs) & ~(p_ours | f_ours)).any()
    assert f_ours.any() and not (p_ours | f_ours).all()  # some blocks run unmasked, some are skipped


class _Allocations(TorchDispatchMode):
    """The largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_length_squared_tensor_on_flash_and_flex_paths():
    """4,096 packed tokens (documents up to 1,300, window 256, GQA): forward and backward of the flash
    path and building the flex block mask allocate nothing of L * L / 16 (a dense mask over the
    longest document would be larger); the spec caches no dense mask."""
    L = 4096
    cu = torch.tensor([0, 1200, 1250, 2550, 3300, 4095, 4096], dtype=torch.int32)
    spec = MaskSpec.packed(cu, 1, L)
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, L=L, D=8))
    seen = _Allocations()
    with seen:
        for window in (None, 256):
            out = attention(q, k, v, spec, scale=0.3, window=window, impl="flash")
            out.sum().backward()
            spec.block_mask(window)
    assert seen.largest < L * L // 16, seen.largest
    assert not any(key[0] == "dense" for key in spec._cache)


def _packed_image_batch(cfg, seed=0):
    """Two rows of 96 tokens: documents (one with an image whose tokens straddle nothing special),
    a prompt without loss, a padding document; one 8x8-patch and one 4x8-patch image."""
    g = torch.Generator().manual_seed(seed)
    vocab, img = cfg.text_config.vocab_size, cfg.image_token_id

    def text(n):
        return torch.randint(80, vocab, (n,), generator=g).tolist()

    rows = [
        [text(20), text(6) + [cfg.vision_start_token_id] + [img] * 16 + [cfg.vision_end_token_id] + text(30), text(22)],
        [text(40), text(3) + [cfg.vision_start_token_id] + [img] * 8 + [cfg.vision_end_token_id] + text(20), [0] * 23],
    ]
    ids, labels, cu = [], [], [0]
    for row in rows:
        for doc in row:
            ids += doc
            labels += [t if t not in (img, 0) else -100 for t in doc]
            cu.append(cu[-1] + len(doc))
    labels[20:25] = [-100] * 5
    grids = torch.tensor([[1, 8, 8], [1, 4, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 1176, generator=g)
    return torch.tensor(ids).view(2, 96), torch.tensor(labels).view(2, 96), torch.tensor(cu, dtype=torch.int32), pixels, grids


def test_model_flash_and_flex_equal_sdpa():
    """The whole model (vision tower by windows and frames, sliding and global layers, MTP) on a
    packed batch: flash's loss and every gradient, and flex's loss (no CPU backward), equal sdpa's."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.text_config.sliding_window = 12
    model = build_model(cfg)
    ids, labels, cu, pixels, grids = _packed_image_batch(cfg)

    def run(impl, grad=True):
        model.set_attn_impl(impl)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            loss = model(ids, pixels, grids, labels=labels, cu_seqlens=cu).loss
        if grad:
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if grad}

    ref_loss, ref_grads = run("sdpa")
    loss, grads = run("flash")
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for name, g in ref_grads.items():
        assert g.norm() > 0, name
        assert (grads[name] - g).norm() <= 1e-5 * g.norm(), name
    flex_loss, _ = run("flex", grad=False)
    assert abs(flex_loss - ref_loss) < 1e-5 * abs(ref_loss)


def test_mask_semantics():
    """Causal, same document, and a window of W covers the token and the W-1 before it."""
    spec = MaskSpec.packed(torch.tensor([0, 5, 12], dtype=torch.int32), 1, 12)
    m = spec.dense(3)[0, 0]
    assert m[7].tolist() == [False] * 5 + [True, True, True] + [False] * 4
    assert m[4].tolist() == [False, False, True, True, True] + [False] * 7
    assert not m[5, 4]  # never across the document boundary


def test_packed_documents_equal_separate_runs():
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.text_config.sliding_window = 6
    model = build_model(cfg).eval()
    docs = [torch.randint(100, 4000, (n,)) for n in (9, 17, 30)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 9, 26, 56], dtype=torch.int32)
    with torch.no_grad():
        logits = model(packed, cu_seqlens=cu).logits[0]
        for doc, start in zip(docs, cu[:-1].tolist()):
            alone = model(doc[None]).logits[0]
            assert (logits[start : start + len(doc)] - alone).abs().max() < 1e-5
