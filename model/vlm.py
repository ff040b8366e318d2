"""EXAONE 4.5: vision features scattered into the text embeddings, the decoder, the LM head, MTP, and
the training losses (next-token cross-entropy plus weighted MTP cross-entropy, both computed in
chunks over the label tokens so the full [tokens x vocab] logits never exist at once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MaskSpec, doc_ids_from_cu_seqlens
from .config import ModelConfig
from .layers import RMSNorm, text_inv_freq, text_rope
from .text import MTP, TextModel
from .vision import VisionModel


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor] = None  # lm_loss + mtp_loss_weight * mtp_loss (means over label tokens)
    logits: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    mtp_loss: Optional[torch.Tensor] = None
    # Sums and counts, for normalizing across micro-batches and ranks by real label tokens.
    lm_loss_sum: Optional[torch.Tensor] = None
    lm_tokens: int = 0
    mtp_loss_sum: Optional[torch.Tensor] = None
    mtp_tokens: int = 0
    token_loss: Optional[torch.Tensor] = None  # [B, L] detached next-token loss (0 where no label)
    # with `token_logprobs=True`: log p(label) of every label token in order (autograd through it) and,
    # with `token_entropy=True`, the entropy of the distribution predicting it (RL scores its samples)
    token_logprobs: Optional[torch.Tensor] = None
    token_entropy: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None


def shifted_targets(labels: torch.Tensor, doc: torch.Tensor, k: int) -> torch.Tensor:
    """targets[t] = labels[t + k] when token t + k is in the same document as t, else -100."""
    B, L = labels.shape
    flat_labels, flat_doc = labels.reshape(-1), doc.reshape(-1)
    out = torch.full_like(flat_labels, -100)
    if flat_labels.numel() > k:
        same = flat_doc[k:] == flat_doc[:-k]
        out[:-k] = torch.where(same, flat_labels[k:], -100)
    return out.view(B, L)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          scale: float = 1.0, entropy: bool = False, summed: bool = False):
    """Cross-entropy of softmax(scale * logits) at every position with a target, computed chunk by
    chunk through the LM head `weight`, so the [tokens x vocab] logits never exist whole. Returns
    (losses [valid positions], valid mask, entropies [valid] or None, the losses' sum).

    `summed=True` (a loss that is a function of the losses' sum only, as pretraining's and SFT's are):
    the losses come back detached and only their sum carries the gradient. That sum's
    gradient is one number, so each chunk's gradients (for `hidden` and `weight`) are computed in the
    forward, from the softmax the loss needs anyway (`_SummedLinearCE`). Otherwise (RL weighs every
    token's log-prob by its own advantage) the forward keeps each token's log-sum-exp and the backward
    recomputes each chunk's logits from it (`_TokenLinearCE`). Either way no log-softmax tensor is made:
    a fresh [chunk x vocab] log-softmax and its backward cost 3-4x a softmax made in place on CPU."""
    valid = targets.reshape(-1) != -100
    h, t = hidden.reshape(-1, hidden.shape[-1])[valid], targets.reshape(-1)[valid]
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if summed and not entropy:
        if grad:
            total, losses = _SummedLinearCE.apply(h, weight, t, chunk, scale)
        else:
            losses = _cat([_chunk_exp(hc, weight, tc, scale)[0] for hc, tc in _chunks(h, t, chunk)], h)
            total = losses.sum()
        return losses, valid, None, total
    if grad:
        losses, entropies = _TokenLinearCE.apply(h, weight, t, chunk, scale, entropy)
    else:
        stats = _stats(h, weight, t, chunk, scale, entropy)
        losses, entropies = _cat([x[0] for x in stats], h), _cat([x[1] for x in stats], h) if entropy else None
    return losses, valid, entropies if entropy else None, losses.sum()


def _stats(h, weight, t, chunk: int, scale: float, entropy: bool) -> list:
    """`_chunk_stats` over chunks of rows. The entropy needs two [rows x vocab] fp32 buffers (e and z -
    max): it runs on half-chunks, so its forward holds what one chunk's loss alone does (GRPO logs the
    entropy every step, from its first epoch's forward, while that epoch's activations are held)."""
    rows = max(1, chunk // 2) if entropy else chunk
    return [_chunk_stats(hc, weight, tc, scale, entropy) for hc, tc in _chunks(h, t, rows)]


def _chunks(h: torch.Tensor, t: torch.Tensor, chunk: int):
    return [(h[i : i + chunk], t[i : i + chunk]) for i in range(0, h.shape[0], chunk)]


def _cat(parts: list, like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)


def _scaled_logits(h, weight, scale: float) -> torch.Tensor:
    z = F.linear(h, weight).float()
    return z.mul_(scale) if scale != 1.0 else z


def _chunk_exp(h, weight, t, scale: float, keep: bool = False):
    """One chunk's z = scale * logits in fp32, as (losses [n], lse [n], e = exp(z - max) [n, V], row sums
    of e [n, 1], z - max or None): loss = logsumexp(z) - z[target]. In place on one buffer unless `keep`
    (z - max kept beside e, for the entropy)."""
    z = _scaled_logits(h, weight, scale)
    target = z[torch.arange(z.shape[0], device=z.device), t]
    top = z.amax(-1, keepdim=True)
    z.sub_(top)
    e = z.exp() if keep else z.exp_()
    total = e.sum(-1, keepdim=True)
    lse = (top + total.log()).squeeze(-1)
    return lse - target, lse, e, total, z if keep else None


def _add_head_grads(g, weight, hc, dh, dw, rows: slice) -> None:
    """A chunk's d loss / d logits `g` (fp32) into dh[rows] = g W and dw += g^T h, in the weight's dtype."""
    g = g.to(weight.dtype)
    if dh is not None:
        torch.mm(g, weight, out=dh[rows])
    if dw is not None:
        dw.addmm_(g.t(), hc)


def _chunk_softmax(h, weight, t, scale: float):
    """(losses [n], softmax(scale * logits) [n, V] in fp32) of one chunk, made in place."""
    losses, _, e, total, _ = _chunk_exp(h, weight, t, scale)
    return losses, e.div_(total)


def _chunk_stats(h, weight, t, scale: float, entropy: bool):
    """(losses [n], entropies [n] or None, log-sum-exp [n]) of one chunk; the entropy is
    log(sum e) - sum_j e_j (z_j - max) / sum e, no log p needed (nothing to underflow)."""
    losses, lse, e, total, shifted = _chunk_exp(h, weight, t, scale, keep=entropy)
    if entropy:  # sum_j e_j (z_j - max) as a batched dot product: no third [n, V] buffer
        ent = total.log().squeeze(-1) - torch.bmm(e[:, None, :], shifted[:, :, None]).view(-1) / total.squeeze(-1)
    else:
        ent = None
    return losses, ent, lse


class _TokenLinearCE(torch.autograd.Function):
    """Per-token CE(softmax(scale * h W^T), t) (and the entropy of that softmax) over chunks of rows,
    for losses weighted token by token (RL). The forward keeps the hidden states, the targets and
    each token's log-sum-exp, not the logits; the backward recomputes a chunk's logits, its softmax
    from the saved log-sum-exp in place, and d/dz = g * (p - onehot) - g_ent * p * (log p + H) times
    scale, then dh = d W and dW = d^T h in the weight's dtype. Returns (losses, entropies or an empty
    tensor)."""

    @staticmethod
    def forward(ctx, h, weight, t, chunk: int, scale: float, entropy: bool):
        stats = _stats(h, weight, t, chunk, scale, entropy)
        losses, lse = _cat([x[0] for x in stats], h), _cat([x[2] for x in stats], h)
        ent = _cat([x[1] for x in stats], h) if entropy else h.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(h, weight, t, lse, ent)
        ctx.chunk, ctx.scale, ctx.entropy = chunk, scale, entropy
        if not entropy:
            ctx.mark_non_differentiable(ent)
        ctx.set_materialize_grads(False)  # an entropy kept for a metric only comes back as None, not zeros
        return losses, ent

    @staticmethod
    def backward(ctx, grad_losses, grad_ent):
        h, weight, t, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        for i in range(0, h.shape[0], ctx.chunk):
            hc, tc, rows = h[i : i + ctx.chunk], t[i : i + ctx.chunk], slice(i, i + ctx.chunk)
            log_p = _scaled_logits(hc, weight, ctx.scale).sub_(lse[rows, None])
            ent_term = None
            if ctx.entropy and grad_ent is not None:  # two fp32 buffers: p, and p * (log p + H) made on log p
                p = log_p.exp()
                ent_term = log_p.add_(ent[rows, None]).mul_(p).mul_(grad_ent[rows, None])
            else:  # one
                p = log_p.exp_()
            del log_p
            if grad_losses is None:
                g = p.zero_()
            else:
                g = p.mul_(grad_losses[rows, None])
                g[torch.arange(g.shape[0], device=g.device), tc] -= grad_losses[rows]
            if ent_term is not None:
                g.sub_(ent_term)
                del ent_term
            if ctx.scale != 1.0:
                g.mul_(ctx.scale)
            _add_head_grads(g, weight, hc, dh, dw, rows)
            del g
        return dh, dw, None, None, None, None


class _SummedLinearCE(torch.autograd.Function):
    """sum_i CE(softmax(scale * h_i W^T), t_i) over chunks of rows, with the gradients computed in the
    forward (Liger-Kernel's fused linear cross-entropy, here in torch ops): d loss / d z = scale *
    (softmax - onehot), then dh = g W and dW = g^T h per chunk, in the weight's dtype as autograd
    would. The backward only scales them by the upstream gradient (one number), so the LM-head matmul
    and the softmax are not recomputed and the [chunk x vocab] logits are made once. The weight is
    not saved: ZeRO-3 may have released it by the backward. Returns (sum, losses detached)."""

    @staticmethod
    def forward(ctx, h, weight, t, chunk: int, scale: float):
        dh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        losses = []
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i : i + chunk], t[i : i + chunk]
            loss, p = _chunk_softmax(hc, weight, tc, scale)
            losses.append(loss)
            p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0
            if scale != 1.0:
                p.mul_(scale)
            _add_head_grads(p, weight, hc, dh, dw, slice(i, i + chunk))
            del p
        losses = _cat(losses, h)
        ctx.save_for_backward(*(x for x in (dh, dw) if x is not None))
        ctx.has, ctx.used = (dh is not None, dw is not None), False
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, grad_losses):
        if ctx.used:
            raise RuntimeError("_SummedLinearCE scales its saved gradients in place: one backward per forward")
        ctx.used = True
        saved = iter(ctx.saved_tensors)
        dh = next(saved).mul_(grad_total) if ctx.has[0] else None
        dw = next(saved).mul_(grad_total) if ctx.has[1] else None
        return dh, dw, None, None, None


class HeadLoss(nn.Module):
    """`chunked_cross_entropy` as a module of its own, called once per loss (next token, MTP) whatever
    the number of chunks. It holds no parameter: it reads the LM head's weight, which ZeRO-3 gathers
    around this module (`Exaone45.external_parameters`) for its forward and its backward (where RL's
    per-token path recomputes the chunks; the summed path made its gradients in the forward).
    Calling the head module per chunk instead would make the sequence of module calls depend on each
    rank's token count, which ZeRO-3's prefetch trace requires to be equal."""

    def forward(self, hidden, weight, targets, chunk: int, scale: float = 1.0, entropy: bool = False,
                summed: bool = False):
        return chunked_cross_entropy(hidden, weight, targets, chunk, scale, entropy, summed)


@torch.no_grad()
def init_module_weights(root: nn.Module, std: float) -> None:
    """Normal(0, std) weights and zero biases for linears (any class marked `is_linear`, e.g. FP8
    linears that are not nn.Linear subclasses), convolutions and embeddings; unit norms."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)) or getattr(module, "is_linear", False):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class Exaone45(nn.Module):
    """The whole model. State-dict names follow the Hugging Face checkpoint without its `model.`
    prefix: visual.*, language_model.*, lm_head.*, mtp.*."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        tc = cfg.text_config
        self.visual = VisionModel(cfg.vision_config)
        self.language_model = TextModel(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.mtp = MTP(tc) if tc.num_nextn_predict_layers > 0 else None
        self.head_loss = HeadLoss()
        self.vision_in_every_step = False  # set by training (parallelize), see _blank_image_features
        self.set_attn_impl(cfg.attn_impl)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where the module's forward reads a parameter it does not own:
        DeepSpeed ZeRO-3 only gathers a module's own parameters around its forward, so these are
        registered with it (training/engine.py)."""
        return [(self.visual.patch_embed, self.visual.patch_embed.proj.weight), (self.head_loss, self.lm_head.weight)]

    def set_attn_impl(self, impl: str):
        for module in self.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl

    def init_weights(self):
        """Normal(0, initializer_range) for linears and embeddings, zero biases, unit norms."""
        init_module_weights(self.visual, self.cfg.vision_config.initializer_range)
        for child in (self.language_model, self.lm_head, self.mtp):
            if child is not None:
                init_module_weights(child, self.cfg.text_config.initializer_range)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_features=None) -> torch.Tensor:
        """Token embeddings with image features scattered over the image tokens, in order.
        `image_features` (already merged, [image tokens, hidden]) replaces running the vision tower,
        as context parallelism does for the images of its shard."""
        h = self.language_model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.visual(pixel_values, image_grid_thw)
        if image_features is None:
            if self.vision_in_every_step:
                return h + 0.0 * self._blank_image_features().sum()
            return h
        mask = input_ids == self.cfg.image_token_id
        if int(mask.sum()) != image_features.shape[0]:
            raise ValueError(
                f"image tokens and image features do not match: {int(mask.sum())} tokens, {image_features.shape[0]} features"
            )
        return h.masked_scatter(mask[..., None], image_features.to(h.dtype))

    def _blank_image_features(self) -> torch.Tensor:
        """The vision tower on one blank image of 2 merge units (m x 2m patches). Training runs it
        when a batch has no image (`vision_in_every_step`), so every rank runs the same collectives
        (FSDP all-gathers, gradient reductions) whether or not its batch holds images, and the tower
        gets zero gradients rather than none (the optimizer then steps it as it would on N ranks); its
        output is multiplied by zero. Two units, not one: a size-1 dimension would be specialized by
        torch.compile and recompile the vision blocks once more."""
        vc = self.cfg.vision_config
        m = vc.spatial_merge_size
        weight = self.visual.patch_embed.proj.weight
        patches = torch.zeros(2 * m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, device=weight.device)
        return self.visual(patches, torch.tensor([[1, m, 2 * m]], device=weight.device))

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        tc = self.cfg.text_config
        return text_rope(position_ids, text_inv_freq(tc.rope_parameters, tc.head_dim, position_ids.device), dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        return_logits: Optional[bool] = None,
        shard: Optional["ShardInputs"] = None,
        token_logprobs: bool = False,
        token_entropy: bool = False,
        temperature: float = 1.0,
    ) -> ModelOutput:
        """input_ids [B, L]; labels unshifted (HF style, -100 = no loss); cu_seqlens (int32, over the
        flat B*L tokens) separates packed documents; position_ids default to restarting per document.
        Context parallelism passes `shard`: this rank's slice of targets computed before sharding.
        `token_logprobs` (RL): also return log p(label) of every label token under softmax(logits /
        temperature), through the same chunked LM-head computation as the loss (the [tokens x vocab]
        logits never exist whole, and positions without a label never reach the head)."""
        if shard is None:
            shard = prepare_inputs(input_ids, labels, cu_seqlens, position_ids)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, shard.image_features)
        rope = self.rope(shard.position_ids, embeds.dtype)
        hidden = self.language_model(embeds, rope, shard.mask_spec)

        out = ModelOutput(hidden_states=hidden)
        if return_logits or (return_logits is None and labels is None and shard.targets is None):
            out.logits = self.lm_head(hidden)
        if shard.targets is None:
            return out

        chunk = self.cfg.loss_chunk_size
        # Without per-token outputs the loss depends on the losses' sum only: its gradients are made in the
        # forward (chunked_cross_entropy's `summed`); RL's per-token log-probs take the recomputing path.
        summed = not (token_logprobs or token_entropy)
        losses, valid, entropy, out.lm_loss_sum = self.head_loss(hidden, self.lm_head.weight, shard.targets, chunk,
                                                                 1.0 / temperature, token_entropy, summed)
        if token_logprobs:
            out.token_logprobs, out.token_entropy = -losses, entropy
        out.lm_tokens = int(valid.sum())
        out.lm_loss = out.lm_loss_sum / max(out.lm_tokens, 1)
        token_loss = torch.zeros(valid.shape, device=hidden.device)
        token_loss[valid] = losses.detach()
        out.token_loss = token_loss.view(input_ids.shape)
        out.loss = out.lm_loss
        if self.mtp is not None and self.cfg.mtp_loss_weight > 0:
            # MTP reads the plain embedding of token t+1 (image tokens included), which keeps it
            # shardable: image-token targets carry no loss, so nothing is lost.
            next_embeds = self.language_model.embed_tokens(shard.next_input_ids)
            mtp_hidden = self.mtp(hidden, next_embeds, rope, shard.mask_spec)
            _, mtp_valid, _, mtp_sum = self.head_loss(mtp_hidden, self.lm_head.weight, shard.mtp_targets, chunk,
                                                      summed=True)
            out.mtp_loss_sum, out.mtp_tokens = mtp_sum, int(mtp_valid.sum())
            out.mtp_loss = out.mtp_loss_sum / max(out.mtp_tokens, 1)
            out.loss = out.lm_loss + self.cfg.mtp_loss_weight * out.mtp_loss
        return out


