"""One attention entry point for the decoder and the vision tower.

Which key a query may see is described once per forward by a `MaskSpec` (token indices and
document ids of queries and keys) and shared by every layer; each layer adds its own sliding
window. The same description serves packed training batches (documents from cu_seqlens), the
vision tower (frames and windows), the KV cache (slot indices, padding) and context parallelism
(a rank's query chunks against all-gathered keys). Kernels: `sdpa` (dense boolean mask),
`flex` (torch flex_attention block mask), `flash` (flash-attn varlen, GPU), `eager` (reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Document id of every token of a packed [batch, length] block (cu_seqlens over the flat tokens)."""
    flat = torch.arange(batch * length, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.to(flat.dtype), flat, right=True) - 1).view(batch, length)


@dataclass
class MaskSpec:
    """Query i may see key j when doc(i) == doc(j), key j is valid, and (if causal) idx(j) <= idx(i);
    a sliding window W further requires idx(i) - idx(j) < W (the token and the W-1 before it)."""

    q_idx: torch.Tensor  # [B, Lq] token index (position in the row, or cache slot)
    k_idx: torch.Tensor  # [B, Lk]
    q_doc: torch.Tensor  # [B, Lq]
    k_doc: torch.Tensor  # [B, Lk]
    causal: bool = True
    k_valid: Optional[torch.Tensor] = None  # [B, Lk], False for padding slots
    cu_seqlens: Optional[torch.Tensor] = None  # set for plain packed self-attention (flash varlen)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, batch: int, length: int, causal: bool = True) -> "MaskSpec":
        doc = doc_ids_from_cu_seqlens(cu_seqlens, batch, length)
        idx = torch.arange(length, device=cu_seqlens.device).expand(batch, length)
        return cls(idx, idx, doc, doc, causal, cu_seqlens=cu_seqlens)

    def dense(self, window: Optional[int]) -> torch.Tensor:
        """Boolean mask [B, 1, Lq, Lk]."""
        key = ("dense", window)
        if key not in self._cache:
            qi, ki = self.q_idx[:, :, None], self.k_idx[:, None, :]
            mask = self.q_doc[:, :, None] == self.k_doc[:, None, :]
            if self.causal:
                mask &= ki <= qi
            if window is not None:
                mask &= (qi - ki) < window
            if self.k_valid is not None:
                # A padding query sees at least itself, so no row of the softmax is empty.
                mask &= self.k_valid[:, None, :] | (ki == qi)
            self._cache[key] = mask[:, None]
        return self._cache[key]

    def block_mask(self, window: Optional[int], num_heads: int):
        key = ("flex", window)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.dense(window)[:, 0]

            def mask_mod(b, h, q, k):
                return dense[b, q, k]

            B, Lq, Lk = dense.shape
            self._cache[key] = create_block_mask(mask_mod, B, None, Lq, Lk, device=dense.device)
        return self._cache[key]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    window: Optional[int] = None,
    impl: str = "sdpa",
) -> torch.Tensor:
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (GQA: Hq a multiple of Hkv) -> [B, Hq, Lq, D]."""
    groups = q.shape[1] // k.shape[1]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=spec.dense(window), scale=scale, enable_gqa=groups > 1
        )
    if impl == "eager":
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~spec.dense(window), float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(
            q, k, v, block_mask=spec.block_mask(window, q.shape[1]), scale=scale, enable_gqa=groups > 1
        )
    if impl == "flash":
        return _flash_varlen(q, k, v, spec, scale, window)
    raise ValueError(f"model.attn_impl={impl!r}: expected sdpa | flex | flash | eager")


def _flash_varlen(q, k, v, spec: MaskSpec, scale: float, window: Optional[int]) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:  # pragma: no cover - GPU only
        raise RuntimeError("model.attn_impl=flash needs the flash-attn package (GPU); use sdpa or flex") from e
    if spec.cu_seqlens is None or q.shape[2] != k.shape[2]:
        raise RuntimeError("model.attn_impl=flash supports packed self-attention only; use sdpa for the KV cache")
    B, H, L, D = q.shape
    cu = spec.cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    flat = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], D)  # noqa: E731
    out = flash_attn_varlen_func(
        flat(q), flat(k), flat(v), cu, cu, max_len, max_len, softmax_scale=scale, causal=spec.causal,
        window_size=(window - 1, 0) if window else (-1, -1),
    )
    return out.view(B, L, H, D).transpose(1, 2)
