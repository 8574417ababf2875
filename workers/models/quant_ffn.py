"""FFN neurons of a quantized store held in kernel-ready form: blocks as stored, no float32 copy.

A quantized bundle is [gate_i | up_i | down_i] as bytes: gate/up rows in GGUF
blocks (q4_0, q4_1 or q8_0) and the down column as the values of GGUF's
across-neuron down blocks, whose scales are the layer's resident table.
`QuantNeuronMatrix` holds `capacity` such neurons the way the CPU
kernels take them, and a slot can be (re)written alone. It converts rows read
for one product (a whole layer, a chunk of one); a sparse neuron cache's
neurons are written into the same layouts by the prefetcher as they arrive
(flash_io/kernel_rows.py), and `over_kernel_rows` multiplies them in place:

- gate and up rows of q4_* kinds: one int4 packed matrix of 2·capacity rows
  (gate in [0, cap), up in [cap, 2cap)), capacity rounded up to the packing's
  64-row tile. torch's CPU int4 packing is not row-local: inside a tile of 64
  rows, byte k·32 + (n mod 32) of the tile holds weight k of rows n (low
  nibble, n mod 64 < 32) and n + 32 (high nibble). A row is written by a
  compiled nibble loop (flash_io/kernel_layout). Scales/zeros: (G, 2cap, 2) bfloat16.
- gate and up rows of q8_0: converted to bfloat16 as they are written (the
  int8 kernel scales per output row, not per block; bfloat16 GEMM is the fast
  path here).
- down columns: as stored, (capacity, d/2) nibbles or (capacity, d) int8,
  with the neuron id of each slot; a product is a compiled sum over the
  neurons in use, each value decoded in float32 from its group's row of the
  layer's scale table as it is added (flash_io/kernel_layout.add_down_sums).
  Why not an int kernel: a neuron's column shares its per-row scales with 31
  other neurons, which no per-slot int layout can hold; why not float16 rows
  (until stop 30): they took 4x a 4-bit column's bytes, cache the window
  needs (docs/benchmarks.md).
- down of a whole layer in neuron order (dense, naive), 4-bit kinds: GGUF's
  own [d, n_ff] blocks in the int4 kernel's layout (its groups of 32 along
  n_ff are exactly GGUF's blocks), packed once when the layer is written.

All products take bfloat16 activations (the kernels' fast path) and give
float32 back.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import FfnLayout
from flashllm.workers.flash_io.kernel_layout import (
    add_down_sums, block_bytes_of, down_value_bytes, write_down_q4_tiles, write_q4_rows, write_q4_scales,
    write_q4_tiles,
)
from flashllm.workers.flash_io.kernel_rows import require_grouped_down
from flashllm.workers.models.quant_linear import BLOCK_WEIGHTS, QuantizedBlocks, split_blocks

INT4_TILE_ROWS = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _int4_down(column_kind: str) -> bool:
    return column_kind in (qf.GROUPED_COLUMN_KINDS["q4_0"], qf.GROUPED_COLUMN_KINDS["q4_1"])


def is_whole_layer(neuron_ids: np.ndarray) -> bool:
    """Neurons 0..n-1 in order, n a multiple of 32 (a whole layer, or a layer's first chunk): rows whose down
    can be held as GGUF's own blocks."""
    n = len(neuron_ids)
    return n > 0 and n % BLOCK_WEIGHTS == 0 and neuron_ids[0] == 0 and neuron_ids[-1] == n - 1 and \
        bool(np.all(np.diff(neuron_ids) == 1))


def down_kernel_scales_of(table: np.ndarray) -> torch.Tensor:
    """A layer's down scale table (d, n_ff/32, c) float16 → the int4 kernel's (n_ff/32, d, 2) bfloat16
    (scale, zero) with w = (q - 8)·scale + zero, for down held as whole-layer blocks."""
    scales = torch.from_numpy(table).float().transpose(0, 1)  # (n_ff/32, d, c), whatever table's strides
    scale = scales[..., 0]
    zero = scales[..., 1] + 8 * scale if scales.shape[-1] == 2 else torch.zeros_like(scale)
    return torch.stack((scale, zero), dim=-1).bfloat16()


_thread_scratch = threading.local()


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A buffer of this thread's, reused from call to call: a naive step converts every layer and a sparse
    step inserts rows into every layer, and fresh temporaries of a few hundred KiB were mmap'd and faulted in
    each time (malloc_tuning fixes glibc's mmap threshold at 128 KiB; docs/benchmarks.md, stop 26). It
    only grows: a smaller request is a view of the same memory. Its contents are the caller's until the
    same thread asks for `name` again."""
    buffers = _thread_scratch.__dict__.setdefault("buffers", {})
    numel = int(np.prod(shape))
    buffer = buffers.get(name)
    # one made under inference_mode (a decode step) cannot be written outside it (loading the next engine)
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or stale or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


class QuantNeuronMatrix:
    """`capacity` neurons of a quantized FFN layer, slot by slot, in the CPU kernels' layouts."""

    def __init__(self, layout: FfnLayout, capacity: int, down_scales: np.ndarray, whole_layer: bool = False,
                 down_kernel_scales: torch.Tensor | None = None):
        """down_scales: the layer's down scale table (d, n_ff/32, c) float16 (store_reader.load_down_group_scales).
        whole_layer: the matrix holds a whole layer in neuron order, written once (dense, naive): 4-bit down
        blocks are then held as GGUF's own [d, n_ff] blocks in the int4 kernel's layout, with the table in
        the kernel's form (down_kernel_scales(table), given by a caller that converts the layer often)."""
        self._describe(layout, capacity, down_scales, whole_layer)
        rows = self.row_matrices * self.capacity
        groups = self.d // BLOCK_WEIGHTS
        if self.int4:
            self.packed = torch.zeros(rows, self.d // 2, dtype=torch.uint8)  # (rows, d/2) tile layout
            self.scales_zeros = torch.zeros(groups, rows, 2, dtype=torch.bfloat16)  # (G, rows, 2)
        else:
            self.rows_bf16 = torch.zeros(rows, self.d, dtype=torch.bfloat16)  # (rows, d)
        if self.down_as_blocks:  # groups of 32 along K (neurons) are exactly GGUF's blocks
            self.down_kernel_scales = down_kernel_scales if down_kernel_scales is not None else \
                down_kernel_scales_of(down_scales)  # (n_ff/32, d, 2)
            self.down_packed = torch.zeros(self.d, self.capacity // 2, dtype=torch.uint8)  # (d, cap/2) packed
            self.down_scales_zeros = torch.zeros(self.capacity // BLOCK_WEIGHTS, self.d, 2,
                                                 dtype=torch.bfloat16)  # (cap/32, d, 2)
        else:  # each slot's column as stored and its neuron (-1: none)
            self.down_values = torch.zeros(self.capacity, down_value_bytes(self.down_block_kind, self.d),
                                           dtype=torch.uint8)  # (cap, d/2) or (cap, d)
            self.slot_neuron_ids = torch.full((self.capacity,), -1, dtype=torch.int64)  # (cap,)
        self.up_bias = None if self.gated else torch.zeros(self.capacity)  # (cap,)

    def _describe(self, layout: FfnLayout, capacity: int, down_scales: np.ndarray, whole_layer: bool) -> None:
        self.kinds = kinds = layout.part_kinds()
        self.byte_slices = layout.part_byte_slices()
        elements = {name: n for name, n, _ in layout.bundle_parts}
        self.gated = "gate" in kinds
        self.row_kind = kinds["up"]
        require_grouped_down(kinds)
        self.down_kind = kinds["down"]
        self.down_block_kind = qf.block_kind_of_column(self.down_kind)
        self._set_down_table(down_scales)
        self.d = elements["up"]
        self.capacity = _round_up(max(1, capacity), INT4_TILE_ROWS)
        self.row_matrices = 2 if self.gated else 1
        self.int4 = self.row_kind in ("q4_0", "q4_1")
        self.whole_layer = whole_layer
        self.down_as_blocks = whole_layer and _int4_down(kinds["down"])

    def _set_down_table(self, down_scales: np.ndarray | None) -> None:
        """down_scales (d, n_ff/32, c) float16, a view of the group-major table load_down_group_scales holds:
        the sums take it group-major (a neuron's scales are whole rows), which is that memory, not a copy."""
        self.down_scales = down_scales
        self.down_table = None if down_scales is None else np.ascontiguousarray(down_scales.transpose(1, 2, 0))

    @staticmethod
    def holds_own_down_scales(layout: FfnLayout) -> bool:
        """Whether a whole layer of this layout, once written, holds its down columns as int4 blocks with their
        own (scale, zero) (4-bit down): its down scale table is then needed only to write it."""
        return layout.is_quantized and _int4_down(layout.part_kinds()["down"])

    @classmethod
    def over_kernel_rows(cls, layout: FfnLayout, arrays: dict[str, np.ndarray], down_scales: np.ndarray
                         ) -> "QuantNeuronMatrix":
        """A matrix over a quantized neuron cache's arrays (flash_io/kernel_rows.py), in place, nothing copied:
        what the prefetcher writes there is what this multiplies. Read-only here: the prefetcher writes."""
        matrix = cls.__new__(cls)
        down_values = arrays["down_values"]  # (cap, d/2) or (cap, d) uint8
        matrix._describe(layout, down_values.shape[0], down_scales, whole_layer=False)
        if matrix.int4:
            words = arrays["scale_words"]  # (G, rows) (scale, zero) bfloat16 pairs as words
            matrix.packed = torch.from_numpy(arrays["packed"])  # (rows, d/2)
            matrix.scales_zeros = torch.from_numpy(words.view(np.int32)).view(torch.bfloat16).view(
                words.shape[0], words.shape[1], 2)  # (G, rows, 2)
        else:
            matrix.rows_bf16 = torch.from_numpy(arrays["rows_bits"].view(np.int16)).view(torch.bfloat16)  # (rows, d)
        matrix.down_values = torch.from_numpy(down_values)
        matrix.slot_neuron_ids = torch.from_numpy(arrays["neuron_ids"])  # (cap,)
        matrix.up_bias = torch.from_numpy(arrays["up_bias"]) if "up_bias" in arrays else None  # (cap,)
        return matrix

    @staticmethod
    def bytes_for(layout: FfnLayout, capacity: int, whole_layer: bool = False) -> int:
        """What a QuantNeuronMatrix of this capacity holds, known before making one (the memory plan's figure)."""
        kinds = layout.part_kinds()
        d = dict((name, n) for name, n, _ in layout.bundle_parts)["up"]
        rows = _round_up(max(1, capacity), INT4_TILE_ROWS)
        matrices = 2 if "gate" in kinds else 1
        if kinds["up"] in ("q4_0", "q4_1"):
            row_bytes = d // 2 + d // BLOCK_WEIGHTS * 2 * 2  # nibbles + bfloat16 (scale, zero) per block
        else:
            row_bytes = d * 2  # bfloat16
        if whole_layer and _int4_down(kinds["down"]):
            down_bytes = d // 2 + d // BLOCK_WEIGHTS * 2 * 2  # a column's nibbles + its share of (scale, zero)
        else:
            down_bytes = down_value_bytes(qf.block_kind_of_column(kinds["down"]), d) + 8  # as stored + neuron id
        down_bytes += 0 if "gate" in kinds else 4  # up bias
        return rows * (matrices * row_bytes + down_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes this matrix holds (the layer's scale table is shared and counted once, by its owner)."""
        held = [self.down_packed, self.down_scales_zeros] if self.down_as_blocks else \
            [self.down_values, self.slot_neuron_ids]
        held += [self.packed, self.scales_zeros] if self.int4 else [self.rows_bf16]
        held += [self.up_bias] if self.up_bias is not None else []
        return sum(t.nbytes for t in held)

    # -- writing slots ----------------------------------------------------------

    def write(self, slots: np.ndarray, bundles: np.ndarray, neuron_ids: np.ndarray, helper=None) -> None:
        """Put the bundles (k, bundle_bytes) uint8 of neurons neuron_ids (k,) at slots (k,). helper: an executor
        (concurrent.futures) that writes the down columns, and the up rows of a gated FFN, while this thread
        writes the rest: the compiled writes hold no GIL, so the two run on two cores."""
        if len(slots) == 0:
            return
        slots_t = torch.from_numpy(np.asarray(slots, dtype=np.int64))  # (k,)
        raw = torch.from_numpy(np.ascontiguousarray(bundles))  # (k, bundle_bytes)
        parts = ("gate", "up") if self.gated else ("up",)

        def write_rows(index: int) -> None:  # (a strided view: the tile path reads it in place)
            blocks = QuantizedBlocks(self.row_kind, raw[:, self.byte_slices[parts[index]]], (len(slots), self.d))
            self._write_rows(slots_t + index * self.capacity, blocks)

        mine = 1 if helper is not None else len(parts)  # this thread's row matrices; the helper's: up's

        def their_share() -> None:
            for index in range(mine, len(parts)):
                write_rows(index)
            self._write_down(slots, slots_t, bundles, neuron_ids)

        pending = helper.submit(their_share) if helper is not None else None
        for index in range(mine):
            write_rows(index)
        if pending is not None:
            pending.result()
        else:
            self._write_down(slots, slots_t, bundles, neuron_ids)
        if self.up_bias is not None:
            bias = qf.dequantize_rows(self.kinds["up_bias"], np.ascontiguousarray(
                bundles[:, self.byte_slices["up_bias"]]), 1)  # (k, 1)
            self.up_bias[slots_t] = torch.from_numpy(bias.reshape(-1))

    def _write_down(self, slots: np.ndarray, slots_t: torch.Tensor, bundles: np.ndarray, neuron_ids: np.ndarray
                    ) -> None:
        if self.down_as_blocks:
            self._write_down_blocks(np.asarray(slots), bundles, np.asarray(neuron_ids))
        else:
            values = bundles[:, self.byte_slices["down"]]  # (k, bytes)
            self.down_values[slots_t] = torch.from_numpy(np.ascontiguousarray(values))
            self.slot_neuron_ids[slots_t] = torch.from_numpy(np.ascontiguousarray(neuron_ids, dtype=np.int64))

    def load_whole_layer(self, bundles: np.ndarray, down_scales: np.ndarray | None,
                         down_kernel_scales: torch.Tensor | None = None, helper=None) -> None:
        """Rewrite this whole-layer matrix with another layer's bundles (n, bundle_bytes), n ≤ capacity, and
        that layer's down table: a naive step reuses two matrices instead of allocating one a layer. 4-bit
        down blocks take the table in the kernel's form (down_kernel_scales, else derived from down_scales),
        q8_0 down columns the table itself."""
        if not self.whole_layer:
            raise ValueError("load_whole_layer needs a matrix made with whole_layer=True")
        self._set_down_table(down_scales)
        if self.down_as_blocks:
            self.down_kernel_scales = down_kernel_scales if down_kernel_scales is not None else \
                down_kernel_scales_of(down_scales)
        ids = np.arange(len(bundles))
        self.write(ids, bundles, ids, helper)

    def _write_down_blocks(self, slots: np.ndarray, bundles: np.ndarray, neuron_ids: np.ndarray) -> None:
        """A whole layer's down columns, once: neuron i at slot i, packed as the int4 kernel's [d, cap]."""
        k = len(slots)
        if not (np.array_equal(slots, np.arange(k)) and np.array_equal(neuron_ids, slots) and k % BLOCK_WEIGHTS == 0):
            raise ValueError("a whole-layer matrix is written once, with neurons 0..n-1 (a multiple of 32) in order")
        write_down_q4_tiles(self.down_packed.numpy(), bundles, self.byte_slices["down"].start, self.d)
        self.down_scales_zeros[: k // BLOCK_WEIGHTS] = self.down_kernel_scales[: k // BLOCK_WEIGHTS]
        # copied: the layer's table, in either form, is no longer this matrix's to keep (a held layer would
        # otherwise keep both alive beside its own copy; memory_plan.whole_layer_tables_bytes)
        self.down_kernel_scales = None
        self._set_down_table(None)

    def _write_whole_tiles(self, first: int, blocks: QuantizedBlocks) -> None:
        """Rows first.. (a multiple of 64 from a tile's start) straight from the blocks' bytes into the tile
        layout, whole tiles at once (flash_io/kernel_layout: a naive step converts every layer this way)."""
        raw = blocks.raw.numpy()  # (k, G·block bytes), a strided view of the bundles
        write_q4_tiles(self.packed.numpy(), first, raw, 0, block_bytes_of(blocks.kind), self.d)
        self._write_scales(np.arange(first, first + len(raw)), raw, blocks.kind)

    def _write_scales(self, rows: np.ndarray, raw: np.ndarray, kind: str) -> None:
        """The blocks' (d, m) of raw (k, G·block bytes) → the kernel's bfloat16 (scale, zero) = (d, m + 8d), or
        (d, 0) for q4_0, at rows (k,), as one 32-bit word each."""
        words = self.scales_zeros.view(torch.int32).numpy().view(np.uint32)  # (G, rows) (scale, zero) pairs
        write_q4_scales(words, rows, raw, 0, kind)

    def _write_rows(self, rows: torch.Tensor, blocks: QuantizedBlocks) -> None:
        if not self.int4:
            d, _, q = split_blocks(blocks)
            w = q.reshape(len(rows), -1, BLOCK_WEIGHTS).float() * d[..., None]  # (k, G, 32)
            self.rows_bf16[rows] = w.reshape(len(rows), self.d).bfloat16()
            return
        first, k = int(rows[0]), len(rows)
        whole = k // INT4_TILE_ROWS * INT4_TILE_ROWS  # rows that fill whole tiles when they run in order
        if first % INT4_TILE_ROWS == 0 and whole and torch.equal(rows, torch.arange(first, first + k)):
            # in order from a tile's start (a chunk's rows): whole tiles packed at once, ~3x faster a row than the
            # read-modify-write of scattered rows; the last partial tile's rows scattered
            self._write_whole_tiles(first, QuantizedBlocks(blocks.kind, blocks.raw[:whole], (whole, self.d)))
            if whole < k:
                self._write_scattered_rows(rows[whole:], QuantizedBlocks(blocks.kind, blocks.raw[whole:],
                                                                         (k - whole, self.d)))
            return
        self._write_scattered_rows(rows, blocks)

    def _write_scattered_rows(self, rows: torch.Tensor, blocks: QuantizedBlocks) -> None:
        """Rows at any slots (a sparse step's arrivals): weights by a compiled read-modify-write of their nibbles
        (flash_io/kernel_layout)."""
        raw = blocks.raw.numpy()  # (k, G·block bytes), a strided view of the bundles
        write_q4_rows(self.packed.numpy(), rows.numpy(), raw, 0, block_bytes_of(blocks.kind), self.d)
        self._write_scales(rows.numpy(), raw, blocks.kind)

    # -- products ----------------------------------------------------------------

    def activations(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """h (N, d) → a (N, cap) float32: each slot's activation (slots from n on are not in use)."""
        x = h.to(torch.bfloat16)
        if self.int4:
            both = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, BLOCK_WEIGHTS, self.scales_zeros)
        else:
            both = F.linear(x, self.rows_bf16)
        both = both.float()  # (N, rows), this call's own
        cap = self.capacity
        if self.gated:  # in place over the gate half: a decode layer's torch calls are most of its time
            return F.silu(both[:, :cap], inplace=True).mul_(both[:, cap:])  # (N, cap), a view of both
        return F.relu(both + self.up_bias)  # (N, cap)

    def down(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """a (N, cap) → (N, d): Σ_i a_i · down_i over slots [0, n)."""
        if self.down_as_blocks:  # slots past n (a layer not a multiple of 64) must contribute nothing
            if n < a.shape[1]:
                a[:, n:] = 0
            return torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16), self.down_packed, BLOCK_WEIGHTS,
                                                               self.down_scales_zeros).float()  # (N, d)
        out = torch.zeros(a.shape[0], self.d)  # (N, d)
        slots = torch.arange(n)
        for token in range(a.shape[0]):
            self.add_down_sums(out[token], a[token, :n], slots)
        return out

    def add_down_sums(self, out: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> None:
        """out (d,) float32 += Σ_i weights[i] · the down column at slots[i] (k,), added in that order (a
        token's neurons in id order give the same bits wherever they sit)."""
        if self.down_as_blocks:
            raise ValueError("this whole-layer matrix holds its down columns as int4 blocks, not by slot; make it "
                             "with down_by_slot=True")
        add_down_sums(out.numpy(), weights.float().contiguous().numpy(), slots.numpy(), self.down_values.numpy(),
                      self.slot_neuron_ids.numpy(), self.down_table, self.down_block_kind)

    def ffn(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """h (N, d) → (N, d) float32 over slots [0, n)."""
        return self.down(self.activations(h, n), n).to(h.dtype)

    def masked_ffn(self, h: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
        """h (N, d), mask (N, n) → (N, d): each token over only the slots its mask row keeps."""
        a = self.activations(h, n)
        a[:, :n] *= mask
        return self.down(a, n).to(h.dtype)


class QuantRows:
    """The first n slots of a QuantNeuronMatrix: what ffn_from_rows multiplies for a quantized store."""

    def __init__(self, matrix: QuantNeuronMatrix, n: int):
        self.matrix, self.n = matrix, n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.matrix.d)


def quant_rows_of(layout: FfnLayout, bundles: np.ndarray, down_scales: np.ndarray, neuron_ids: np.ndarray,
                  down_by_slot: bool = False, reuse: QuantRows | None = None) -> QuantRows:
    """Bundles (k, bundle_bytes) uint8 of neurons neuron_ids (k,) → their kernel-ready form. down_by_slot: the
    down columns held by slot, as stored, even for a whole layer (what OwnNeuronSums sums), not as int4 blocks.
    reuse: the rows this gave for the previous chunk, done with: rewritten in place when they hold down columns
    by slot in the same number of tiles (a masked read's chunks, one after another, without allocating and
    zeroing a matrix each)."""
    k = bundles.shape[0]
    whole_layer = is_whole_layer(neuron_ids) and not down_by_slot
    matrix = reuse.matrix if reuse is not None else None
    if whole_layer or matrix is None or matrix.down_as_blocks or \
            matrix.capacity != _round_up(max(1, k), INT4_TILE_ROWS):
        matrix = QuantNeuronMatrix(layout, k, down_scales, whole_layer=whole_layer)
    else:
        matrix._set_down_table(down_scales)  # the chunk's layer's
    matrix.write(np.arange(k), bundles, neuron_ids)
    return QuantRows(matrix, k)
