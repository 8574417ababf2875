"""Resident matrices held in the store's quantized blocks, multiplied by kernels that take them directly.

A quantized store keeps every matrix as GGUF-style blocks of 32 weights (see
protocol/quant_format.py). Dequantizing a whole matrix to float32 would hold
4-8x the stored bytes, so each kind is held in the layout of a CPU kernel that
multiplies it as it is (alternatives and figures: docs/benchmarks.md):

- q4_0 / q4_1 → `Int4Matrix`: the 4-bit values in torch's CPU int4 packed
  layout, one bfloat16 (scale, zero) pair per 32 weights, multiplied with
  `_weight_int4pack_mm_for_cpu` on bfloat16 activations (the only activation
  dtype it has a vectorised path for). The kernel's convention is
  w = (q - 8)·scale + zero, so Q4_0 (w = d·(q - 8)) is (d, 0) and Q4_1
  (w = d·q + m) is (d, m + 8d).
- q8_0 (the demo's tied embedding/head) → float16, dequantized once: exact to
  float16 rounding, and multiplied by the resident float16 path (float16 for a
  few rows, float32 tiles for a batch). The int8 kernel scales per output row,
  not per 32-weight block: summing one `_weight_int8pack_mm` per block, or one
  call over block-masked activations, measured 4-5x slower than a float32
  product for the 49152 x 576 head (docs/benchmarks.md), which would dominate a
  token. float16 holds 2 bytes a weight against the blocks' 1.06.

Both take x in any float dtype and give the product back in x's dtype. The
kernels take bfloat16 activations and scales and give bfloat16 products, so a
product's relative error is ~4e-3 at worst (bfloat16 has 8 significant bits).
Sending x as two bfloat16 rows (x_hi = bf16(x), x_lo = bf16(x - x_hi)) was
measured and dropped: it doubles the rows and leaves the error where it was,
since the bfloat16 scales and the bfloat16 output round as much. On a
GPU the matrix is dequantized once to the compute dtype instead (the CUDA
int4 kernels want another packing; resident matrices are small beside the FFN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_WEIGHTS = 32
QUANTIZED_KINDS = ("q4_0", "q4_1", "q8_0")
INT4_TILE_ROWS = 64  # the CPU int4 packing lays rows out in tiles of 64 (rows are padded to whole tiles)


@dataclass
class QuantizedBlocks:
    """A matrix as the store holds it: raw blocks, (out, bytes_per_row) uint8, of `kind` over `shape` (out, in)."""

    kind: str
    raw: torch.Tensor  # (out, bytes_per_row) uint8
    shape: tuple[int, int]

    def __post_init__(self):
        if self.kind not in QUANTIZED_KINDS:
            raise ValueError(f"quantized kind {self.kind!r} is not one of {', '.join(QUANTIZED_KINDS)}")
        out, inner = self.shape
        if inner % BLOCK_WEIGHTS:
            raise ValueError(f"a {self.kind} matrix needs rows of a multiple of {BLOCK_WEIGHTS} weights, got {inner}")
        expected = (out, inner // BLOCK_WEIGHTS * BLOCK_BYTES[self.kind])
        if tuple(self.raw.shape) != expected or self.raw.dtype != torch.uint8:
            raise ValueError(f"{self.kind} blocks of a {self.shape} matrix must be {expected} uint8, "
                             f"got {tuple(self.raw.shape)} {self.raw.dtype}")


BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def split_blocks(blocks: QuantizedBlocks) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(d (out, G) float32, m (out, G) float32 or None, q (out, in) int32): the fields of each block.
    4-bit q are 0..15 (weight j of a block: low nibble of byte j for j < 16, high nibble of byte j - 16);
    8-bit q are -128..127."""
    out, inner = blocks.shape
    groups = inner // BLOCK_WEIGHTS
    raw = blocks.raw.reshape(out, groups, BLOCK_BYTES[blocks.kind])  # (out, G, block bytes)
    d = raw[..., 0:2].contiguous().view(torch.float16).reshape(out, groups).float()  # (out, G)
    if blocks.kind == "q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).reshape(out, inner).int()  # (out, in)
        return d, None, q
    m = None
    if blocks.kind == "q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).reshape(out, groups).float()  # (out, G)
    qs = raw[..., -16:].int()  # (out, G, 16)
    q = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(out, inner)  # (out, in)
    return d, m, q


DEQUANTIZE_CHUNK_ROWS = 4096  # rows decoded at a time: the float32 temporaries stay a few MiB, not 3 x the matrix


