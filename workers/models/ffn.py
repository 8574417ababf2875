"""FFN math over bundle rows: the matrix a neuron cache (or a whole layer) holds.

A bundle row is one neuron: [gate_i | up_i | down_i] (gated) or
[up_i | down_i | up_bias_i] (ReLU); see protocol.store_format.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.workers.flash_io.bundle_products import DirectSums, NeuronBundleRows, RawBundleRows
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

    def held(self) -> torch.Tensor:
        """(n, E) the rows as held, as a tensor (bfloat16 bits viewed as bfloat16), sharing their memory."""
        held = torch.from_numpy(self.rows)
        if held.dtype in (torch.uint16, torch.int16):  # bfloat16's bits (numpy has no bfloat16)
            held = held.view(torch.bfloat16)
        return held

    def chunks(self):
        """(start, stop, rows (stop - start, E) in the compute dtype) over the rows."""
        held = self.held()
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
    rows may be a quantized store's QuantRows, multiplied by the integer kernels as held, or a whole layer's
    RawBundleRows, multiplied from the bundles as read."""
    if isinstance(rows, RawBundleRows):
        return torch.from_numpy(rows.ffn(h.detach().float().numpy())).to(h.dtype)
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


def masked_ffn_over_chunks(h: torch.Tensor, chunks: Iterable[tuple[np.ndarray, torch.Tensor]], cols: BundleColumns,
                           mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """h (N, d), mask (N, n_ff), chunks of (ids (k,) ascending neuron ids, rows (k, E)) in chunk_ids() order →
    (N, d): masked_ffn_from_rows over the chunks' neurons (the whole layer, or a decode step's read), summed
    chunk by chunk. Both runtimes sum through here in the same order, so they round alike and decode the same
    tokens. per_token: each token's sum is OwnNeuronSums' (a batch-invariant decode step; quantized chunks
    must then hold their down columns by slot, held_rows(down_by_slot=True)), on the CPU: a GPU's products are
    not batch-invariant anyway, and one product per token there is one launch per token. Chunks of
    NeuronBundleRows (a decode read multiplied as read: ffn_providers.masked_chunk_rows) go through DirectSums,
    which is per token either way."""
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is not None and isinstance(first[1], NeuronBundleRows):  # a decode read's bundles as read
        return _direct_over_chunks(h, itertools.chain([first], chunks), mask)
    chunks = itertools.chain([first], chunks) if first is not None else chunks
    if per_token and h.device.type == "cpu":
        sums = OwnNeuronSums(h, cols)
        for ids, rows in chunks:
            ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))  # (k,)
            sums.add(rows, ids, mask[:, ids])
        return sums.result()
    y = None
    for ids, rows in chunks:
        part = masked_ffn_from_rows(h, rows, cols, mask[:, _columns(ids, mask.device)])  # (N, d)
        y = part if y is None else y.add_(part)
    if y is None:
        raise ValueError("masked_ffn_over_chunks: no chunks (a layer has at least one neuron)")
    return y


def _direct_over_chunks(h: torch.Tensor, chunks, mask: torch.Tensor) -> torch.Tensor:
    """masked_ffn_over_chunks over NeuronBundleRows chunks: each token over its own neurons, in float32
    (DirectSums: the same for a token in any batch, per_token or not)."""
    sums = DirectSums(h.detach().float().cpu().numpy())  # (N, d)
    keep = mask.cpu().numpy()  # (N, n_ff) bool
    for ids, rows in chunks:
        sums.add(rows, keep[:, ids])
    return torch.from_numpy(sums.result()).to(h.dtype)


def _columns(ids: np.ndarray, device: torch.device) -> "slice | torch.Tensor":
    """A chunk's neuron ids as an index into (N, n_ff) masks: a slice where they are a run (a whole layer's
    chunks), else the ids on the mask's device."""
    if len(ids) and int(ids[-1]) - int(ids[0]) + 1 == len(ids):
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)


def neuron_contributions(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns) -> torch.Tensor:
    """|act(gate·x) · (up·x)| per neuron, (N, k): the score a calibrated threshold cuts (CATS-style)."""
    return neuron_activations(h, rows, cols).abs()


class OwnNeuronSums:
    """Each token's FFN over only its own neurons, in neuron-id order, by one product per token.

    Batch invariance (sparse_policy.sums_per_token says when): a token's result must not depend on the other
    tokens of its batch. Masking a batched product is not enough on a CPU: float32 products round a row
    differently by batch size, and a sum over a cache's slots adds the same terms in another order when the
    cache holds a neighbour's neurons too. So each token's neurons (wherever they sit: a cache's slots, a
    whole layer's chunks) are gathered in id order and multiplied alone, which is exactly what the token
    computes when it runs alone. The gate/up activations of a quantized store come from the int4 kernel,
    which gives each output the same bits whatever the batch and the neuron's slot."""

    def __init__(self, h: torch.Tensor, cols: BundleColumns):
        self.h, self.cols = h, cols  # h (N, d)
        self._parts: list[list[torch.Tensor]] = [[] for _ in range(h.shape[0])]  # per token: gathered rows (k, E)
        # a quantized store's rows are summed as they are added (their down columns as stored, in id order)
        self._quant_sums: torch.Tensor | None = None  # (N, d) float32

    def add(self, rows, row_ids: torch.Tensor, keep: torch.Tensor) -> None:
        """rows (n, E): a tensor, HalfRows or QuantRows (down held by slot); row_ids (n,) their neuron ids;
        keep (N, n) bool: the rows each token computes. Rows added later must have higher ids (a layer's
        chunks in order), so each token's terms are added in neuron-id order."""
        quantized = isinstance(rows, QuantRows)
        activations = rows.matrix.activations(self.h, rows.n) if quantized else None  # (N, cap)
        if quantized and self._quant_sums is None:
            self._quant_sums = torch.zeros(self.h.shape[0], self.h.shape[1])  # (N, d)
        for token, kept in enumerate(keep):
            at = torch.nonzero(kept).squeeze(1)  # (k,)
            at = at[torch.argsort(row_ids[at])]  # in neuron-id order
            if quantized:
                rows.matrix.add_down_sums(self._quant_sums[token], activations[token, at], at)
            else:
                self._parts[token].append(_rows_at(rows, at, self.h.dtype))

    def result(self) -> torch.Tensor:
        """(N, d): each token's sum over the neurons added for it."""
        if self._quant_sums is not None:
            return self._quant_sums.to(self.h.dtype)
        out = torch.zeros_like(self.h)  # (N, d)
        for token, parts in enumerate(self._parts):
            if not parts:
                continue
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]  # (k, E)
            a = neuron_activations(self.h[token:token + 1], rows, self.cols)[0]  # (k,)
            out[token] = (a[None] @ rows[:, self.cols.down])[0].to(out.dtype)
        return out


def _rows_at(rows, at: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows (n, E), a tensor or HalfRows, at (k,) → (k, E) in dtype."""
    held = rows.held() if isinstance(rows, HalfRows) else rows
    return held.index_select(0, at).to(dtype)
