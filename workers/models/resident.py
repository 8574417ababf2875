"""Resident weight matrices held in a narrower dtype than the one the model computes in.

On a CPU the model computes in float32 (exact, and fast in GEMM), but the
resident matrices (embeddings, attention, head) are the largest thing a small
memory budget must hold. Held in float16/bfloat16 they take half the bytes;
each product then picks the cheaper exact-enough path:

- decode-sized inputs (a few rows) are memory-bound: multiply in the storage
  dtype, which streams half the bytes (measured faster than float32 here) and
  rounds the inputs and outputs to it (about 4e-4 relative in float16);
- prefill/scoring-sized inputs are compute-bound and CPU half GEMM is slow
  (3-4x float32 here): upcast the matrix for this product, in vocabulary
  chunks for the head so the temporary stays small.

Vectors (norms, biases) stay in the compute dtype: they are tiny.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIDENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_PRODUCT_MAX_ROWS = 8  # at most this many input rows multiply in the storage dtype
UPCAST_CHUNK_ROWS = 8192  # output rows of a matrix upcast at a time (8192 × 576 float32 = 18.9 MB)


def resident_dtype_of(name: str | None, compute_dtype: torch.dtype) -> torch.dtype:
    """'float16' → torch.float16; None → compute_dtype. Raises ValueError naming the choices."""
    if name is None:
        return compute_dtype
    if name not in RESIDENT_DTYPES:
        raise ValueError(f"--resident-dtype {name!r} is not one of {', '.join(RESIDENT_DTYPES)}")
    return RESIDENT_DTYPES[name]


def hold_resident(weights: dict[str, torch.Tensor], compute_dtype: torch.dtype, resident_dtype: torch.dtype,
                  device: str) -> dict[str, torch.Tensor]:
    """Matrices in resident_dtype, vectors in compute_dtype, all on device."""
    return {name: t.to(device=device, dtype=resident_dtype if t.dim() >= 2 else compute_dtype)
            for name, t in weights.items()}


def fuse_projections(weights: dict[str, torch.Tensor], num_layers: int, parts: tuple[str, ...] = ("q", "k", "v")
                     ) -> dict[str, torch.Tensor]:
    """Each layer's q/k/v projections (and biases) stacked into one `qkv_proj`: they multiply the same
    input, and one product is one kernel launch instead of three (on a GPU, decode is launch-bound)."""
    fused = dict(weights)
    for layer in range(num_layers):
        p = f"layers.{layer}."
        for kind in ("weight", "bias"):
            names = [f"{p}{part}_proj.{kind}" for part in parts]
            if all(name in fused for name in names):
                fused[f"{p}qkv_proj.{kind}"] = torch.cat([fused.pop(name) for name in names])  # (sum(out), ...)
    return fused


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias → (..., out) in x's dtype, whatever dtype weight is held in."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows <= HALF_PRODUCT_MAX_ROWS:
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)  # (..., out)
    else:
        out = torch.cat([F.linear(x, weight[start:start + UPCAST_CHUNK_ROWS].to(x.dtype))
                         for start in range(0, weight.shape[0], UPCAST_CHUNK_ROWS)], dim=-1)  # (..., out)
    return out + bias if bias is not None else out


def embedding_rows(table: torch.Tensor, token_ids: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """table (V, d) in any dtype, token_ids (B, T) → (B, T, d) in compute_dtype."""
    return table[token_ids].to(compute_dtype)
