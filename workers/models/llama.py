"""Llama-family math (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA attention.

Only the resident part of a layer lives here; the FFN is computed by whoever
holds its neurons (dense matrix, naive flash read, or the sparse neuron cache),
so a decoder layer is: x = attention(l, x); x = x + ffn(ffn_input(l, x)).
"""
from __future__ import annotations

import torch

from protocol.store_format import ArchConfig
from workers.models.attention import KVCache
from workers.models.resident import embedding_rows, hold_resident, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaModel:
    def __init__(self, arch: ArchConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 resident_dtype: torch.dtype | None = None):
        self.arch = arch
        self.dtype = dtype
        self.w = hold_resident(weights, dtype, resident_dtype or dtype, device)
        self.lm_head = self.w["embed_tokens"] if arch.tie_word_embeddings else self.w["lm_head"]
        hd = arch.head_dim
        self.inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        self.scale = hd ** -0.5

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.w["embed_tokens"], token_ids, self.dtype)  # (B, T, d)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return angles.cos(), angles.sin()

    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                  slots: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) → x + attention(norm(x)), writing this step's keys/values into kv."""
        a, w, p = self.arch, self.w, f"layers.{layer}."
        batch, steps, _ = x.shape
        h = rms_norm(x, w[p + "attn_norm.weight"], a.norm_eps)
        q = linear(h, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"))  # (B, T, H*hd)
        k = linear(h, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"))  # (B, T, KV*hd)
        v = linear(h, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
        q = q.view(batch, steps, a.num_attention_heads, a.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(batch, steps, a.num_key_value_heads, a.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(batch, steps, a.num_key_value_heads, a.head_dim).transpose(1, 2)
        cos, sin = (t.to(q.dtype) for t in self._rope(positions))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = kv.attend(layer, q, k, v, slots, positions, self.scale)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(batch, steps, -1)  # (B, T, H*hd)
        return x + linear(out, w[p + "o_proj.weight"])

    def ffn_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.w[f"layers.{layer}.ffn_norm.weight"], self.arch.norm_eps)

    def ffn_residual(self, layer: int, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        return x + ffn_out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.w["final_norm.weight"], self.arch.norm_eps)
        return linear(h, self.lm_head)  # (B, T, V)
