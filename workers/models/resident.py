"""Resident weight matrices held in a narrower dtype than the one the model computes in.

On a CPU the model computes in float32 (exact, and fast in GEMM), but the
resident matrices (embeddings, attention, head) are the largest thing a small
memory budget must hold. Held in float16/bfloat16 they take half the bytes;
each product then picks the cheaper exact-enough path:

- decode-sized inputs (a few rows) are memory-bound: multiply in the storage
  dtype, which streams half the bytes and rounds the inputs and outputs to
  it (float16 keeps 11 significant bits);
- prefill/scoring-sized inputs are compute-bound and CPU half GEMM is slower
  than float32 GEMM: upcast the matrix for this product, in vocabulary
  chunks for the head so the temporary stays small.

Vectors (norms, biases) stay in the compute dtype: they are tiny.

A quantized store's matrices arrive as QuantizedBlocks and are held in the
integer kernels' layouts instead (workers/models/quant_linear.py); `linear`
and `embedding_rows` take either form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashllm.workers.models.quant_linear import (
    DEQUANTIZE_CHUNK_ROWS, SKETCH_KIND, Int4Matrix, Int8RowMatrix, QuantizedBlocks, held_matrix_bytes,
    hold_quantized,
)

EMBEDDING_NAME = "embed_tokens"
HEAD_NAME = "lm_head"
EXACT_TOP_OUTPUTS = 32  # a head's largest logits per row recomputed from the stored rows (StoreBackedMatrix)
# top_indices' group: torch's CPU topk works in a (value, index) buffer of the row's length, and one of a whole
# vocabulary (49,152 logits: 768 KiB) is past the fixed mmap threshold (workers/malloc_tuning), so every call
# paid an mmap, its page faults and a munmap; a group of 4,096 keeps that buffer at 64 KiB
TOP_GROUP_ELEMENTS = 4096
RESIDENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_STORE_DTYPES = ("float16", "bfloat16")
HALF_PRODUCT_MAX_ROWS = 8  # at most this many input rows multiply in the storage dtype
UPCAST_CHUNK_ROWS = 8192  # output rows of a matrix upcast at a time (8192 × 576 float32 = 18.9 MB)


def resident_dtype_of(name: str | None, compute_dtype: torch.dtype, store_dtype: str | None = None) -> torch.dtype:
    """'float16' → torch.float16; None → the store's precision when it is half (a float16/bfloat16 store's
    matrices stay as stored, multiplied as `linear` says), else compute_dtype. Raises ValueError naming the
    choices."""
    if name is None:
        return RESIDENT_DTYPES.get(store_dtype, compute_dtype) if store_dtype in HALF_STORE_DTYPES else compute_dtype
    if name not in RESIDENT_DTYPES:
        raise ValueError(f"--resident-dtype {name!r} is not one of {', '.join(RESIDENT_DTYPES)}")
    return RESIDENT_DTYPES[name]


def with_quantized_blocks(weights: dict) -> dict:
    """The store reader's QuantizedTensor matrices (blocks, kind, shape) as QuantizedBlocks, which the model
    holds in its kernels' layouts; every float tensor as it is."""
    return {name: QuantizedBlocks(t.kind, t.blocks, tuple(t.shape)) if hasattr(t, "blocks") else t
            for name, t in weights.items()}


