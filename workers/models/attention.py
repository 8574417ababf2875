"""Attention over a slotted KV cache, shared by every architecture family.

The cache holds `num_slots` sequences; a forward call processes a batch of B
sequences (given by their slots) each with T new tokens at its own positions,
so prompts of different lengths decode together and requests can join and
leave between steps (continuous batching).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_context: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_layers, num_slots, num_kv_heads, max_context, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, S, KV, C, hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, S, KV, C, hd)
        self.num_slots = num_slots
        self.max_context = max_context

    @staticmethod
    def bytes_needed(num_layers: int, num_slots: int, num_kv_heads: int, max_context: int, head_dim: int,
                     itemsize: int = 4) -> int:
        return 2 * num_layers * num_slots * num_kv_heads * max_context * head_dim * itemsize

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor, scale: float) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, KV, T, hd) for the new tokens at positions (B, T) → (B, H, T, hd)."""
        batch, heads, steps, _ = q.shape
        kv_heads = k.shape[1]
        # advanced indices (B,1) and (B,T) around a slice put (B, T) first: (B, T, KV, hd)
        self.keys[layer][slots[:, None], :, positions] = k.transpose(1, 2)
        self.values[layer][slots[:, None], :, positions] = v.transpose(1, 2)
        length = int(positions.max()) + 1
        keys = self.keys[layer][slots, :, :length]  # (B, KV, L, hd)
        values = self.values[layer][slots, :, :length]  # (B, KV, L, hd)
        key_positions = torch.arange(length, device=q.device)  # (L,)
        mask = key_positions[None, None, :] <= positions[:, :, None]  # (B, T, L): causal, own history only
        if kv_heads != heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, L, hd)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=scale)  # (B, H, T, hd)
