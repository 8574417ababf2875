"""OPT math (the paper's own family): LayerNorm, learned positions, biases, ReLU FFN.

Pre-LN (do_layer_norm_before, all OPT sizes but 350m) and post-LN are both
handled; learned positions are offset by 2 as in the original checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashllm.protocol.store_format import ArchConfig
from flashllm.workers.models.attention import KVCache, StepInputs
from flashllm.workers.models.resident import embedding_rows, fuse_projections, hold_resident, linear

OPT_POSITION_OFFSET = 2


class OptModel:
    def __init__(self, arch: ArchConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 resident_dtype: torch.dtype | None = None):
        self.arch = arch
        self.dtype = dtype
        weights = fuse_projections(weights, arch.num_hidden_layers)
        self.w = hold_resident(weights, dtype, resident_dtype or dtype, device)
        self.lm_head = self.w["embed_tokens"] if arch.tie_word_embeddings else self.w["lm_head"]
        self.scale = arch.head_dim ** -0.5

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.arch.norm_eps)

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = embedding_rows(self.w["embed_tokens"], token_ids, self.dtype)  # (B, T, proj)
        if "project_in" in self.w:
            x = linear(x, self.w["project_in"])  # (B, T, d)
        return x + embedding_rows(self.w["embed_positions"], positions + OPT_POSITION_OFFSET, self.dtype)

    def step_inputs(self, slots: torch.Tensor, positions: torch.Tensor) -> StepInputs:
        """slots (B,), positions (B, T) → what every layer of this forward call shares."""
        return StepInputs.make(slots, positions)

    def attention(self, layer: int, x: torch.Tensor, step: StepInputs, kv: KVCache) -> torch.Tensor:
        a, w, p = self.arch, self.w, f"layers.{layer}."
        batch, steps, _ = x.shape
        h = self._norm(p + "attn_norm", x) if a.do_layer_norm_before else x
        heads = a.num_attention_heads
        qkv = linear(h, w[p + "qkv_proj.weight"], w[p + "qkv_proj.bias"])  # (B, T, 3d)
        qkv = qkv.view(batch, steps, 3 * heads, a.head_dim).transpose(1, 2)  # (B, 3H, T, hd)
        q, k, v = qkv.split([heads, heads, heads], dim=1)  # (B, H, T, hd) each
        out = kv.attend(layer, q, k, v, step, self.scale)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(batch, steps, -1)  # (B, T, d)
        x = x + linear(out, w[p + "o_proj.weight"], w[p + "o_proj.bias"])
        return x if a.do_layer_norm_before else self._norm(p + "attn_norm", x)

    def ffn_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._norm(f"layers.{layer}.ffn_norm", x) if self.arch.do_layer_norm_before else x

    def ffn_norm_affine(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias) the FFN input's norm applies after normalizing; post-LN feeds the FFN unnormalized."""
        if not self.arch.do_layer_norm_before:
            return None, None
        return self.w[f"layers.{layer}.ffn_norm.weight"], self.w[f"layers.{layer}.ffn_norm.bias"]

    def ffn_residual(self, layer: int, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        x = x + ffn_out + self.w[f"layers.{layer}.ffn_down_bias"]
        return x if self.arch.do_layer_norm_before else self._norm(f"layers.{layer}.ffn_norm", x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.do_layer_norm_before:
            x = self._norm("final_norm", x)
        if "project_out" in self.w:
            x = linear(x, self.w["project_out"])  # (B, T, proj)
        return linear(x, self.lm_head)  # (B, T, V)

