"""Llama-family math (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA attention.

Only the resident part of a layer lives here; the FFN is computed by whoever
holds its neurons (dense matrix, naive flash read, or the sparse neuron cache),
so a decoder layer is: x = attention(l, x); x = x + ffn(ffn_input(l, x)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashllm.protocol.store_format import ArchConfig
from flashllm.workers.models.attention import KVCache, StepInputs
from flashllm.workers.models.resident import embedding_rows, fuse_projections, hold_resident, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # the same values as F.rms_norm's composite on the CPU in fewer ops: 61 norms a decode token, each ~6 µs
        # less (docs/benchmarks.md, stop 36)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])  # (..., 1)
        return x * mean_square.add_(eps).rsqrt_() * weight
    # one fused op that accumulates in float32: squared in float16, activations past 256 overflowed to inf
    # and the norm gave zeros on the GPU
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaModel:
    def __init__(self, arch: ArchConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                 resident_dtype: torch.dtype | None = None):
        self.arch = arch
        self.dtype = dtype
        weights = fuse_projections(weights, arch.num_hidden_layers)
        self.w = hold_resident(weights, dtype, resident_dtype or dtype, device)
        self.lm_head = self.w["embed_tokens"] if arch.tie_word_embeddings else self.w["lm_head"]
        hd = arch.head_dim
        self.inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        self.scale = hd ** -0.5

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.w["embed_tokens"], token_ids, self.dtype)  # (B, T, d)

    def step_inputs(self, slots: torch.Tensor, positions: torch.Tensor) -> StepInputs:
        """slots (B,), positions (B, T) → what every layer of this forward call shares, RoPE angles included."""
        step = StepInputs.make(slots, positions)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        step.rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        return step

    def attention(self, layer: int, x: torch.Tensor, step: StepInputs, kv: KVCache) -> torch.Tensor:
        """x (B, T, d) → x + attention(norm(x)), writing this step's keys/values into kv."""
        a, w, p = self.arch, self.w, f"layers.{layer}."
        batch, steps, _ = x.shape
        h = rms_norm(x, w[p + "attn_norm.weight"], a.norm_eps)
        heads, kv_heads = a.num_attention_heads, a.num_key_value_heads
        qkv = linear(h, w[p + "qkv_proj.weight"], w.get(p + "qkv_proj.bias"))  # (B, T, (H+2KV)*hd)
        qkv = qkv.view(batch, steps, heads + 2 * kv_heads, a.head_dim).transpose(1, 2)  # (B, H+2KV, T, hd)
        qk, v = qkv.split([heads + kv_heads, kv_heads], dim=1)  # (B, H+KV, T, hd), (B, KV, T, hd)
        cos, sin = step.rope
        qk = qk * cos + rotate_half(qk) * sin  # queries and keys rotated together
        q, k = qk.split([heads, kv_heads], dim=1)  # (B, H, T, hd), (B, KV, T, hd)
        out = kv.attend(layer, q, k, v, step, self.scale)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(batch, steps, -1)  # (B, T, H*hd)
        return x + linear(out, w[p + "o_proj.weight"])

    def ffn_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.w[f"layers.{layer}.ffn_norm.weight"], self.arch.norm_eps)

    def ffn_norm_affine(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias) the FFN input's norm applies after normalizing: (d,) each, None where it has none."""
        return self.w[f"layers.{layer}.ffn_norm.weight"], None

    def ffn_residual(self, layer: int, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        return x + ffn_out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.w["final_norm.weight"], self.arch.norm_eps)
        return linear(h, self.lm_head)  # (B, T, V)
