"""Context parallelism (`parallel.cp=N`, `parallel.cp_impl=allgather|ulysses`): the packed sequence
is split along its length over the N ranks of a cp group, and attention is made to cross ranks.

Load balancing: the sequence is cut into 2N equal chunks and rank r holds chunks r and 2N-1-r, one
cheap (early) and one expensive (late) chunk under the causal mask, so every rank does the same work.

Whatever needs the whole sequence is computed before it is split (`shard_batch`): global position
ids, the document mask, next-token and MTP targets, the next input ids. Each image goes through the
vision tower once, on one rank, when the model's forward starts (a pre-forward hook, so FSDP2 and
ZeRO-3 have gathered the tower's weights); the merged features are all-gathered (their gradients
flow back to that rank) and each rank keeps the rows of its own image tokens.

Attention (`apply_context_parallel` swaps `attention_fn` on every decoder attention module, trunk
and MTP; the vision tower is untouched). Both methods run every kernel (`model.attn_impl` sdpa,
eager, flex, flash); the masks and segments come from this rank's `ContextParallelMaskSpec`, whose
query indices are global positions, so what flash and flex receive is computed by
`model.attention` from indices, the same code on CPU and GPU:
- allgather (Llama 3's method for document masks). Global layers all-gather K and V (backward
  reduce-scatters their gradients to the owners) and attend this rank's queries to every key.
  Sliding-window layers need only the window - 1 tokens before each chunk: those are sent point to
  point by the rank(s) holding the preceding chunk(s), and each chunk attends to [halo, chunk].
  With flash, each chunk's share of a document is one varlen segment against that document's keys
  up to the chunk's end (sliding layers: from the window's start), all segments in one call; with
  flex, the block mask and mask_mod read the chunks' global positions.
- ulysses (DeepSpeed's DistributedAttention): an all-to-all turns [sequence / N, all heads] into
  [whole sequence, heads / N], attention runs over the whole sequence in global order (plain packed
  attention: one flash segment per document), and a second all-to-all turns it back. The query heads
  must divide by N; KV heads are replicated up to lcm(kv heads, N) when they do not divide.

The loss: `cp_loss` sums loss sums and token counts over the cp group; summing each rank's gradients
over the cp group then gives the gradient of the unsharded loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from model.attention import MaskSpec, attention
from model.text import Attention
from model.vlm import ShardInputs, prepare_inputs

IMPLS = ("allgather", "ulysses")


def chunk_owner(chunk: int, cp: int) -> tuple[int, int]:
    """(rank, slot) that holds global chunk `chunk` of 2 * cp: rank r holds chunk r in slot 0 and
    chunk 2cp-1-r in slot 1."""
    return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)


def local_token_index(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global indices of the tokens rank `rank` holds, in its local order."""
    if length % (2 * cp):
        raise ValueError(
            f"context parallelism splits the sequence into 2 * parallel.cp = {2 * cp} equal chunks, but the "
            f"packed length is {length}: set data.seq_len to a multiple of {2 * cp} (the packer pads the rest "
            f"of a row with a padding document)"
        )
    c = length // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)]).to(device)