@dataclass
class ShardInputs:
    """Everything derived from the whole packed sequence before it is split for context parallelism."""

    position_ids: torch.Tensor  # [B, L]
    mask_spec: MaskSpec
    targets: Optional[torch.Tensor] = None  # [B, L] next-token targets, -100 = none
    mtp_targets: Optional[torch.Tensor] = None  # [B, L] targets two ahead
    next_input_ids: Optional[torch.Tensor] = None  # [B, L] token t+1 (0 past the end)
    image_features: Optional[torch.Tensor] = None  # merged features of this shard's image tokens


def prepare_inputs(input_ids, labels=None, cu_seqlens=None, position_ids=None) -> ShardInputs:
    B, L = input_ids.shape
    device = input_ids.device
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * L + 1, L, device=device, dtype=torch.int32)
    doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, B, L)
    if position_ids is None:
        flat = torch.arange(B * L, device=device)
        position_ids = (flat - cu_seqlens.long()[doc_ids.reshape(-1)]).view(B, L)
    out = ShardInputs(position_ids, MaskSpec.packed(cu_seqlens, B, L))
    if labels is not None:
        out.targets = shifted_targets(labels, doc_ids, 1)
        out.mtp_targets = shifted_targets(labels, doc_ids, 2)
        out.next_input_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    return out


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Exaone45:
    """Build on the meta device, materialize on `device`, then initialize: the one way every model is made."""
    with torch.device("meta"):
        model = Exaone45(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype)