class StoreBackedMatrix:
    """A quantized matrix whose exact rows are read from the store when needed, and which is held (if at all)
    only in its kernel's layout for products:

    - an embedding table: lookups read a step's T rows from the store (nothing held for them);
    - a head (the tied embedding, or lm_head): the product runs on the held kernel form (int8 with a scale
      per row for q8_0, whose re-rounding moves logits by ~1%), then each row's EXACT_TOP_OUTPUTS largest
      logits are recomputed in float32 from the rows as stored (a few KiB read per token), so greedy and
      top-k choices are made on the stored weights' own logits.

    Before holding, `held` is the QuantizedBlocks (or None: lookups only); after, the held matrix."""

    def __init__(self, stored_rows, held=None):
        self.stored_rows = stored_rows  # .rows(ids, dtype), e.g. store_reader.StoredMatrixRows
        self.held = held

    @property
    def nbytes(self) -> int:
        return (self.held.nbytes if self.held is not None else 0) + self.stored_rows.nbytes

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.stored_rows.rows(ids, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) float32: the held product with its top outputs recomputed exactly."""
        if self.held is None:
            raise RuntimeError("this embedding table is not tied to the head; the model has its own lm_head")
        flat = x.reshape(-1, x.shape[-1]).float()  # (M, in)
        y = self.held.matmul(flat)  # (M, out)
        top = top_indices(y, min(EXACT_TOP_OUTPUTS, y.shape[-1]))  # (M, k)
        unique, inverse = torch.unique(top, return_inverse=True)  # (u,), (M, k)
        stored = self.stored_rows.rows(unique, torch.float32)  # (u, in)
        # one product per row over its own k rows: a batched float32 product rounds a row differently by
        # batch size, and these logits decide greedy tokens (batch invariance)
        exact = torch.stack([stored[inverse[i]] @ flat[i] for i in range(flat.shape[0])])  # (M, k)
        y.scatter_(1, top, exact)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def top_indices(y: torch.Tensor, k: int) -> torch.Tensor:
    """y (M, V) → (M, k) the positions of each row's k largest values, in no particular order: each group of
    TOP_GROUP_ELEMENTS gives its k largest, and the largest k of those are the row's (the same set as one topk
    over the row, whichever tied value a topk keeps; the head re-reads those rows, the order does not matter)."""
    rows, width = y.shape
    groups = width // TOP_GROUP_ELEMENTS
    if groups < 2 or k > TOP_GROUP_ELEMENTS:
        return y.topk(k, dim=-1).indices
    body = groups * TOP_GROUP_ELEMENTS
    values, at = y[:, :body].reshape(rows, groups, TOP_GROUP_ELEMENTS).topk(k, dim=-1)  # (M, G, k) each
    at = at + torch.arange(0, body, TOP_GROUP_ELEMENTS).view(1, groups, 1)  # (M, G, k) positions in the row
    values, at = values.reshape(rows, -1), at.reshape(rows, -1)  # (M, G*k)
    if body < width:  # the last, shorter group
        tail_values, tail_at = y[:, body:].topk(min(k, width - body), dim=-1)  # (M, k') each
        values, at = torch.cat([values, tail_values], dim=1), torch.cat([at, tail_at + body], dim=1)
    return at.gather(1, values.topk(k, dim=-1).indices)  # (M, k)


@dataclass
class StoredBlocks:
    """A quantized matrix to hold that is read from the store chunk by chunk while it is converted (the
    embedding/head is the largest resident matrix: as stored, beside its held form, it would double the load's
    peak). stored_rows: store_reader.StoredMatrixRows; expected_sha256: the manifest's, or None."""

    stored_rows: object
    expected_sha256: str | None
    sketch_4bit: bool = False  # --head-precision 4bit: a q8_0 matrix held as a 4-bit fit (Int4Matrix)

    def hold(self):
        rows = self.stored_rows
        chunks = rows.block_chunks(DEQUANTIZE_CHUNK_ROWS, self.expected_sha256)
        if rows.kind == "q8_0":
            if self.sketch_4bit:
                return Int4Matrix.fitted_from_chunks(rows.kind, rows.shape, chunks)
            return Int8RowMatrix.from_chunks(rows.kind, rows.shape, chunks)
        return Int4Matrix(QuantizedBlocks(rows.kind, torch.cat([raw for _, raw in chunks]), rows.shape))

    def verify(self) -> None:
        """Read it through once for its checksum only (a table that is looked up, not held)."""
        for _ in self.stored_rows.block_chunks(DEQUANTIZE_CHUNK_ROWS, self.expected_sha256):
            pass


