"""Multi-token prediction: targets t+2, never across documents, loss weighted into the total."""

import torch
import torch.nn.functional as F

from model.config import preset
from model.vlm import build_model, shifted_targets


def test_shifted_targets_respect_documents():
    labels = torch.tensor([[10, 11, 12, 13, 20, 21, 22]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert shifted_targets(labels, doc, 1).tolist() == [[11, 12, 13, -100, 21, 22, -100]]
    assert shifted_targets(labels, doc, 2).tolist() == [[12, 13, -100, -100, 22, -100, -100]]


def test_mtp_loss_matches_manual_computation():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    ids = torch.randint(100, 4000, (1, 24))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    labels = ids.clone()
    labels[0, 3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, cu_seqlens=cu)
        # by hand: embeddings of t+1, trunk hidden at t, one decoder layer, shared head
        hidden = out.hidden_states
        nxt = model.language_model.embed_tokens(torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1))
        from model.attention import MaskSpec

        pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
        h = model.mtp(hidden, nxt, model.rope(pos, hidden.dtype), MaskSpec.packed(cu, 1, 24))
        logits = model.lm_head(h)[0]
    targets = []
    for t in range(24):
        same = (t + 2 < 10) if t < 10 else (t + 2 < 24)
        targets.append(labels[0, t + 2].item() if same else -100)
    targets = torch.tensor(targets)
    expected = F.cross_entropy(logits, targets, ignore_index=-100)
    assert (targets != -100).sum().item() == out.mtp_tokens == 19
    assert abs(out.mtp_loss.item() - expected.item()) < 1e-5
    assert abs(out.loss.item() - (out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss).item()) < 1e-6


def test_chunked_loss_equals_unchunked_with_gradients():
    torch.manual_seed(0)
    cfg = preset("tiny")
    ids = torch.randint(100, 4000, (2, 33))
    grads = []
    for chunk in (7, 100000):
        cfg.loss_chunk_size = chunk
        torch.manual_seed(1)
        model = build_model(cfg)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.item(), model.lm_head.weight.grad.clone()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-6
