"""FFN math over bundle rows: the matrix a neuron cache (or a whole layer) holds.

A bundle row is one neuron: [gate_i | up_i | down_i] (gated) or
[up_i | down_i | up_bias_i] (ReLU); see protocol.store_format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.workers.models.quant_ffn import QuantRows, scratch_buffer


@dataclass(frozen=True)
class BundleColumns:
    """Column slices of the parts inside a bundle row."""

    gated: bool
    gate: slice | None
    up: slice
    down: slice
    up_bias: slice | None

    @staticmethod
    def from_layout(part_slices: dict[str, slice]) -> "BundleColumns":
        return BundleColumns(gated="gate" in part_slices, gate=part_slices.get("gate"), up=part_slices["up"],
                             down=part_slices["down"], up_bias=part_slices.get("up_bias"))


HALF_ROWS_CHUNK = 256  # rows of a half-precision cache widened to the compute dtype at a time


class HalfRows:
    """The first n rows of a float16/bfloat16 neuron cache as held (bfloat16 as uint16 bits), multiplied a
    chunk of HALF_ROWS_CHUNK rows at a time in the compute dtype: the cache keeps the store's precision and
    the widened copy is one chunk (memory_plan counts it in the staging)."""

    def __init__(self, rows: np.ndarray, dtype: torch.dtype):
        self.rows, self.dtype = rows, dtype  # (n, E) float16 or uint16 (bfloat16 bits)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape

    def chunks(self):
        """(start, stop, rows (stop - start, E) in the compute dtype) over the rows."""
        held = torch.from_numpy(self.rows)
        if held.dtype in (torch.uint16, torch.int16):  # bfloat16's bits (numpy has no bfloat16)
            held = held.view(torch.bfloat16)
        for start in range(0, held.shape[0], HALF_ROWS_CHUNK):
            stop = min(start + HALF_ROWS_CHUNK, held.shape[0])
            # widened into a reused buffer: a fresh 1.7 MiB one a chunk was mmap'd and faulted in every time
            widened = scratch_buffer("half_rows", (HALF_ROWS_CHUNK, held.shape[1]), self.dtype)[: stop - start]
            yield start, stop, widened.copy_(held[start:stop])


def neuron_activations(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns) -> torch.Tensor:
    """h (N, d), rows (k, E) → a (N, k): each neuron's activation, the coefficient of its down column."""
    if isinstance(rows, QuantRows):
        return rows.matrix.activations(h, rows.n)[:, : rows.n].to(h.dtype)
    if cols.gated:
        gate = h @ rows[:, cols.gate].T  # (N, k)
        up = h @ rows[:, cols.up].T  # (N, k)
        return F.silu(gate) * up
    pre = h @ rows[:, cols.up].T + rows[:, cols.up_bias].T  # (N, k)
    return F.relu(pre)


def ffn_from_rows(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns) -> torch.Tensor:
    """h (N, d), rows (k, E) → (N, d): the FFN restricted to the k neurons in rows (down bias not included).
    rows may be a quantized store's QuantRows, multiplied by the integer kernels as held."""
    if isinstance(rows, QuantRows):
        return rows.matrix.ffn(h, rows.n)
    if isinstance(rows, HalfRows):
        return _sum_over_chunks(h.new_zeros(h.shape), (ffn_from_rows(h, part, cols) for _, _, part in rows.chunks()))
    return neuron_activations(h, rows, cols) @ rows[:, cols.down]  # (N, k) @ (k, d)


def _sum_over_chunks(total: torch.Tensor, parts) -> torch.Tensor:
    for part in parts:
        total.add_(part)
    return total


def masked_ffn_from_rows(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns, mask: torch.Tensor) -> torch.Tensor:
    """h (N, d), rows (k, E), mask (N, k) → (N, d): each token's FFN over only the neurons its mask row keeps."""
    if isinstance(rows, QuantRows):
        return rows.matrix.masked_ffn(h, rows.n, mask)
    if isinstance(rows, HalfRows):
        return _sum_over_chunks(h.new_zeros(h.shape), (masked_ffn_from_rows(h, part, cols, mask[:, start:stop])
                                                       for start, stop, part in rows.chunks()))
    return (neuron_activations(h, rows, cols) * mask) @ rows[:, cols.down]  # (N, k) @ (k, d)


def masked_ffn_over_chunks(h: torch.Tensor, chunks: Iterable[tuple[int, int, torch.Tensor]], cols: BundleColumns,
                           mask: torch.Tensor) -> torch.Tensor:
    """h (N, d), mask (N, n_ff), chunks of (start, stop, rows (stop - start, E)) covering the layer in
    layer_chunks() order → (N, d): masked_ffn_from_rows over the whole layer, summed chunk by chunk. Both
    runtimes sum through here in the same order, so they round alike and decode the same tokens."""
    y = None
    for start, stop, rows in chunks:
        part = masked_ffn_from_rows(h, rows, cols, mask[:, start:stop])  # (N, d)
        y = part if y is None else y.add_(part)
    if y is None:
        raise ValueError("masked_ffn_over_chunks: no chunks (a layer has at least one neuron)")
    return y


def neuron_contributions(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns) -> torch.Tensor:
    """|act(gate·x) · (up·x)| per neuron, (N, k): the score a calibrated threshold cuts (CATS-style)."""
    return neuron_activations(h, rows, cols).abs()
