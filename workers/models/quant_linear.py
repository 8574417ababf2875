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
- q8_0 (the demo's tied embedding/head) → `Int8RowMatrix`: int8 with one
  bfloat16 scale per row, multiplied with `_weight_int8pack_mm`. The int8
  kernel scales per output row, not per 32-weight block, so the blocks are
  re-scaled once at load (the added error is reported); summing one call per
  block is much slower (docs/benchmarks.md), and a float16 copy holds twice the bytes.

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
# weights per (scale, zero) of a 4-bit head sketch: 64 halves the scales' bytes of 32 (1.7 MiB on the demo's
# head, which holds whole FFN layers below the model) for perplexity +2.1/+2.7% against +1.4/+2.9% on two texts
# (docs/benchmarks.md, stop 34); the kernel takes groups of 32 to 256
SKETCH_GROUP_WEIGHTS = 64
SKETCH_KIND = "int4_sketch"  # held_matrix_bytes' name for a 4-bit sketch (Int4Matrix.fitted_from_chunks)


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
    """(d (out, G) float32, m (out, G) float32 or None, q (out, in)): the fields of each block.
    4-bit q are uint8 0..15 (weight j of a block: low nibble of byte j for j < 16, high nibble of byte
    j - 16); 8-bit q are int8 -128..127. Byte-wide ops throughout: a layer's rows decode in a few ms."""
    out, inner = blocks.shape
    groups = inner // BLOCK_WEIGHTS
    raw = blocks.raw.reshape(out, groups, BLOCK_BYTES[blocks.kind])  # (out, G, block bytes)
    d = raw[..., 0:2].contiguous().view(torch.float16).reshape(out, groups).float()  # (out, G)
    if blocks.kind == "q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).reshape(out, inner)  # (out, in)
        return d, None, q
    m = None
    if blocks.kind == "q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).reshape(out, groups).float()  # (out, G)
    qs = raw[..., -16:]  # (out, G, 16)
    q = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(out, inner)  # (out, in) uint8
    return d, m, q


def pack_int4_tiles(q: torch.Tensor) -> torch.Tensor:
    """q (R, K) uint8 0..15, R a multiple of 64 → (R, K/2) uint8 in torch's CPU int4 packed layout, the
    same bytes as `_convert_weight_to_int4pack_for_cpu` (checked in tests) at byte width: inside a tile of
    64 rows, byte k*32 + n%32 holds weight k of row n (low nibble) and of row n + 32 (high nibble)."""
    rows, inner = q.shape
    tiles = q.reshape(rows // INT4_TILE_ROWS, 2, 32, inner)  # (T, halves, 32, K)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).transpose(1, 2).contiguous().reshape(rows, inner // 2)


DEQUANTIZE_CHUNK_ROWS = 4096  # rows decoded at a time: the float32 temporaries stay a few MiB, not 3 x the matrix
REQUANTIZE_CHUNK_ROWS = 1024  # rows re-rounded at a time (Int8RowMatrix, a 4-bit head): small load transients


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
        zero = torch.zeros_like(d) if m is None else m + 8 * d  # (out, G)
        self._allocate(blocks.shape, BLOCK_WEIGHTS)
        self._put(0, q, d, zero)

    @classmethod
    def fitted_from_chunks(cls, kind: str, shape: tuple[int, int], chunks,
                           group_weights: int = SKETCH_GROUP_WEIGHTS) -> "Int4Matrix":
        """A 4-bit sketch of a matrix of another kind (a q8_0 head held in ~56% of its bytes), from (first row,
        raw blocks) chunks whose first rows are multiples of INT4_TILE_ROWS: each chunk is dequantized and
        fitted to 4 bits, a (scale, zero) per group_weights (fit_int4_groups), as it arrives, so the stored
        blocks are never all in memory. `fit_max_abs_error` is the largest weight error the fit made."""
        matrix = cls.__new__(cls)
        matrix._allocate(shape, group_weights)
        matrix.fit_max_abs_error = 0.0
        for start, raw in chunks:
            for first in range(0, len(raw), REQUANTIZE_CHUNK_ROWS):  # float32 temporaries of ~2 MiB each
                part = raw[first:first + REQUANTIZE_CHUNK_ROWS]
                w = dequantize(QuantizedBlocks(kind, part, (len(part), shape[1])))  # (r, in)
                q, scale, zero, error = fit_int4_groups(w, group_weights)
                matrix._put(start + first, q, scale, zero)
                matrix.fit_max_abs_error = max(matrix.fit_max_abs_error, error)
        return matrix

    def _allocate(self, shape: tuple[int, int], group_weights: int) -> None:
        out, inner = shape
        if inner % group_weights:
            raise ValueError(f"a 4-bit matrix of rows of {inner} weights cannot have groups of {group_weights}")
        rows = out + (-out % INT4_TILE_ROWS)  # padded rows keep scale and zero 0: they multiply to 0
        self.shape = (out, inner)
        self.group_weights = group_weights  # weights per (scale, zero)
        self.packed = torch.zeros((rows, inner // 2), dtype=torch.uint8)  # (out + pad, in / 2)
        self.scales_zeros = torch.zeros((inner // group_weights, rows, 2), dtype=torch.bfloat16)  # (G, out+pad, 2)

    def _put(self, start: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rows start.. of the matrix: q (r, in) uint8 0..15, scale and zero (r, G); start a multiple of
        INT4_TILE_ROWS (a chunk ending short of a tile is padded with q = 8)."""
        rows = q.shape[0]
        padded = -rows % INT4_TILE_ROWS
        if padded:
            q = torch.cat((q, torch.full((padded, q.shape[1]), 8, dtype=q.dtype)))
        self.packed[start:start + rows + padded] = pack_int4_tiles(q)
        self.scales_zeros[:, start:start + rows] = torch.stack((scale, zero), dim=-1).transpose(0, 1).bfloat16()

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
        w = (q.reshape(len(flat_ids), -1, self.group_weights) - 8) * scale.T[..., None] + zero.T[..., None]  # (n, G, g)
        return w.reshape(*ids.shape, inner).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → x @ W.T (..., out) in x's dtype."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_weights, self.scales_zeros)
        return y[:, : self.shape[0]].to(x.dtype).reshape(*x.shape[:-1], self.shape[0])  # (..., out)


class Int8RowMatrix:
    """q8_0 blocks held as int8 with one scale per output row, multiplied by `_weight_int8pack_mm`.

    The CPU int8 kernel scales per output row, not per 32-weight block, so the blocks are re-scaled once at
    load: each row's scale is max|w|/127 rounded up to a bfloat16 value (the kernel takes bfloat16 scales,
    so the scale itself is exact) and each weight is re-rounded to it. The largest error this adds is half
    a row step, reported by `requantize_max_abs_error`; docs/benchmarks.md has its perplexity cost and the
    alternatives measured (a float16 copy: twice the bytes; per-block int8 calls: far slower)."""

    def __init__(self, blocks: QuantizedBlocks):
        chunks = ((start, blocks.raw[start:start + DEQUANTIZE_CHUNK_ROWS])
                  for start in range(0, blocks.shape[0], DEQUANTIZE_CHUNK_ROWS))
        self._fill(blocks.kind, blocks.shape, chunks)

    @classmethod
    def from_chunks(cls, kind: str, shape: tuple[int, int], chunks) -> "Int8RowMatrix":
        """From (first row, raw blocks) chunks (e.g. StoredMatrixRows.block_chunks): the stored blocks are
        never all in memory at once."""
        matrix = cls.__new__(cls)
        matrix._fill(kind, shape, chunks)
        return matrix

    def _fill(self, kind: str, shape: tuple[int, int], chunks) -> None:
        out, inner = shape
        self.shape = (out, inner)
        self.q = torch.empty(out, inner, dtype=torch.int8)  # (out, in)
        self.scales = torch.empty(out, dtype=torch.bfloat16)  # (out,)
        self.requantize_max_abs_error = 0.0
        for start, raw in chunks:
            for first in range(0, len(raw), REQUANTIZE_CHUNK_ROWS):  # float32 temporaries of ~2 MiB each
                part = raw[first:first + REQUANTIZE_CHUNK_ROWS]
                self._requantize(start + first, QuantizedBlocks(kind, part, (len(part), inner)))

    def _requantize(self, start: int, blocks: QuantizedBlocks) -> None:
        stop = start + blocks.shape[0]
        units = dequantize(blocks)  # (r, in) float32, divided in place into row steps below
        scale = _bfloat16_at_least(units.abs().amax(dim=1) / 127)  # (r,) exact in bfloat16
        step = scale.float().clamp_min(1e-30)[:, None]  # (r, 1)
        units.div_(step)
        q = torch.round(units).clamp_(-127, 127)  # (r, in)
        error = float(((q - units).abs().amax(dim=1, keepdim=True) * step).max())
        self.q[start:stop] = q.to(torch.int8)
        self.scales[start:stop] = scale
        self.requantize_max_abs_error = max(self.requantize_max_abs_error, error)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ids (...) → the rows (..., in) in dtype (an embedding lookup)."""
        flat_ids = ids.reshape(-1).long()  # (n,)
        w = self.q[flat_ids].float() * self.scales[flat_ids].float()[:, None]  # (n, in)
        return w.reshape(*ids.shape, self.shape[1]).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → x @ W.T (..., out) in x's dtype. The kernel's fast path takes bfloat16 activations
        and gives a bfloat16 product (2^-9 relative: a head's close candidates may swap; resident.StoreBackedMatrix
        recomputes a head's top outputs exactly)."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scales)  # (M, out)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])


def _bfloat16_at_least(values: torch.Tensor) -> torch.Tensor:
    """values (n,) float32 ≥ 0 → the smallest bfloat16 values ≥ them (a scale that never clips q at 127)."""
    rounded = values.bfloat16()
    low = rounded.float() < values
    bits = rounded.view(torch.int16)
    return torch.where(low, (bits + 1).view(torch.bfloat16), rounded)


FIT_ROUNDS = 3  # least-squares refits of a 4-bit group's scale and zero (the error stops falling after ~2)


def fit_int4_groups(w: torch.Tensor, group_weights: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w (r, in) float32 → (q (r, in) uint8 0..15, scale (r, G), zero (r, G), max abs error): each group of
    group_weights weights as w ≈ (q - 8)·scale + zero, the int4 kernel's form, with scale and zero rounded to
    the bfloat16 the kernel holds. Starts from the group's range (Q4_1's rounding) and refits scale and zero by
    least squares to the rounded q, keeping per group whichever fit has the smaller squared error: closer to
    the weights than the range alone, which spends levels on a group's outliers."""
    rows, inner = w.shape
    groups = w.reshape(rows, inner // group_weights, group_weights)  # (r, G, g)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (r, G)
    scale = (high - low) / 15
    zero = low + 8 * scale

    def rounded(scale, zero):  # the kernel's bfloat16 (scale, zero), q for them, and the squared error per group
        scale, zero = scale.bfloat16().float(), zero.bfloat16().float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round((groups - zero[..., None]) / safe[..., None]) + 8, 0, 15)  # (r, G, g)
        q = torch.where((scale == 0)[..., None], torch.full_like(q, 8), q)
        residual = (q - 8) * scale[..., None] + zero[..., None] - groups  # (r, G, g)
        return q, scale, zero, residual.square().sum(dim=-1)

    best_q, best_scale, best_zero, best_error = rounded(scale, zero)
    q = best_q
    for _ in range(FIT_ROUNDS):
        q_mean = q.mean(dim=-1, keepdim=True)  # (r, G, 1)
        centred = q - q_mean
        variance = centred.square().sum(dim=-1)  # (r, G)
        slope = (centred * groups).sum(dim=-1) / variance.clamp_min(1e-12)
        slope = torch.where(variance > 0, slope, best_scale)
        intercept = groups.mean(dim=-1) - slope * q_mean[..., 0]  # w ≈ slope·q + intercept
        q, scale, zero, error = rounded(slope, intercept + 8 * slope)
        better = error < best_error
        best_q = torch.where(better[..., None], q, best_q)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_error = torch.minimum(error, best_error)
    fitted = (best_q - 8) * best_scale[..., None] + best_zero[..., None]  # (r, G, g)
    max_error = float((fitted - groups).abs().max()) if w.numel() else 0.0
    return best_q.to(torch.uint8).reshape(rows, inner), best_scale, best_zero, max_error


HeldMatrix = Int4Matrix | Int8RowMatrix


def held_matrix_bytes(kind: str, shape: tuple[int, int]) -> int:
    """Bytes hold_quantized holds for a (out, in) matrix of kind (SKETCH_KIND: a 4-bit sketch's), known before
    loading it."""
    out, inner = shape
    groups = inner // (SKETCH_GROUP_WEIGHTS if kind == SKETCH_KIND else BLOCK_WEIGHTS)
    if kind == "q8_0":
        return out * inner + out * 2  # int8 + a bfloat16 scale per row
    rows = out + (-out % INT4_TILE_ROWS)
    return rows * inner // 2 + groups * rows * 2 * 2  # nibbles, bfloat16 (scale, zero)


def hold_quantized(blocks: QuantizedBlocks, compute_dtype: torch.dtype, device: str) -> HeldMatrix | torch.Tensor:
    """The kernel-ready form of a quantized matrix on device (a GPU gets it dequantized to compute_dtype)."""
    if torch.device(device).type != "cpu":
        return dequantize(blocks, compute_dtype).to(device)
    return Int8RowMatrix(blocks) if blocks.kind == "q8_0" else Int4Matrix(blocks)


def held_bytes(matrix: HeldMatrix | torch.Tensor) -> int:
    """Bytes a held matrix takes in memory."""
    return matrix.nbytes
