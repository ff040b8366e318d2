"""Attention kernels agree, and packing documents changes nothing about any document."""

import pytest
import torch

from model.attention import MaskSpec, attention
from model.config import preset
from model.vlm import build_model


def _qkv(B=2, Hq=4, Hkv=2, L=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_kernels_match_eager(impl, window):
    q, k, v = _qkv()
    cu = torch.tensor([0, 13, 40, 41, 80], dtype=torch.int32)  # a 1-token document and a row boundary
    spec = MaskSpec.packed(cu, 2, 40)
    ref = attention(q, k, v, spec, scale=0.25, window=window, impl="eager")
    out = attention(q, k, v, spec, scale=0.25, window=window, impl=impl)
    assert (out - ref).abs().max() < 1e-5


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