def hold_resident(weights: dict, compute_dtype: torch.dtype, resident_dtype: torch.dtype, device: str) -> dict:
    """Float matrices in resident_dtype, vectors in compute_dtype, quantized blocks in their kernel's layout
    (they stay quantized whatever resident_dtype says), all on device. `weights` is consumed: each tensor as
    stored is dropped once held, so the load peaks near the held bytes, not held + stored."""
    def hold(t):
        if isinstance(t, StoredBlocks):
            return t.hold()
        if isinstance(t, tuple):
            return StackedMatrix([hold(part) for part in t])
        if isinstance(t, QuantizedBlocks):
            return hold_quantized(t, compute_dtype, device)
        if isinstance(t, StoreBackedMatrix):
            return StoreBackedMatrix(t.stored_rows, hold(t.held) if t.held is not None else None)
        # a copy even where dtype and device are already right: a tensor as stored is a view of the store file's
        # mapping, and one such tensor held (a norm) keeps the whole file mapped and its pages charged
        return t.to(device=device, dtype=resident_dtype if t.dim() >= 2 else compute_dtype, copy=True)

    return {name: hold(weights.pop(name)) for name in list(weights)}


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
                        num_layers: int, device: str, tied_embeddings: bool, head_4bit: bool = False) -> int:
    """Bytes hold_resident will hold for tensors of these shapes (name → shape as stored; quantized: the
    manifest's name → kind, float shape): float tensors at resident_itemsize, quantized ones in their
    kernels' layouts (fused as fuse_projections fuses them) on a CPU, dequantized on a GPU. On a CPU a
    quantized embedding table is read from the store (StoreBackedMatrix, keeping its last rows read): held only
    as a tied head, and a q8_0 head as a 4-bit sketch with head_4bit."""
    if torch.device(device).type != "cpu":
        return sum(_elements(quantized[n].shape if n in quantized else s) for n, s in shapes.items()) * resident_itemsize
    blocks = {name: (info.kind, tuple(info.shape)) for name, info in quantized.items() if name in shapes}
    if EMBEDDING_NAME in blocks and not tied_embeddings:
        blocks.pop(EMBEDDING_NAME)
    for name in (HEAD_NAME, EMBEDDING_NAME):
        if head_4bit and name in blocks and blocks[name][0] == "q8_0":
            blocks[name] = (SKETCH_KIND, blocks[name][1])
    for layer in range(num_layers):
        names = [f"layers.{layer}.{part}_proj.weight" for part in ("q", "k", "v")]
        if all(name in blocks for name in names) and len({blocks[name][0] for name in names}) == 1:
            kind, inner = blocks[names[0]][0], blocks[names[0]][1][1]
            blocks[f"layers.{layer}.qkv_proj.weight"] = (kind, (sum(blocks.pop(n)[1][0] for n in names), inner))
    float_bytes = sum(_elements(shape) for name, shape in shapes.items() if name not in quantized) * resident_itemsize
    from flashllm.workers.store_reader import StoredMatrixRows

    # each store-backed matrix (the embedding table, a quantized head) keeps its last rows read
    rows_kept = sum(StoredMatrixRows.held_bytes(quantized[name].kind, tuple(quantized[name].shape))
                    for name in (EMBEDDING_NAME, HEAD_NAME) if name in quantized and name in shapes)
    return float_bytes + rows_kept + sum(held_matrix_bytes(kind, shape) for kind, shape in blocks.values())


def _elements(shape) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def fuse_projections(weights: dict[str, torch.Tensor], num_layers: int, parts: tuple[str, ...] = ("q", "k", "v")
                     ) -> dict[str, torch.Tensor]:
    """Each layer's q/k/v projections (and biases) stacked into one `qkv_proj`: they multiply the same
    input, and one product is one kernel launch instead of three (on a GPU, decode is launch-bound).
    Fuses in place (the parts as stored are dropped) and returns weights."""
    fused = weights
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
    if isinstance(weight, (Int4Matrix, Int8RowMatrix, StackedMatrix, StoreBackedMatrix)):
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
    if isinstance(table, (Int4Matrix, Int8RowMatrix, StoreBackedMatrix)):
        return table.rows(token_ids, compute_dtype)  # only these rows are dequantized
    return table[token_ids].to(compute_dtype)
