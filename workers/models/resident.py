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

A quantized store's matrices arrive as QuantizedBlocks and are held in the
integer kernels' layouts instead (workers/models/quant_linear.py); `linear`
and `embedding_rows` take either form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashllm.workers.models.quant_linear import (
    Int4Matrix, QuantizedBlocks, held_matrix_bytes, hold_quantized,
)

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


def with_quantized_blocks(weights: dict) -> dict:
    """The store reader's QuantizedTensor matrices (blocks, kind, shape) as QuantizedBlocks, which the model
    holds in its kernels' layouts; every float tensor as it is."""
    return {name: QuantizedBlocks(t.kind, t.blocks, tuple(t.shape)) if hasattr(t, "blocks") else t
            for name, t in weights.items()}


def hold_resident(weights: dict, compute_dtype: torch.dtype, resident_dtype: torch.dtype, device: str) -> dict:
    """Float matrices in resident_dtype, vectors in compute_dtype, quantized blocks in their kernel's layout
    (they stay quantized whatever resident_dtype says), all on device."""
    def hold(t):
        if isinstance(t, tuple):
            return StackedMatrix([hold(part) for part in t])
        if isinstance(t, QuantizedBlocks):
            return hold_quantized(t, compute_dtype, device)
        return t.to(device=device, dtype=resident_dtype if t.dim() >= 2 else compute_dtype)

    return {name: hold(t) for name, t in weights.items()}


class StackedMatrix:
    """Matrices of different kinds stacked by output rows (q/k/v of a mixed-kind file): one product each."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, part) for part in self.parts], dim=-1)  # (..., sum(out))


def resident_held_bytes(shapes: dict[str, tuple[int, ...]], quantized: dict, resident_itemsize: int,
                        num_layers: int, device: str) -> int:
    """Bytes hold_resident will hold for tensors of these shapes (name → shape as stored; quantized: the
    manifest's name → kind, float shape): float tensors at resident_itemsize, quantized ones in their
    kernels' layouts (fused as fuse_projections fuses them) on a CPU, dequantized on a GPU."""
    if torch.device(device).type != "cpu":
        return sum(_elements(quantized[n].shape if n in quantized else s) for n, s in shapes.items()) * resident_itemsize
    blocks = {name: (info.kind, tuple(info.shape)) for name, info in quantized.items() if name in shapes}
    for layer in range(num_layers):
        names = [f"layers.{layer}.{part}_proj.weight" for part in ("q", "k", "v")]
        if all(name in blocks for name in names) and len({blocks[name][0] for name in names}) == 1:
            kind, inner = blocks[names[0]][0], blocks[names[0]][1][1]
            blocks[f"layers.{layer}.qkv_proj.weight"] = (kind, (sum(blocks.pop(n)[1][0] for n in names), inner))
    float_bytes = sum(_elements(shape) for name, shape in shapes.items() if name not in quantized) * resident_itemsize
    return float_bytes + sum(held_matrix_bytes(kind, shape) for kind, shape in blocks.values())


def _elements(shape) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def fuse_projections(weights: dict[str, torch.Tensor], num_layers: int, parts: tuple[str, ...] = ("q", "k", "v")
                     ) -> dict[str, torch.Tensor]:
    """Each layer's q/k/v projections (and biases) stacked into one `qkv_proj`: they multiply the same
    input, and one product is one kernel launch instead of three (on a GPU, decode is launch-bound)."""
    fused = dict(weights)
    for layer in range(num_layers):
        p = f"layers.{layer}."
        for kind in ("weight", "bias"):
            names = [f"{p}{part}_proj.{kind}" for part in parts]
            if not all(name in fused for name in names):
                continue
            tensors = [fused[name] for name in names]
            if all(isinstance(t, QuantizedBlocks) for t in tensors) and len({t.kind for t in tensors}) == 1:
                # same kind: the blocks of the stacked rows are the rows' blocks stacked
                fused[f"{p}qkv_proj.{kind}"] = QuantizedBlocks(
                    tensors[0].kind, torch.cat([t.raw for t in tensors]),
                    (sum(t.shape[0] for t in tensors), tensors[0].shape[1]))
            elif any(isinstance(t, QuantizedBlocks) for t in tensors):
                fused[f"{p}qkv_proj.{kind}"] = tuple(tensors)  # mixed kinds (Q4_K_M's v): one product each
            else:
                fused[f"{p}qkv_proj.{kind}"] = torch.cat(tensors)  # (sum(out), ...)
            for name in names:
                fused.pop(name)
    return fused


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias → (..., out) in x's dtype, whatever dtype weight is held in."""
    if isinstance(weight, (Int4Matrix, StackedMatrix)):
        out = weight.matmul(x)  # (..., out)
        return out + bias if bias is not None else out
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
    """table (V, d) in any dtype or quantized, token_ids (B, T) → (B, T, d) in compute_dtype."""
    if isinstance(table, Int4Matrix):
        return table.rows(token_ids, compute_dtype)  # only these rows are dequantized
    return table[token_ids].to(compute_dtype)
