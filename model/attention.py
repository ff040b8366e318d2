"""One attention entry point for the decoder and the vision tower.

Which key a query may see is described once per forward by a `MaskSpec` (token indices and
document ids of queries and keys) and shared by every layer; each layer adds its own sliding
window. The same description serves packed training batches (documents from cu_seqlens), the
vision tower (frames and windows), the KV cache (slot indices, padding) and context parallelism
(a rank's query chunks against all-gathered keys or a halo). Each kernel derives what it needs
from the spec, once per forward (cached in the spec):

- `sdpa`, `eager`: a dense boolean [B, 1, Lq, Lk] mask (`MaskSpec.dense`). The reference, and the
  only kernels that take the KV cache's padded slots; memory grows with Lq * Lk.
- `flash`: varlen segments (`MaskSpec.varlen`: cu_seqlens of queries and keys, their longest
  lengths as host ints, and which keys each segment reads) passed to `varlen_attention`, whose
  interface is flash-attn's: flash-attn on CUDA, `cpu_varlen_attention` (blocks of queries against
  the keys of their document and window, over SDPA) elsewhere. Nothing [L, L] is built, so it is the
  long-context kernel, and the fast one on CPU; it trains (backward) on both.
- `flex`: torch flex_attention with a block mask whose block tables come from per-block ranges of
  the same indices and whose mask_mod reads the 1D index tensors (`MaskSpec.block_mask`). Compiled
  on CUDA; eager and forward-only on CPU (torch 2.13 has no CPU backward for it), where torch's
  eager reference computes dense scores itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

FLEX_BLOCK = 128  # flex_attention's default block size; the block tables are built for it
CPU_BLOCK = 256  # queries per kernel call of the CPU varlen kernel where a window or offset needs a mask
FP32_BACKWARD_PAIRS = 2**18  # CPU varlen tiles of at most this many (query, key) pairs run their backward in fp32


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Document id of every token of a packed [batch, length] block (cu_seqlens over the flat tokens)."""
    flat = torch.arange(batch * length, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.to(flat.dtype), flat, right=True) - 1).view(batch, length)


