"""FFN neurons of a quantized store held in kernel-ready form: never a float copy of the rows.

A quantized bundle is [gate_i | up_i | down_i] as bytes: gate/up rows in GGUF
blocks (q4_0, q4_1 or q8_0) and the down column as q8_col (one float32 scale,
then d int8). `QuantNeuronMatrix` holds `capacity` such neurons the way the CPU
kernels take them, and a slot can be (re)written alone, so a neuron cache's
insert/move touches only its rows (the kernel layout is never rebuilt):

- gate and up rows of q4_* kinds: one int4 packed matrix of 2·capacity rows
  (gate in [0, cap), up in [cap, 2cap)), capacity rounded up to the packing's
  64-row tile. torch's CPU int4 packing is not row-local: inside a tile of 64
  rows, byte k·32 + (n mod 32) of the tile holds weight k of rows n (low
  nibble, n mod 64 < 32) and n + 32 (high nibble). A row is written with a
  strided nibble scatter. Scales/zeros: (G, 2cap, 2) bfloat16.
- gate and up rows of q8_0: converted to bfloat16 as they are written (the
  int8 kernel scales per output row, not per block; bfloat16 GEMM is the fast
  path here).
- down columns: int8 (d, capacity), scales (capacity,) float32. The scale
  folds into the neuron's activation, so the whole down product is one
  `_weight_int8pack_mm` call; rows past the ones in use get activation 0.

All products take bfloat16 activations (the kernels' fast path) and give
float32 back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import FfnLayout
from flashllm.workers.models.quant_linear import BLOCK_WEIGHTS, QuantizedBlocks, split_blocks

INT4_TILE_ROWS = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class QuantNeuronMatrix:
    """`capacity` neurons of a quantized FFN layer, slot by slot, in the CPU kernels' layouts."""

    def __init__(self, layout: FfnLayout, capacity: int):
        self.kinds = kinds = layout.part_kinds()
        self.byte_slices = layout.part_byte_slices()
        elements = {name: n for name, n, _ in layout.bundle_parts}
        self.gated = "gate" in kinds
        self.row_kind = kinds["up"]
        if kinds["down"] != "q8_col":
            raise ValueError(f"a quantized store's down columns are q8_col, this one's are {kinds['down']}")
        self.d = elements["up"]
        self.capacity = _round_up(max(1, capacity), INT4_TILE_ROWS)
        self.row_matrices = 2 if self.gated else 1
        rows = self.row_matrices * self.capacity
        groups = self.d // BLOCK_WEIGHTS
        self.int4 = self.row_kind in ("q4_0", "q4_1")
        if self.int4:
            self.packed = torch.zeros(rows, self.d // 2, dtype=torch.uint8)  # (rows, d/2) tile layout
            self.scales_zeros = torch.zeros(groups, rows, 2, dtype=torch.bfloat16)  # (G, rows, 2)
        else:
            self.rows_bf16 = torch.zeros(rows, self.d, dtype=torch.bfloat16)  # (rows, d)
        self.down_values = torch.zeros(self.d, self.capacity, dtype=torch.int8)  # (d, cap)
        self.down_scales = torch.zeros(self.capacity)  # (cap,) float32
        self.up_bias = None if self.gated else torch.zeros(self.capacity)  # (cap,)
        self._ones = torch.ones(self.d, dtype=torch.bfloat16)  # (d,) the int8 kernel's per-output scale

    @staticmethod
    def bytes_for(layout: FfnLayout, capacity: int) -> int:
        """What a QuantNeuronMatrix of this capacity holds, known before making one (the memory plan's figure)."""
        kinds = layout.part_kinds()
        d = dict((name, n) for name, n, _ in layout.bundle_parts)["up"]
        rows = _round_up(max(1, capacity), INT4_TILE_ROWS)
        matrices = 2 if "gate" in kinds else 1
        if kinds["up"] in ("q4_0", "q4_1"):
            row_bytes = d // 2 + d // BLOCK_WEIGHTS * 2 * 2  # nibbles + bfloat16 (scale, zero) per block
        else:
            row_bytes = d * 2  # bfloat16
        down_bytes = d + 4 + (0 if "gate" in kinds else 4)  # int8 column, float32 scale (and up bias)
        return rows * (matrices * row_bytes + down_bytes) + d * 2

    @property
    def nbytes(self) -> int:
        held = [self.down_values, self.down_scales, self._ones]
        held += [self.packed, self.scales_zeros] if self.int4 else [self.rows_bf16]
        held += [self.up_bias] if self.up_bias is not None else []
        return sum(t.nbytes for t in held)

    # -- writing slots ----------------------------------------------------------

    def write(self, slots: np.ndarray, bundles: np.ndarray) -> None:
        """Put the bundles (k, bundle_bytes) uint8 at slots (k,)."""
        if len(slots) == 0:
            return
        slots_t = torch.from_numpy(np.asarray(slots, dtype=np.int64))  # (k,)
        raw = torch.from_numpy(np.ascontiguousarray(bundles))  # (k, bundle_bytes)
        parts = ("gate", "up") if self.gated else ("up",)
        for index, name in enumerate(parts):
            blocks = QuantizedBlocks(self.row_kind, raw[:, self.byte_slices[name]].contiguous(), (len(slots), self.d))
            self._write_rows(slots_t + index * self.capacity, blocks)
        down = raw[:, self.byte_slices["down"]]  # (k, 4 + d)
        self.down_scales[slots_t] = down[:, :4].contiguous().view(torch.float32).reshape(-1)
        self.down_values[:, slots_t] = down[:, 4:].contiguous().view(torch.int8).T
        if self.up_bias is not None:
            bias = qf.dequantize_rows(self.kinds["up_bias"], np.ascontiguousarray(
                bundles[:, self.byte_slices["up_bias"]]), 1)  # (k, 1)
            self.up_bias[slots_t] = torch.from_numpy(bias.reshape(-1))

    def _write_rows(self, rows: torch.Tensor, blocks: QuantizedBlocks) -> None:
        if not self.int4:
            d, _, q = split_blocks(blocks)
            w = q.reshape(len(rows), -1, BLOCK_WEIGHTS).float() * d[..., None]  # (k, G, 32)
            self.rows_bf16[rows] = w.reshape(len(rows), self.d).bfloat16()
            return
        d, m, q = split_blocks(blocks)  # (k, G), (k, G) | None, (k, d)
        zero = torch.zeros_like(d) if m is None else m + 8 * d
        self.scales_zeros[:, rows] = torch.stack((d, zero), dim=-1).transpose(0, 1).bfloat16()
        # (tiles, d, 32) view: byte [t, k, n % 32] holds weight k of tile t's rows n (low) and n + 32 (high)
        tiles = self.packed.numpy().reshape(-1, self.d, 32)
        rows_np = rows.numpy()
        tile, column = rows_np // INT4_TILE_ROWS, rows_np % 32  # (k,) each
        high = (rows_np % INT4_TILE_ROWS) >= 32  # (k,) rows in a tile's upper half use the high nibble
        q8 = q.to(torch.uint8).numpy()  # (k, d)
        for use_high in (False, True):  # two passes: a low and a high row may share bytes
            pick = high == use_high
            if not pick.any():
                continue
            old = tiles[tile[pick], :, column[pick]]  # (r, d)
            values = q8[pick]
            tiles[tile[pick], :, column[pick]] = (old & 0x0F) | (values << 4) if use_high else (old & 0xF0) | values

    # -- products ----------------------------------------------------------------

    def activations(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """h (N, d) → a (N, cap) float32: each slot's activation; slots from n on are 0."""
        x = h.to(torch.bfloat16)
        if self.int4:
            both = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, BLOCK_WEIGHTS, self.scales_zeros)
        else:
            both = F.linear(x, self.rows_bf16)
        both = both.float()  # (N, rows)
        cap = self.capacity
        if self.gated:
            a = F.silu(both[:, :cap]) * both[:, cap:]  # (N, cap)
        else:
            a = F.relu(both + self.up_bias)  # (N, cap)
        a[:, n:] = 0
        return a

    def down(self, a: torch.Tensor) -> torch.Tensor:
        """a (N, cap) → (N, d): Σ_i a_i · down_i, the per-neuron scales folded into a."""
        scaled = (a * self.down_scales).to(torch.bfloat16)  # (N, cap)
        return torch.ops.aten._weight_int8pack_mm(scaled, self.down_values, self._ones).float()  # (N, d)

    def ffn(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """h (N, d) → (N, d) float32 over slots [0, n)."""
        return self.down(self.activations(h, n)).to(h.dtype)

    def masked_ffn(self, h: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
        """h (N, d), mask (N, n) → (N, d): each token over only the slots its mask row keeps."""
        a = self.activations(h, n)
        a[:, :n] *= mask
        return self.down(a).to(h.dtype)


class QuantRows:
    """The first n slots of a QuantNeuronMatrix: what ffn_from_rows multiplies for a quantized store."""

    def __init__(self, matrix: QuantNeuronMatrix, n: int):
        self.matrix, self.n = matrix, n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.matrix.d)


def quant_rows_of(layout: FfnLayout, bundles: np.ndarray) -> QuantRows:
    """Bundles (k, bundle_bytes) uint8 of consecutive neurons → their kernel-ready form."""
    matrix = QuantNeuronMatrix(layout, bundles.shape[0])
    matrix.write(np.arange(bundles.shape[0]), bundles)
    return QuantRows(matrix, bundles.shape[0])
