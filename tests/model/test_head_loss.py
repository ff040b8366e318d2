"""The chunked LM-head loss: the summed path (gradients made in the forward, model.vlm._SummedLinearCE)
and the per-token path (RL's: losses and entropies weighted token by token, model.vlm._TokenLinearCE)
equal autograd through the plain log-softmax, and the model's two paths give the same loss and
gradients."""

import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.vlm import build_model, chunked_cross_entropy


def _inputs(seed=0, tokens=33, hidden=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float32)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float32) * 0.5
    t = torch.randint(0, vocab, (1, tokens), generator=g)
    t[0, ::5] = -100  # positions without a label never reach the head
    return h, w, t


@pytest.mark.parametrize("chunk,scale", [(7, 1.0), (7, 0.7), (1000, 1.3)])
def test_summed_loss_and_gradients_equal_autograd(chunk, scale):
    h, w, t = _inputs()
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    valid = t.reshape(-1) != -100
    logits = F.linear(ref_h.reshape(-1, 16)[valid], ref_w) * scale
    ref_losses = F.cross_entropy(logits, t.reshape(-1)[valid], reduction="none")
    (0.37 * ref_losses.sum()).backward()

    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    losses, mask, entropy, total = chunked_cross_entropy(h, w, t, chunk, scale, summed=True)
    assert entropy is None and not losses.requires_grad and torch.equal(mask, valid)
    torch.testing.assert_close(losses, ref_losses.detach(), rtol=1e-6, atol=1e-6)
    (0.37 * total).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # evaluation: the same losses, nothing kept
        no_grad = chunked_cross_entropy(h, w, t, chunk, scale, summed=True)
    torch.testing.assert_close(no_grad[0], losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(no_grad[3], total.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("entropy", [False, "metric", True])
def test_per_token_losses_entropies_and_gradients_equal_autograd(entropy):
    """RL's path (model.vlm._TokenLinearCE): every token's loss and entropy weighted by its own number,
    against autograd through log-softmax over the whole logits; "metric": the entropy is made but left
    out of the loss (GRPO's logged entropy), which changes no gradient."""
    weighted = entropy is True
    h, w, t = _inputs(seed=2)
    valid = t.reshape(-1) != -100
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(int(valid.sum()), generator=g), torch.randn(int(valid.sum()), generator=g)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    log_p = (F.linear(ref_h.reshape(-1, 16)[valid], ref_w) * 0.8).log_softmax(-1)
    ref_losses = -log_p.gather(1, t.reshape(-1)[valid, None]).squeeze(1)
    ref_ent = -(log_p.exp() * log_p).sum(-1)
    ((a * ref_losses).sum() + ((b * ref_ent).sum() if weighted else 0)).backward()

    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    losses, mask, ent, _ = chunked_cross_entropy(h, w, t, 7, 0.8, entropy=bool(entropy))
    assert torch.equal(mask, valid) and (ent is not None) == bool(entropy)
    torch.testing.assert_close(losses, ref_losses.detach(), rtol=1e-6, atol=1e-6)
    if entropy:
        torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-5, atol=1e-6)
    ((a * losses).sum() + ((b * ent).sum() if weighted else 0)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        no_grad = chunked_cross_entropy(h, w, t, 7, 0.8, entropy=bool(entropy))
    torch.testing.assert_close(no_grad[0], losses.detach(), rtol=1e-6, atol=1e-6)
    if entropy:
        torch.testing.assert_close(no_grad[2], ent.detach(), rtol=1e-6, atol=1e-6)


def test_the_entropy_forward_holds_one_chunks_worth_of_logits():
    """The entropy needs two [rows x vocab] fp32 buffers side by side (e and z - max), so its forward
    runs on half-chunks: the most [rows x vocab] fp32 elements any one op makes is one chunk's, with
    or without the entropy (GRPO makes it in its first epoch's forward, next to the held activations)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestLogits(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out) if not func.is_view else ():  # new buffers only (not the weight's .t())
                if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == vocab and x.dtype == torch.float32:
                    self.rows = max(self.rows, x.shape[0])
            return out

    vocab, chunk = 50, 8
    h, w, t = _inputs(seed=4, tokens=40, vocab=vocab)
    for entropy in (False, True):
        with LargestLogits() as seen:
            losses, _, ent, _ = chunked_cross_entropy(h.clone().requires_grad_(), w.clone().requires_grad_(), t, chunk,
                                                      entropy=entropy)
        assert seen.rows == (chunk // 2 if entropy else chunk), (entropy, seen.rows)


def test_summed_loss_frozen_head_and_one_backward():
    h, w, t = _inputs(seed=1)
    h = h.clone().requires_grad_()
    _, _, _, total = chunked_cross_entropy(h, w, t, 7, summed=True)  # a frozen head: only d hidden
    total.backward(retain_graph=True)
    assert h.grad is not None and w.grad is None
    with pytest.raises(RuntimeError, match="one backward per forward"):
        total.backward()  # its saved gradients were scaled in place by the first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_summed_path_equals_per_token_path(dtype):
    """Exaone45.forward: the summed loss (default) and the per-token log-prob path (RL's, recomputed in
    backward) give the same loss and gradients for every parameter, MTP included. bf16 moves the
    weight gradients by its rounding (measured 2% of either path against fp32, 1.5% between them)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.loss_chunk_size = 37  # several chunks
    model = build_model(cfg, dtype=dtype)
    assert model.mtp is not None and cfg.mtp_loss_weight > 0
    ids = torch.randint(100, 4000, (2, 64))
    labels = ids.clone()
    labels[:, :5] = -100
    runs = []
    for token_logprobs in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, token_logprobs=token_logprobs)
        (0.37 * out.loss).backward()
        runs.append((out, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (per_token, g0), (summed, g1) = runs
    assert summed.token_logprobs is None and per_token.token_logprobs is not None
    text = {n for n, _ in model.named_parameters() if not n.startswith("visual.")}  # no image here
    assert g0.keys() == g1.keys() == text and any(n.startswith("mtp.") for n in text)
    for key in ("loss", "lm_loss", "mtp_loss"):
        assert abs(getattr(per_token, key).item() - getattr(summed, key).item()) < 1e-5, key
    torch.testing.assert_close(per_token.token_loss, summed.token_loss, rtol=0, atol=1e-5)
    bound = 1e-5 if dtype == torch.float32 else 0.05
    for name in g0:
        rel = ((g0[name] - g1[name]).norm() / g0[name].norm()).item()
        assert rel < bound, (name, rel)