@dataclass
class ContextParallelMaskSpec(MaskSpec):
    """This rank's queries (its two chunks: global token indices, document ids) against the whole
    sequence's keys, plus the whole-sequence spec and the chunk layout the attention needs."""

    whole: Optional[MaskSpec] = None
    cp: int = 1
    rank: int = 0

    def prepare(self, impl: str, windows) -> "ContextParallelMaskSpec":
        """Nothing to build ahead: the context-parallel attention builds its per-chunk specs itself,
        outside compiled graphs (it runs under torch.compiler.disable, see apply_context_parallel)."""
        return self

    @property
    def chunk(self) -> int:
        return self.k_idx.shape[1] // (2 * self.cp)

    @property
    def chunks(self) -> tuple[int, int]:
        return self.rank, 2 * self.cp - 1 - self.rank

    def halo_plan(self, window: int):
        """For a sliding window: each chunk needs the window - 1 tokens before it, that is the last
        `span` tokens of each of the `depth` chunks before it. Returns (span, recvs, sends) with
        recvs = [(slot, source chunk)] and sends = [(slot, destination chunk)]."""
        key = ("cp_halo_plan", window)
        if key not in self._cache:
            need, c, n = window - 1, self.chunk, 2 * self.cp
            span, depth = min(need, c), -(-need // c)
            recvs, sends = [], []
            for slot, j in enumerate(self.chunks):
                recvs += [(slot, p) for p in range(max(j - depth, 0), j)]
                sends += [(slot, q) for q in range(j + 1, min(j + depth, n - 1) + 1)]
            self._cache[key] = span, recvs, sends
        return self._cache[key]

    def sliding_spec(self, slot: int, window: int) -> MaskSpec:
        """Queries of one local chunk against [halo, the chunk itself]."""
        key = ("cp_sliding", slot, window)
        if key not in self._cache:
            span, recvs, _ = self.halo_plan(window)
            c, j = self.chunk, self.chunks[slot]
            keys = [torch.arange((p + 1) * c - span, (p + 1) * c) for s, p in recvs if s == slot]
            k_idx = torch.cat(keys + [torch.arange(j * c, (j + 1) * c)]).to(self.k_idx.device)
            rows = slice(slot * c, (slot + 1) * c)
            B = self.q_idx.shape[0]
            self._cache[key] = MaskSpec(
                self.q_idx[:, rows], k_idx.expand(B, -1), self.q_doc[:, rows], self.k_doc[:, k_idx], self.causal
            )
        return self._cache[key]

    def gather_order(self) -> torch.Tensor:
        """Global index of every token in rank-major order (the order an all-to-all gathers them in)."""
        key = "cp_order"
        if key not in self._cache:
            L = self.k_idx.shape[1]
            order = [local_token_index(L, self.cp, r) for r in range(self.cp)]
            self._cache[key] = torch.cat(order).to(self.k_idx.device)
        return self._cache[key]


# torch 2.13 renamed all_gather_tensor_autograd (now deprecated) to all_gather_single_autograd; torch 2.11,
# the GPU machine's, has only the former.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `x`, in rank order; backward reduce-scatters the gradients to their owners.
    (torch.distributed.nn.functional.all_gather does the same but is deprecated.)"""
    gathered = _all_gather_autograd(x.contiguous(), 0, group)
    return list(gathered.view(dist.get_world_size(group), *x.shape).unbind(0))


# --- sharding the batch ---------------------------------------------------------------------------


def _field(batch, name):
    return batch.get(name) if isinstance(batch, Mapping) else getattr(batch, name, None)


def shard_batch(model, batch, cp_group) -> tuple[torch.Tensor, ShardInputs]:
    """This rank's input ids [B, L / cp] and ShardInputs, from a packed batch (a data.packing.Batch,
    or any object or mapping with input_ids, labels, position_ids, cu_seqlens, pixel_values,
    image_grid_thw). Call `model(input_ids, shard=shard)` next, with `shard` by keyword: this rank's
    images go through the vision tower when that forward starts (see `_run_vision_tower`)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    if not getattr(model, "_cp_vision_hook", False):
        raise RuntimeError("shard_batch: call apply_context_parallel(model, cp_group, impl) first")
    input_ids = _field(batch, "input_ids")
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, L = input_ids.shape
    idx = local_token_index(L, cp, rank, input_ids.device)
    whole = prepare_inputs(
        input_ids, _field(batch, "labels"), _field(batch, "cu_seqlens"), _field(batch, "position_ids")
    )
    ws = whole.mask_spec
    spec = ContextParallelMaskSpec(
        ws.q_idx[:, idx], ws.k_idx, ws.q_doc[:, idx], ws.k_doc, ws.causal, whole=ws, cp=cp, rank=rank
    )

    def local(t):
        return None if t is None else t[:, idx]

    pixel_values = _field(batch, "pixel_values")
    features = None
    if pixel_values is not None:
        features = ImageShard(input_ids, idx, pixel_values, _field(batch, "image_grid_thw"), cp_group)
    shard = ShardInputs(
        position_ids=local(whole.position_ids), mask_spec=spec, targets=local(whole.targets),
        mtp_targets=local(whole.mtp_targets), next_input_ids=local(whole.next_input_ids), image_features=features,
    )
    return input_ids[:, idx], shard


