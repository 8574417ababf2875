"""Attention over a slotted KV cache, shared by every architecture family.

The cache holds `num_slots` sequences; a forward call processes a batch of B
sequences (given by their slots) each with T new tokens at its own positions,
so prompts of different lengths decode together and requests can join and
leave between steps (continuous batching).
"""
from __future__ import annotations

from dataclasses import dataclass

import math
import mmap

import torch
import torch.nn.functional as F


@dataclass
class StepInputs:
    """What every layer of one forward call shares, computed once per call rather than per layer.

    On a GPU each per-layer recomputation is a few kernel launches, and reading
    positions.max() back is a device sync; 30 layers made both add up."""

    slots: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B, T)
    length: int  # keys each sequence attends over: the largest position + 1
    mask: torch.Tensor  # (B, 1, T, L) bool: causal, own history only
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, 1, T, hd) for rotary models
    # on the CPU, per sequence (its KV slot, its own largest position + 1): attention runs one sequence at a
    # time (KVCache.attend); empty on a GPU
    own_keys: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def make(slots: torch.Tensor, positions: torch.Tensor) -> "StepInputs":
        length = int(positions.max()) + 1
        key_positions = torch.arange(length, device=positions.device)  # (L,)
        mask = key_positions[None, None, :] <= positions[:, :, None]  # (B, T, L)
        own_keys = tuple(zip(slots.tolist(), (positions.amax(dim=1) + 1).tolist())) \
            if positions.device.type == "cpu" else ()
        return StepInputs(slots, positions, length, mask[:, None], own_keys=own_keys)


def _zeros_untouched(shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, object]:
    """(zeros, the buffer that must outlive them) whose pages the process gets only where a position is written.

    On the CPU: an anonymous mapping (zero pages, nothing written; torch.zeros writes every byte) kept out of
    transparent huge pages, which would fault in 2 MiB around each layer's first positions (numpy asks for them
    for large arrays), so the KV cache costs memory for the context in use, not for max_context."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device), None
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, max(1, nbytes))
    if hasattr(buffer, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape), buffer


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_context: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_layers, num_slots, num_kv_heads, max_context, head_dim)
        self.keys, key_buffer = _zeros_untouched(shape, dtype, device)  # (L, S, KV, C, hd)
        self.values, value_buffer = _zeros_untouched(shape, dtype, device)  # (L, S, KV, C, hd)
        self._buffers = (key_buffer, value_buffer)  # the mappings under keys/values
        self.num_slots = num_slots
        self.max_context = max_context

    @staticmethod
    def bytes_needed(num_layers: int, num_slots: int, num_kv_heads: int, max_context: int, head_dim: int,
                     itemsize: int = 4) -> int:
        return 2 * num_layers * num_slots * num_kv_heads * max_context * head_dim * itemsize

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepInputs,
               scale: float) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, KV, T, hd) for the new tokens at step.positions (B, T) → (B, H, T, hd)."""
        slots, positions = step.slots, step.positions
        # advanced indices (B,1) and (B,T) around a slice put (B, T) first: (B, T, KV, hd)
        self.keys[layer][slots[:, None], :, positions] = k.transpose(1, 2)
        self.values[layer][slots[:, None], :, positions] = v.transpose(1, 2)
        gqa = k.shape[1] != q.shape[1]  # grouped-query heads share their key/value head inside the kernel
        if step.own_keys:
            # one product per sequence over its own keys: the CPU kernels round a batched product differently
            # by batch size and key length, so a sequence's tokens would depend on its neighbours (batch
            # invariance); each call here is what the sequence computes alone. A decode step's token sees all
            # of its own keys: no mask to apply (the same values, fewer ops)
            decode = q.shape[2] == 1
            outs = [F.scaled_dot_product_attention(
                q[b:b + 1], self.keys[layer][slot, :, :length][None], self.values[layer][slot, :, :length][None],
                attn_mask=None if decode else step.mask[b:b + 1, :, :, :length], scale=scale, enable_gqa=gqa)
                for b, (slot, length) in enumerate(step.own_keys)]  # B × (1, H, T, hd)
            return outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, H, T, hd)
        keys = self.keys[layer][slots, :, :step.length]  # (B, KV, L, hd)
        values = self.values[layer][slots, :, :step.length]  # (B, KV, L, hd)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, scale=scale,
                                              enable_gqa=gqa)  # (B, H, T, hd)
