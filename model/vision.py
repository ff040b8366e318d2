"""Vision tower: Conv3d patch embedding, window/full attention blocks with axial 2D RoPE and GQA,
and the merger that turns each 2x2 patch group into one decoder token (Qwen2.5-VL structure)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MaskSpec, attention
from .config import VisionConfig
from .layers import GatedMLP, RMSNorm, apply_rope, vision_rope


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        self.qkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=True)
        self.proj = nn.Linear(q_dim, cfg.hidden_size, bias=True)
        self.attn_impl = "sdpa"

    def forward(self, x, cos, sin, spec: MaskSpec):
        n = x.shape[0]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q, k, v = (t.view(n, -1, self.head_dim) for t in (q, k, v))
        dtype = q.dtype
        cos, sin = cos[:, None], sin[:, None]
        q, k = apply_rope(q.float(), cos, sin).to(dtype), apply_rope(k.float(), cos, sin).to(dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = attention(q, k, v, spec, scale=self.head_dim**-0.5, impl=self.attn_impl)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x, cos, sin, spec: MaskSpec):
        x = x + self.attn(self.norm1(x), cos, sin, spec)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm -> concatenate each merge_size^2 group -> Linear -> GELU -> Linear to the decoder width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.group_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.group_dim, self.group_dim), nn.GELU(), nn.Linear(self.group_dim, cfg.out_hidden_size)
        )

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.group_dim))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches):
        # A Conv3d whose kernel equals its input is a matmul over the flattened patch.
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.view(w.shape[0], -1))


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the processor's order: merge x merge blocks, row-major."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        hw = torch.stack([hpos.transpose(1, 2).flatten(), wpos.transpose(1, 2).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def window_index(grid_thw: torch.Tensor, merge: int, window_patches: int):
    """Reorder merge units so that each window of window_patches x window_patches merge units is
    contiguous; returns (order of merge units, window length of each window in patches)."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        ph, pw = -gh % window_patches, -gw % window_patches
        idx = F.pad(idx, (0, pw, 0, ph), value=-1)
        nh, nw = (gh + ph) // window_patches, (gw + pw) // window_patches
        idx = idx.view(t, nh, window_patches, nw, window_patches).permute(0, 1, 3, 2, 4)
        idx = idx.reshape(t * nh * nw, window_patches * window_patches)
        counts = (idx >= 0).sum(-1)
        order.append(idx[idx >= 0] + offset)
        lengths.extend(c * merge * merge for c in counts.tolist() if c > 0)
        offset += t * gh * gw
    return torch.cat(order).to(grid_thw.device), lengths


def _segments_spec(lengths: list[int], device) -> MaskSpec:
    """Non-causal attention within each segment (a window, or a frame for the full-attention blocks):
    the varlen segments of the flash and flex kernels, and a dense mask only for sdpa / eager. The
    lengths are host ints, so neither the total nor the longest segment costs a device sync."""
    cu = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device)
    return MaskSpec.packed(cu, 1, sum(lengths), causal=False, max_seqlen=max(lengths))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.attn_impl = "sdpa"  # set with the blocks' (Exaone45.set_attn_impl)
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, C*T*p*p] (processor order), grid_thw [N, 3] -> [P / merge^2, out_hidden]."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size**2
        order, window_lengths = window_index(
            grid_thw, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        )
        frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        full_spec, window_spec = _segments_spec(frames, order.device), _segments_spec(window_lengths, order.device)
        for spec in (full_spec, window_spec):
            spec.prepare(self.attn_impl, [None])  # outside the (compiled) blocks

        def reorder(x):
            return x.reshape(-1, unit, x.shape[-1])[order].reshape(-1, x.shape[-1])

        x = reorder(self.patch_embed(pixel_values))
        cos, sin = vision_rope(patch_positions(grid_thw, cfg.spatial_merge_size), cfg.head_dim, cfg.rope_theta)
        cos, sin = reorder(cos), reorder(sin)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_spec if i in cfg.fullatt_block_indexes else window_spec)
        return self.merger(x)[torch.argsort(order)]
