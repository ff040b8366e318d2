"""EXAONE 4.0 decoder: post-norm layers (no pre-norm), QK-norm, GQA, hybrid attention where sliding
layers use RoPE and global layers use no positional encoding (NoPE); and the multi-token-prediction
(MTP) module laid out as the released checkpoint stores it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import MaskSpec, attention
from .config import SLIDING, TextConfig
from .layers import GatedMLP, RMSNorm, apply_rope


class KVCache:
    """Per-layer keys/values for generation, allocated once: global layers keep a slab of `capacity`
    slots (every token fed), sliding layers a ring of their window - 1 + `extra` + `step` slots
    (nothing further back is ever attended to again). Entries are addressed by slot, the token's
    index in its row, which the attention mask reads (MaskSpec), so a ring's order never matters.

    Before each step the caller sets `slots` and `valid` ([B, L_new]) of the tokens being fed. The
    first update of a layer (the prompt) attends over the prompt itself and stores its last entries;
    later ones (at most `step` tokens each) are written in place and attend over the stored ones.
    `extra` slots stay beyond the window so the last `extra` entries can be dropped (`truncate`).
    """

    def __init__(self, capacity: int, extra: int = 0, step: int = 2):
        self.capacity, self.extra, self.step = capacity, extra, step
        self.layers: dict[int, dict] = {}
        self.slots: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None

    def truncate(self, n: int) -> None:
        """Forget the last n entries of every layer (rejected speculative tokens)."""
        for entry in self.layers.values():
            for _ in range(n):
                entry["written"] -= 1
                entry["valid"][:, entry["written"] % entry["k"].shape[2]] = False

    def update(self, layer: int, k, v, window: Optional[int]):
        new = k.shape[2]
        entry = self.layers.get(layer)
        if entry is None:  # the prompt: attend over it as it is, keep what later steps can see
            size = self.capacity if window is None else min(self.capacity, max(window - 1, 0) + self.extra + self.step)
            B, H, _, D = k.shape
            entry = self.layers[layer] = {
                "k": k.new_zeros(B, H, size, D), "v": v.new_zeros(B, H, size, D),
                "slots": self.slots.new_full((B, size), -1), "valid": torch.zeros(B, size, dtype=torch.bool, device=k.device),
                "written": 0, "ring": window is not None}
            keep = min(new, size)
            self._write(entry, k[:, :, new - keep:], v[:, :, new - keep:], self.slots[:, new - keep:],
                        self.valid[:, new - keep:], new - keep)
            keys, values, slots, valid = k, v, self.slots, self.valid
        else:
            if window is not None and new > self.step:
                raise ValueError(f"KVCache: {new} tokens in one step; the sliding layers' ring takes at most {self.step}")
            self._write(entry, k, v, self.slots, self.valid, entry["written"])
            filled = entry["k"].shape[2] if window is not None else entry["written"]  # the slab's used part
            keys, values = entry["k"][:, :, :filled], entry["v"][:, :, :filled]
            slots, valid = entry["slots"][:, :filled], entry["valid"][:, :filled]
        zeros_q, zeros_k = torch.zeros_like(self.slots), torch.zeros_like(slots)
        return keys, values, MaskSpec(self.slots, slots, zeros_q, zeros_k, causal=True, k_valid=valid)

    @staticmethod
    def _write(entry: dict, k, v, slots, valid, start: int) -> None:
        """Entries start, start + 1, ... of the layer <- the given ones (modulo the size in a ring)."""
        size, n = entry["k"].shape[2], k.shape[2]
        if n > size or (not entry["ring"] and start + n > size):
            raise ValueError(f"KVCache: {start + n} tokens exceed its capacity of {size}")
        index = torch.arange(start, start + n, device=k.device) % size
        entry["k"][:, :, index], entry["v"][:, :, index] = k, v
        entry["slots"][:, index], entry["valid"][:, index] = slots, valid
        entry["written"] = start + n


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sliding = layer_type == SLIDING and cfg.sliding_window is not None
        self.window = cfg.sliding_window if self.sliding else None
        # transformers applies RoPE on sliding layers only, or on all layers when no window is set.
        self.use_rope = self.sliding or cfg.sliding_window is None
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.attn_impl = "sdpa"
        # Context parallelism replaces this with a function that gathers keys/values across ranks.
        self.attention_fn = attention

    def forward(self, x, rope, spec: Optional[MaskSpec], cache: Optional[KVCache] = None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, L, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, spec = cache.update(self.layer_id, k, v, self.window)
        out = self.attention_fn(q, k, v, spec, scale=self.head_dim**-0.5, window=self.window, impl=self.attn_impl)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_type, layer_id)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, rope, spec: MaskSpec, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(x, rope, spec, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class TextModel(nn.Module):
    """Embedding, decoder layers, final norm (the LM head lives on the full model)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.layer_types[i], i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn_impl = "sdpa"  # set with the layers' (Exaone45.set_attn_impl)
        self.windows = [cfg.sliding_window if t == SLIDING else None for t in cfg.layer_types[: cfg.num_hidden_layers]]

    def forward(self, h, rope, spec: MaskSpec, cache=None):
        if cache is None and spec is not None:
            spec.prepare(self.attn_impl, self.windows)  # outside the (compiled) layers
        for layer in self.layers:
            h = layer(h, rope, spec, cache)
        return self.norm(h)


class MTP(nn.Module):
    """Multi-token prediction: from the trunk's hidden state at t and the embedding of token t+1,
    one more decoder layer predicts token t+2 through the shared LM head.

    fc(concat(pre_fc_norm_embedding(embed(x[t+1])), pre_fc_norm_hidden(h[t]))) -> layers -> norm.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps=cfg.rms_norm_eps)
        first = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.layer_types[first + i], first + i) for i in range(cfg.num_nextn_predict_layers)
        )
        self.norm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.attn_impl = "sdpa"
        self.windows = [cfg.sliding_window if t == SLIDING else None
                        for t in cfg.layer_types[first: first + cfg.num_nextn_predict_layers]]

    def forward(self, hidden, next_embeds, rope, spec: MaskSpec, cache=None):
        if cache is None and spec is not None:
            spec.prepare(self.attn_impl, self.windows)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        for layer in self.layers:
            x = layer(x, rope, spec, cache)
        return self.norm(x)