@dataclass(frozen=True)
class Varlen:
    """flash-attn varlen segments over the flattened [B * Lq] queries and [B * Lk] keys: segment i
    is queries cu_q[i]:cu_q[i+1] against keys cu_k[i]:cu_k[i+1] of the keys taken at `k_index`
    (None: the keys as they are). The longest lengths are host ints, so no kernel call syncs."""

    cu_q: torch.Tensor  # int32 [S + 1]
    cu_k: torch.Tensor  # int32 [S + 1]
    max_q: int
    max_k: int
    k_index: Optional[torch.Tensor] = None  # long [cu_k[-1]], into the flat keys


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
    cu_seqlens: Optional[torch.Tensor] = None  # set for plain packed self-attention
    max_seqlen: Optional[int] = None  # longest document of cu_seqlens, if the caller knows it on the host
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def packed(
        cls, cu_seqlens: torch.Tensor, batch: int, length: int, causal: bool = True, max_seqlen: Optional[int] = None
    ) -> "MaskSpec":
        doc = doc_ids_from_cu_seqlens(cu_seqlens, batch, length)
        idx = torch.arange(length, device=cu_seqlens.device).expand(batch, length)
        return cls(idx, idx, doc, doc, causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def prepare(self, impl: str, windows) -> "MaskSpec":
        """Build, before the layers run, the mask or segment table `impl` reads for each window the
        layers use (None = global). Inside a compiled block the layers then only read `_cache`:
        building it there would recompile on the cache's contents (dynamo guards on its keys) and
        put host work (varlen's segment lengths) in the graph. Layers still build what was not
        prepared (eager runs, other callers), so this is an optimization, never a requirement."""
        build = {"sdpa": self.dense, "eager": self.dense, "flex": self.block_mask, "flash": self.varlen}.get(impl)
        if build is None:
            raise ValueError(f"model.attn_impl={impl!r}: expected sdpa | flex | flash | eager")
        for window in dict.fromkeys(windows):
            build(window)
        return self

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

    def varlen(self, window: Optional[int]) -> Varlen:
        """The flash kernels' segments. Packed self-attention (cu_seqlens set) is one segment per
        document, and its longest length is computed on the host once per spec, not per call. Any
        other spec (context parallelism's chunks against gathered keys or a halo) is cut into runs of
        queries by `_segments_from_indices`."""
        if self.k_valid is not None:
            raise RuntimeError(
                "model.attn_impl=flash has no padded key slots, so it does not decode with the KV cache; use sdpa"
            )
        if window is not None and not self.causal:
            raise ValueError("model.attn_impl=flash: a sliding window needs causal attention")
        key = ("varlen", None if self.cu_seqlens is not None else window)
        if key not in self._cache:
            if self.cu_seqlens is not None:
                cu = self.cu_seqlens.to(torch.int32)
                longest = self.max_seqlen if self.max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
                self._cache[key] = Varlen(cu, cu, longest, longest)
            else:
                self._cache[key] = _segments_from_indices(self, window)
        return self._cache[key]

    def block_mask(self, window: Optional[int]):
        """flex_attention's BlockMask, from per-block ranges of the indices (never an [L, L] mask)."""
        key = ("flex", window)
        if key not in self._cache:
            self._cache[key] = _flex_block_mask(self, window)
        return self._cache[key]


def _segments_from_indices(spec: MaskSpec, window: Optional[int]) -> Varlen:
    """Varlen segments for a spec given by indices alone. Each run of queries of one document with
    consecutive indices (a chunk's share of a document) becomes one segment, reading the keys of its
    document from its first index - (window - 1) up to its last index (causal) or the document's end.
    flash aligns a causal segment's queries with the last keys (bottom-right), so per row the keys
    must be sorted by (document, index) with consecutive indices, and every query's own key present:
    true of the layouts context parallelism builds (all-gathered keys in global order; a halo before
    a chunk). Keys of overlapping segments are repeated through `k_index` (O(L) in total)."""
    qi, qd, ki, kd = (t.detach().cpu().numpy().astype(np.int64) for t in (spec.q_idx, spec.q_doc, spec.k_idx, spec.k_doc))
    B, Lq = qi.shape
    Lk = ki.shape[1]
    span = int(max(ki.max(), qi.max())) + 2
    ndoc = int(max(kd.max(), qd.max())) + 1
    key = ((np.arange(B)[:, None] * ndoc + kd) * span + ki).ravel()  # sorted iff (row, doc, idx) is
    if np.any(np.diff(key) <= 0):
        raise ValueError("model.attn_impl=flash: keys must be sorted by document and index within each row")
    start = np.ones((B, Lq), dtype=bool)
    start[:, 1:] = (qd[:, 1:] != qd[:, :-1]) | (qi[:, 1:] != qi[:, :-1] + 1)
    first = np.flatnonzero(start.ravel())
    last = np.append(first[1:], B * Lq) - 1
    doc, lo_idx, hi_idx = qd.ravel()[first], qi.ravel()[first], qi.ravel()[last]
    base = ((first // Lq) * ndoc + doc) * span
    lo = np.maximum(lo_idx - (window - 1), 0) if window is not None else np.zeros_like(lo_idx)
    hi = hi_idx if spec.causal else np.full_like(hi_idx, span - 1)
    ks = np.searchsorted(key, base + lo, "left")
    ke = np.searchsorted(key, base + hi, "right")
    klen = ke - ks
    flat_ki = ki.ravel()
    ok = klen > 0
    if spec.causal:
        head, tail = flat_ki[np.minimum(ks, B * Lk - 1)], flat_ki[np.maximum(ke - 1, 0)]
        ok &= (tail == hi_idx) & (head <= lo_idx) & (tail - head + 1 == klen)
    if not ok.all():
        raise ValueError("model.attn_impl=flash: some query's keys are missing or not consecutive in the key layout")
    qlen = last - first + 1
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (qlen, klen))
    device = spec.q_idx.device
    k_index = None
    if not (ks[0] == 0 and np.array_equal(ks[1:], ke[:-1]) and ke[-1] == B * Lk):
        k_index = torch.from_numpy(np.repeat(ks - cu_k[:-1], klen) + np.arange(cu_k[-1])).to(device)
    return Varlen(
        torch.from_numpy(cu_q).to(device, torch.int32), torch.from_numpy(cu_k).to(device, torch.int32),
        int(qlen.max()), int(klen.max()), k_index,
    )


def _block_ranges(x: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) of x [B, L] over blocks of FLEX_BLOCK (the last block padded with its last value)."""
    pad = blocks * FLEX_BLOCK - x.shape[1]
    if pad:
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], 1)
    x = x.reshape(x.shape[0], blocks, FLEX_BLOCK)
    return x.amin(-1), x.amax(-1)


def _flex_block_mask(spec: MaskSpec, window: Optional[int]):
    """A BlockMask built from per-block ranges: a (query block, key block) pair is skipped when no
    pair of tokens can pass (document ranges disjoint, all keys after all queries, all keys beyond
    the window), full when every pair passes (one shared document, all keys at or before all queries
    and inside the window, all keys valid; never a ragged last block), and partial otherwise, where
    flex evaluates the mask_mod. The tables are [B, Lq / 128, Lk / 128]; create_block_mask would
    evaluate the mask_mod on all [B, Lq, Lk] pairs unless compiled."""
    from torch.nn.attention.flex_attention import BlockMask

    q_idx, k_idx, q_doc, k_doc, k_valid, causal = spec.q_idx, spec.k_idx, spec.q_doc, spec.k_doc, spec.k_valid, spec.causal
    B, Lq = q_idx.shape
    Lk = k_idx.shape[1]
    nq, nk = -(-Lq // FLEX_BLOCK), -(-Lk // FLEX_BLOCK)
    (qd0, qd1), (qi0, qi1) = _block_ranges(q_doc, nq), _block_ranges(q_idx, nq)
    (kd0, kd1), (ki0, ki1) = _block_ranges(k_doc, nk), _block_ranges(k_idx, nk)
    Q, K = (slice(None), slice(None), None), (slice(None), None, slice(None))  # [B, nq, 1] and [B, 1, nk]
    touch = (qd0[Q] <= kd1[K]) & (kd0[K] <= qd1[Q])
    full = (qd0 == qd1)[Q] & (kd0 == kd1)[K] & (qd0[Q] == kd0[K])
    if causal:
        touch &= ki0[K] <= qi1[Q]
        full &= ki1[K] <= qi0[Q]
    if window is not None:
        touch &= qi0[Q] - ki1[K] < window
        full &= qi1[Q] - ki0[K] < window
    if k_valid is not None:
        valid_lo, valid_hi = (r.bool()[K] for r in _block_ranges(k_valid.to(torch.uint8), nk))
        touch &= valid_hi | ((ki0[K] <= qi1[Q]) & (qi0[Q] <= ki1[K]))  # a valid key, or a query's own slot
        full &= valid_lo
    ragged_q, ragged_k = torch.zeros(nq, dtype=torch.bool), torch.zeros(nk, dtype=torch.bool)
    ragged_q[-1], ragged_k[-1] = Lq % FLEX_BLOCK != 0, Lk % FLEX_BLOCK != 0
    full &= ~ragged_q.to(full.device)[:, None] & ~ragged_k.to(full.device)[None, :]
    partial = touch & ~full

    def table(blocks: torch.Tensor):
        order = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True)  # listed blocks first
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def mask_mod(b, h, q, k):
        qi, ki = q_idx[b, q], k_idx[b, k]
        m = q_doc[b, q] == k_doc[b, k]
        if causal:
            m = m & (ki <= qi)
        if window is not None:
            m = m & (qi - ki < window)
        if k_valid is not None:
            m = m & (k_valid[b, k] | (ki == qi))
        return m

    return BlockMask.from_kv_blocks(*table(partial), *table(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(Lq, Lk))


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
        return _flex(q, k, v, spec.block_mask(window), scale, groups > 1)
    if impl == "flash":
        return _flash(q, k, v, spec, scale, window)
    raise ValueError(f"model.attn_impl={impl!r}: expected sdpa | flex | flash | eager")


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, flex_attention is a dense reference implementation; compiled it is the fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, scale: float, gqa: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "model.attn_impl=flex trains on CUDA only (torch has no flex_attention backward on CPU); "
            "on CPU train with model.attn_impl=flash (the CPU varlen kernel) or sdpa"
        )
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _flash(q, k, v, spec: MaskSpec, scale: float, window: Optional[int]) -> torch.Tensor:
    """[B, H, L, D] -> flash-attn's flat [B * L, H, D] layout, the spec's segments, and back."""
    plan = spec.varlen(window)
    B, H, Lq, D = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    if plan.k_index is not None:
        kf, vf = kf[plan.k_index], vf[plan.k_index]
    out = varlen_attention(
        qf, kf, vf, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, softmax_scale=scale, causal=spec.causal,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
    return out.view(B, Lq, H, -1).transpose(1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash-attn's `flash_attn_varlen_func` (q [total_q, Hq, D], k/v [total_k, Hkv, D] -> [total_q, Hq, D]).
    Every `flash` call goes through here with the arguments a GPU receives, so the CPU tests check
    them: on CUDA flash-attn runs them, elsewhere `cpu_varlen_attention` (same semantics)."""
    if q.is_cuda:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise RuntimeError(
                "model.attn_impl=flash on CUDA needs the flash-attn package: pip install -e .[flash] "
                "(or pip install flash-attn); or set model.attn_impl=flex"
            ) from e
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        )
    return cpu_varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size,
    )