def _assign_images(patches: list[int], cp: int) -> list[int]:
    """Owner rank of each image: largest first to the least-loaded rank (same answer on every rank)."""
    load, owner = [0] * cp, [0] * len(patches)
    for i in sorted(range(len(patches)), key=lambda i: -patches[i]):
        r = min(range(cp), key=lambda r: load[r])
        owner[i], load[r] = r, load[r] + patches[i]
    return owner


@dataclass
class ImageShard:
    """Stands in for ShardInputs.image_features until the model's forward starts; then
    `_run_vision_tower` replaces it with the features of this rank's image tokens. Running the tower
    inside the forward is what lets FSDP2 and ZeRO-3 gather its weights as they do without cp."""

    input_ids: torch.Tensor  # [B, L], the whole packed batch
    idx: torch.Tensor  # this rank's token indices
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    group: object

    def features(self, model) -> torch.Tensor:
        """Each image runs on one rank (balanced by patches); the merged features are all-gathered
        (gradients go back to that rank) and this rank keeps the rows of its own image tokens."""
        cp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        merge = model.cfg.vision_config.spatial_merge_size
        patches = self.grid_thw.prod(-1).tolist()
        tokens = [p // merge**2 for p in patches]
        owner = _assign_images(patches, cp)
        starts = [0]
        for p in patches:
            starts.append(starts[-1] + p)
        mine = [i for i in range(len(patches)) if owner[i] == rank]
        if mine:
            pixels = torch.cat([self.pixel_values[starts[i] : starts[i + 1]] for i in mine])
            features = model.visual(pixels, self.grid_thw[mine])
        else:  # still run the tower, so that every rank runs the same collectives (FSDP2, ZeRO-3)
            blank = model._blank_image_features()
            features = blank[:0] + 0.0 * blank.sum()
        rows = max(sum(n for n, r in zip(tokens, owner) if r == q) for q in range(cp))
        padded = torch.cat([features, features.new_zeros(rows - features.shape[0], features.shape[1])])
        gathered = all_gather(padded, self.group)
        offset, pieces = [0] * cp, []
        for n, r in zip(tokens, owner):  # images back in order of appearance
            pieces.append(gathered[r][offset[r] : offset[r] + n])
            offset[r] += n
        all_features = torch.cat(pieces)
        is_image = self.input_ids == model.cfg.image_token_id
        if int(is_image.sum()) != all_features.shape[0]:
            raise ValueError(
                f"image tokens and image features do not match: {int(is_image.sum())} tokens, "
                f"{all_features.shape[0]} features"
            )
        row_of_token = (is_image.reshape(-1).cumsum(0) - 1).view(is_image.shape)
        return all_features[row_of_token[:, self.idx][is_image[:, self.idx]]]


def _run_vision_tower(model, args, kwargs):
    """Forward pre-hook of the model: turn an ImageShard into this rank's image features. FSDP2's
    own pre-forward hook runs first (it is prepended), so the tower's weights are gathered."""
    shard = kwargs.get("shard")
    if shard is None or not isinstance(shard.image_features, ImageShard):
        return None
    return args, {**kwargs, "shard": replace(shard, image_features=shard.image_features.features(model))}


# --- distributed attention ------------------------------------------------------------------------


def _p2p(group, sends: list, recvs: list) -> None:
    """sends / recvs: (rank in group, tag, tensor); recv tensors are filled in place."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=r, tag=tag) for r, tag, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=r, tag=tag) for r, tag, t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _HaloExchange(torch.autograd.Function):
    """tails [2, B, H, span, D] (the last `span` tokens of this rank's two chunks) -> one piece per
    entry of the halo plan's recvs, taken locally or received from the rank holding that chunk.
    Backward sends each piece's gradient back to the rank it came from."""

    @staticmethod
    def forward(ctx, tails, spec: ContextParallelMaskSpec, window: int, group):
        _, recvs, sends = spec.halo_plan(window)
        ctx.spec, ctx.window, ctx.group = spec, window, group
        cp, rank, chunks = spec.cp, spec.rank, spec.chunks
        pieces, incoming, outgoing = [], [], []
        for slot, p in recvs:
            src, src_slot = chunk_owner(p, cp)
            if src == rank:
                pieces.append(tails[src_slot].clone())
            else:
                pieces.append(torch.empty_like(tails[0]))
                incoming.append((src, p * 2 * cp + chunks[slot], pieces[-1]))
        for slot, q in sends:
            dst, _ = chunk_owner(q, cp)
            if dst != rank:
                outgoing.append((dst, chunks[slot] * 2 * cp + q, tails[slot].contiguous()))
        _p2p(group, outgoing, incoming)
        return tuple(pieces)

    @staticmethod
    def backward(ctx, *grads):
        spec, window = ctx.spec, ctx.window
        _, recvs, sends = spec.halo_plan(window)
        cp, rank, chunks = spec.cp, spec.rank, spec.chunks
        grad_tails = grads[0].new_zeros((2, *grads[0].shape))
        outgoing, incoming = [], []
        for (slot, p), g in zip(recvs, grads):
            src, src_slot = chunk_owner(p, cp)
            if src == rank:
                grad_tails[src_slot] += g
            else:
                outgoing.append((src, p * 2 * cp + chunks[slot], g.contiguous()))
        for slot, q in sends:
            dst, _ = chunk_owner(q, cp)
            if dst != rank:
                incoming.append((dst, chunks[slot] * 2 * cp + q, torch.empty_like(grad_tails[0]), slot))
        _p2p(ctx.group, outgoing, [(r, tag, t) for r, tag, t, _ in incoming])
        for _, _, t, slot in incoming:
            grad_tails[slot] += t
        return grad_tails, None, None, None


def sliding_window_attention(q, k, v, spec: ContextParallelMaskSpec, group, *, scale, window, impl="sdpa"):
    """Sliding-window attention of this rank's two chunks; only the window - 1 tokens before each
    chunk cross ranks (point to point), and each chunk attends to [halo, chunk] only."""
    c, hkv = spec.chunk, k.shape[1]
    kv = torch.cat([k, v], dim=1)
    span, recvs, _ = spec.halo_plan(window)
    pieces = ()
    if recvs:
        tails = torch.stack([kv[:, :, (s + 1) * c - span : (s + 1) * c] for s in (0, 1)])
        pieces = _HaloExchange.apply(tails, spec, window, group)
    out = []
    for slot in (0, 1):
        halo = [piece for (s, _), piece in zip(recvs, pieces) if s == slot]
        keys = torch.cat(halo + [kv[:, :, slot * c : (slot + 1) * c]], dim=2)
        out.append(
            attention(q[:, :, slot * c : (slot + 1) * c], keys[:, :hkv], keys[:, hkv:],
                      spec.sliding_spec(slot, window), scale=scale, window=window, impl=impl)
        )
    return torch.cat(out, dim=2)


def gathered_attention(q, k, v, spec: ContextParallelMaskSpec, group, *, scale, window=None, impl="sdpa"):
    """This rank's queries against the whole sequence's K/V, all-gathered (reduce-scattered in backward)."""
    c, hkv = spec.chunk, k.shape[1]
    parts = all_gather(torch.cat([k, v], dim=1), group)
    order = [chunk_owner(j, spec.cp) for j in range(2 * spec.cp)]
    kv = torch.cat([parts[r][:, :, s * c : (s + 1) * c] for r, s in order], dim=2)
    return attention(q, kv[:, :hkv], kv[:, hkv:], spec, scale=scale, window=window, impl=impl)


def _ulysses_local(q, k, v, spec: ContextParallelMaskSpec, *, scale, window, impl):
    """[B, L, heads / cp, D] in rank-major token order -> attention over the whole sequence."""
    order = spec.gather_order()
    back = torch.argsort(order)
    q, k, v = (t[:, back].transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v, spec.whole, scale=scale, window=window, impl=impl)
    return out.transpose(1, 2)[:, order]


def _deepspeed_distributed_attention(group):
    from deepspeed.sequence.layer import DistributedAttention

    from .engine import prepare_deepspeed

    prepare_deepspeed()
    # Inputs are [B, L / cp, H, D]: scatter the heads (dim 2), gather the sequence (dim 1).
    return DistributedAttention(_ulysses_local, group, scatter_idx=2, gather_idx=1)


def apply_context_parallel(model, cp_group, impl: str = "allgather"):
    """Make every decoder attention module (trunk and MTP) attend across the ranks of `cp_group`,
    and install the hook that runs this rank's images when the forward starts. Call it before
    FSDP2 / DeepSpeed wrap the model; then call `model(input_ids, shard=shard)` with the output of
    `shard_batch`. Returns the model."""
    if impl not in IMPLS:
        raise ValueError(f"parallel.cp_impl={impl!r}: expected allgather | ulysses")
    module = getattr(model, "module", model)  # a DeepSpeed engine
    if not getattr(module, "_cp_vision_hook", False):
        module.register_forward_pre_hook(_run_vision_tower, with_kwargs=True)
        module._cp_vision_hook = True
    cp = dist.get_world_size(cp_group)
    if cp == 1:
        return model
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError("apply_context_parallel: the model has no decoder attention modules")
    if impl == "ulysses":
        heads = layers[0].num_heads
        if heads % cp:
            raise ValueError(
                f"parallel.cp={cp} with parallel.cp_impl=ulysses needs the attention heads ({heads}) to divide "
                f"by parallel.cp; choose a parallel.cp that divides {heads} or use parallel.cp_impl=allgather"
            )
        fn = _ulysses_attention_fn(cp, _deepspeed_distributed_attention(cp_group))
    else:
        fn = _allgather_attention_fn(cp_group)
    # Collectives, host-side chunk plans and the specs' caches stay out of compiled blocks
    # (train.compile): a compiled decoder layer runs its projections and MLP compiled and this eagerly.
    fn = torch.compiler.disable(fn)
    for layer in layers:
        layer.attention_fn = fn
    return model


def _check_spec(spec):
    if not isinstance(spec, ContextParallelMaskSpec):
        raise RuntimeError(
            "this model runs with context parallelism (parallel.cp > 1): call it as "
            "model(input_ids, shard=shard) with (input_ids, shard) = shard_batch(model, batch, cp_group); "
            "generation with a KV cache is not context-parallel"
        )


def _allgather_attention_fn(group):
    def cp_attention(q, k, v, spec, *, scale, window=None, impl="sdpa"):
        _check_spec(spec)
        if window is not None and window < spec.k_idx.shape[1]:
            return sliding_window_attention(q, k, v, spec, group, scale=scale, window=window, impl=impl)
        return gathered_attention(q, k, v, spec, group, scale=scale, window=window, impl=impl)

    return cp_attention


def _ulysses_attention_fn(cp: int, distributed_attention):
    def cp_attention(q, k, v, spec, *, scale, window=None, impl="sdpa"):
        _check_spec(spec)
        # Each rank keeps heads / cp query heads and the KV heads they read: replicate KV heads up to
        # lcm(kv heads, cp) (which divides the query heads) so that GQA groups never straddle ranks.
        repeat = math.lcm(k.shape[1], cp) // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        out = distributed_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, spec,
            scale=scale, window=window, impl=impl,
        )
        return out.transpose(1, 2)

    return cp_attention


# --- loss -----------------------------------------------------------------------------------------


def cp_loss(out, cp_group, mtp_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward on this rank, the whole sequence's loss for logging). The first is this
    rank's share of lm_loss + mtp_loss_weight * mtp_loss with means over the cp group's label tokens,
    so that summing every rank's gradients over the cp group gives the unsharded gradient (an engine
    that averages gradients over a dp x cp mesh needs this loss multiplied by cp)."""
    has_mtp = out.mtp_loss_sum is not None
    zero = out.lm_loss_sum.new_zeros(())
    stats = torch.stack([
        out.lm_loss_sum.detach(), zero + out.lm_tokens,
        out.mtp_loss_sum.detach() if has_mtp else zero, zero + out.mtp_tokens,
    ])
    dist.all_reduce(stats, group=cp_group)
    lm_tokens, mtp_tokens = stats[1].clamp(min=1), stats[3].clamp(min=1)
    loss = out.lm_loss_sum / lm_tokens
    total = stats[0] / lm_tokens
    if has_mtp:
        loss = loss + mtp_loss_weight * out.mtp_loss_sum / mtp_tokens
        total = total + mtp_loss_weight * stats[2] / mtp_tokens
    return loss, total