def dequantize(blocks: QuantizedBlocks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole matrix (out, in) in dtype (the q8_0 embedding/head, the GPU, references in tests), decoded
    DEQUANTIZE_CHUNK_ROWS rows at a time into the result, so loading peaks near the result's own bytes."""
    out, inner = blocks.shape
    result = torch.empty((out, inner), dtype=dtype)  # (out, in)
    for start in range(0, out, DEQUANTIZE_CHUNK_ROWS):
        stop = min(start + DEQUANTIZE_CHUNK_ROWS, out)
        d, m, q = split_blocks(QuantizedBlocks(blocks.kind, blocks.raw[start:stop], (stop - start, inner)))
        grouped = q.reshape(stop - start, -1, BLOCK_WEIGHTS).float()  # (rows, G, 32)
        if blocks.kind == "q4_0":
            grouped = grouped - 8
        w = grouped * d[..., None] + (m[..., None] if m is not None else 0)  # (rows, G, 32)
        result[start:stop] = w.reshape(stop - start, inner)
    return result


class Int4Matrix:
    """q4_0/q4_1 blocks in torch's CPU int4 packed layout with bfloat16 (scale, zero) per 32 weights."""

    def __init__(self, blocks: QuantizedBlocks):
        d, m, q = split_blocks(blocks)
        out, inner = blocks.shape
        zero = torch.zeros_like(d) if m is None else m + 8 * d  # (out, G)
        padded = -out % INT4_TILE_ROWS
        if padded:  # rows of weight 0: q = 8 with zero 0
            q = torch.cat((q, torch.full((padded, inner), 8, dtype=q.dtype)))
            d = torch.cat((d, torch.zeros(padded, d.shape[1])))
            zero = torch.cat((zero, torch.zeros(padded, d.shape[1])))
        self.shape = (out, inner)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (out + pad, in / 2) uint8
        self.scales_zeros = torch.stack((d, zero), dim=-1).transpose(0, 1).contiguous().bfloat16()  # (G, out+pad, 2)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ids (...) → the dequantized rows (..., in) in dtype, unpacked from the tile layout (an embedding
        lookup): inside a 64-row tile, byte k*32 + n%32 holds weight k of row n, high nibble for n%64 >= 32."""
        flat_ids = ids.reshape(-1).long()  # (n,)
        inner = self.shape[1]
        base = (flat_ids // INT4_TILE_ROWS) * (INT4_TILE_ROWS * inner // 2) + flat_ids % 32  # (n,)
        packed_bytes = self.packed.view(-1)[base[:, None] + torch.arange(inner) * 32].int()  # (n, in)
        q = torch.where((flat_ids % INT4_TILE_ROWS >= 32)[:, None], packed_bytes >> 4, packed_bytes & 15)
        scale, zero = self.scales_zeros[:, flat_ids].float().unbind(-1)  # (G, n) each
        w = (q.reshape(len(flat_ids), -1, BLOCK_WEIGHTS) - 8) * scale.T[..., None] + zero.T[..., None]  # (n, G, 32)
        return w.reshape(*ids.shape, inner).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → x @ W.T (..., out) in x's dtype."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, BLOCK_WEIGHTS, self.scales_zeros)
        return y[:, : self.shape[0]].to(x.dtype).reshape(*x.shape[:-1], self.shape[0])  # (..., out)


HeldMatrix = Int4Matrix


def held_matrix_bytes(kind: str, shape: tuple[int, int]) -> int:
    """Bytes hold_quantized holds for a (out, in) matrix of kind, known before loading it."""
    out, inner = shape
    groups = inner // BLOCK_WEIGHTS
    if kind == "q8_0":
        return out * inner * 2  # float16
    rows = out + (-out % INT4_TILE_ROWS)
    return rows * inner // 2 + groups * rows * 2 * 2  # nibbles, bfloat16 (scale, zero)


def hold_quantized(blocks: QuantizedBlocks, compute_dtype: torch.dtype, device: str) -> HeldMatrix | torch.Tensor:
    """The kernel-ready form of a quantized matrix on device (a GPU gets it dequantized to compute_dtype)."""
    if torch.device(device).type != "cpu":
        return dequantize(blocks, compute_dtype).to(device)
    return dequantize(blocks, torch.float16) if blocks.kind == "q8_0" else Int4Matrix(blocks)


def held_bytes(matrix: HeldMatrix | torch.Tensor) -> int:
    """Bytes a held matrix takes in memory."""
    return matrix.nbytes