@torch.compiler.disable  # a host loop over the batch's segments: eager inside compiled blocks (a graph break)
def cpu_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash-attn's varlen semantics from SDPA's fused CPU kernel, segment by segment: query j of a
    segment of Lq queries and Lk keys sits at key position p = j + Lk - Lq (bottom-right alignment)
    and sees keys [p - left, p + right] (causal: right = 0; -1: unbounded); a query that sees no key
    gives 0. Each kernel call covers queries of one segment against only the keys they can see
    (`_tiles`), so the work and memory follow the documents and windows, never [L, L]. The
    max_seqlen arguments are unused: they are there for the interface."""
    left, right = window_size
    if causal:
        right = 0
    tiles = _tiles(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), left, right)
    return _CPUVarlen.apply(q, k, v, tiles, softmax_scale, left, right)


def _tiles(cq: list[int], ck: list[int], left: int, right: int) -> list[tuple]:
    """Kernel calls (a, b, lo, hi, is_causal, shift): queries [a, b) against keys [lo, hi) of the flat
    tensors; `shift` is the key position (from lo) of query a when a mask is needed, else None.
    A segment nothing limits is one call without a mask; the queries of a square causal segment that
    the window does not reach are one is_causal call; the rest go in blocks of CPU_BLOCK queries
    (at most the window) against the keys their window covers, with a small mask."""
    tiles = []
    for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        lq, lk = qe - qs, ke - ks
        off = lk - lq
        first = max(0, -off - right) if right >= 0 else 0  # queries [first, last) see some key
        last = min(lq, lk - off + left) if left >= 0 else lq
        if first >= last:
            continue
        start = first
        if right < 0 and (left < 0 or left >= lk):
            tiles.append((qs + first, qs + last, ks, ke, False, None))
            start = last
        elif right == 0 and off == 0:
            start = last if left < 0 else min(last, left + 1)
            tiles.append((qs, qs + start, ks, ks + start, True, None))
        block = CPU_BLOCK if left < 0 else min(CPU_BLOCK, max(64, left))
        for a in range(start, last, block):
            b = min(a + block, last)
            lo = 0 if left < 0 else max(0, a + off - left)
            hi = lk if right < 0 else min(lk, b + off + right)
            tiles.append((qs + a, qs + b, ks + lo, ks + hi, False, a + off - lo))
    return tiles


@functools.lru_cache(maxsize=32)
def _tile_mask(rows: int, cols: int, shift: int, left: int, right: int, dtype, device) -> torch.Tensor:
    """Additive mask of a block whose query r sits at key position r + shift. Inner blocks of a
    segment share one geometry, so a handful of masks serve every layer's forward and backward."""
    pos = torch.arange(rows, device=device)[:, None] + shift
    key = torch.arange(cols, device=device)[None, :]
    ok = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= key <= pos + right
    if left >= 0:
        ok &= key >= pos - left
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The kernel's log-sum-exp dtype, also used to add up dk / dv over overlapping tiles."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _CPUVarlen(torch.autograd.Function):
    """SDPA's fused CPU flash kernel and its backward, called per tile. Forward keeps each tile's
    log-sum-exp; backward calls the kernel's backward with the same tiles, writing dq per tile and
    adding dk / dv of overlapping key ranges into one fp32 buffer. Differentiating slices of q, k, v
    through autograd instead would materialize a full-size gradient per tile."""

    @staticmethod
    def forward(ctx, q, k, v, tiles, scale, left, right):
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, total, D] views
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        lse = q.new_full((1, q.shape[1], q.shape[0]), float("-inf"), dtype=_accumulation(q.dtype))
        out4 = out.transpose(0, 1)[None]
        for a, b, lo, hi, is_causal, shift in tiles:
            mask = None if shift is None else _tile_mask(b - a, hi - lo, shift, left, right, q.dtype, q.device)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q4[:, :, a:b], k4[:, :, lo:hi], v4[:, :, lo:hi], 0.0, is_causal, attn_mask=mask, scale=scale
            )
            out4[:, :, a:b] = o
            lse[:, :, a:b] = l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.scale, ctx.left, ctx.right = tiles, scale, left, right
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        acc = _accumulation(k.dtype)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc)
        q4, k4, v4, o4, do4, dq4, dk4, dv4 = (t.transpose(0, 1)[None] for t in (q, k, v, out, dout, dq, dk, dv))
        for a, b, lo, hi, is_causal, shift in ctx.tiles:
            # The kernel's bf16 backward costs ~2 ms a call whatever the size (a 57-token segment: 2.6 ms,
            # 0.5 ms in fp32 with the casts) and wins only on large tiles, so small tiles run in fp32.
            dt = acc if (b - a) * (hi - lo) <= FP32_BACKWARD_PAIRS else q.dtype
            mask = None if shift is None else _tile_mask(b - a, hi - lo, shift, ctx.left, ctx.right, dt, q.device)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do4[:, :, a:b].to(dt), q4[:, :, a:b].to(dt), k4[:, :, lo:hi].to(dt), v4[:, :, lo:hi].to(dt),
                o4[:, :, a:b].to(dt), lse[:, :, a:b], 0.0, is_causal, attn_mask=mask, scale=ctx.scale,
            )
            dq4[:, :, a:b] = gq
            dk4[:, :, lo:hi] += gk
            dv4[:, :, lo:hi] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
