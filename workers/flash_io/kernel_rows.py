"""A quantized store's neuron cache as compute multiplies it: each cached neuron once, in the CPU kernels' layouts.

The neuron cache of a float store holds bundles as read and compute multiplies
those rows. A quantized store's bundles are GGUF blocks, which the CPU kernels
take only in their own layouts (models/quant_ffn.QuantNeuronMatrix). Holding
the bundles as read beside those layouts held every cached neuron twice; here
the cache's rows are those layouts themselves, written once as a neuron
arrives (flash_io/kernel_layout.py) by the prefetcher, the cache's only writer,
in either runtime (in the worker runtime the arrays are shared memory that the
compute process multiplies in place):

    packed       (2·cap, d/2) uint8    gate rows [0, cap), up rows [cap, 2cap): torch's int4 tiles (q4_0, q4_1)
    scale_words  (G, 2·cap) uint32     their bfloat16 (scale, zero) pairs, one word per 32 weights
    rows_bits    (2·cap, d) uint16     q8_0 gate/up as bfloat16 rows (instead of the two above)
    down_values  (cap, d/2) uint8      down columns as stored (4-bit; (cap, d) int8 values for q8_0), summed
                                       with the layer's scale table by kernel_layout.add_down_sums
    up_bias      (cap,) float32        OPT's up bias (ungated FFNs)
    neuron_ids   (cap,) int64          the neuron at each slot, -1 for none
    used         (1,) int64            slots [0, used) hold neurons or holes

cap is the cache's capacity rounded up to the int4 tiles' 64 rows. A neuron
keeps its slot while it is cached: the NeuronCache's delete-by-moving-the-last-
rows-in moves ids only, since moving a row inside int4 tiles is a
read-modify-write of every byte it shares. A slot that loses its neuron is
cleared (zero scales, neuron id -1), so it adds exactly 0 to any product, and
the next arrivals take the lowest free slots.
"""
from __future__ import annotations

import numpy as np

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import FfnLayout
from flashllm.workers.flash_io.kernel_layout import (
    BLOCK_WEIGHTS, TILE_ROWS, block_bytes_of, down_value_bytes, write_q4_rows, write_q4_scales, write_q8_rows,
)


def holds_kernel_rows(layout: FfnLayout, device: str) -> bool:
    """Whether the neuron caches hold their neurons in the CPU kernels' layouts (a quantized store, compute on
    the CPU) rather than as read: the one place that decides it, for both runtimes and the memory plan."""
    return layout.is_quantized and device.split(":")[0] == "cpu"


def require_grouped_down(kinds: dict[str, str]) -> None:
    """A quantized store's down columns must be grouped block values (this version's convert writes them)."""
    if not qf.is_grouped_column(kinds["down"]):
        raise ValueError(f"a quantized store's down columns are grouped block values, this one's are "
                         f"{kinds['down']}; re-run `flashllm convert` with this version")


def kernel_slots(capacity: int) -> int:
    """Slots a cache of `capacity` rows holds: whole int4 tiles (none for an uncached layer's)."""
    return -(-capacity // TILE_ROWS) * TILE_ROWS


def kernel_rows_arrays(layout: FfnLayout, capacity: int) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of each array a cache of `capacity` rows holds (see the module docstring)."""
    kinds = layout.part_kinds()
    d = dict((name, n) for name, n, _ in layout.bundle_parts)["up"]
    cap = kernel_slots(capacity)
    rows = (2 if "gate" in kinds else 1) * cap
    arrays: list[tuple[str, tuple[int, ...], np.dtype]] = []
    if kinds["up"] in ("q4_0", "q4_1"):
        arrays += [("packed", (rows, d // 2), np.dtype(np.uint8)),
                   ("scale_words", (d // BLOCK_WEIGHTS, rows), np.dtype(np.uint32))]
    else:
        arrays.append(("rows_bits", (rows, d), np.dtype(np.uint16)))
    arrays.append(("down_values", (cap, down_value_bytes(qf.block_kind_of_column(kinds["down"]), d)),
                   np.dtype(np.uint8)))
    if "gate" not in kinds:
        arrays.append(("up_bias", (cap,), np.dtype(np.float32)))
    arrays += [("neuron_ids", (cap,), np.dtype(np.int64)), ("used", (1,), np.dtype(np.int64))]
    return arrays


def kernel_rows_bytes(layout: FfnLayout, capacity: int) -> int:
    """What a cache of `capacity` rows holds in these layouts, known before making one (the memory plan's)."""
    return sum(int(np.prod(shape)) * dtype.itemsize for _, shape, dtype in kernel_rows_arrays(layout, capacity))


class KernelRowsView:
    """What compute reads of a layer's KernelRows (in the worker runtime, over the shared arrays the
    prefetch process writes): the arrays, the slots in use and the neuron at each."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.neuron_ids = arrays["neuron_ids"]  # (cap,)
        self._used = arrays["used"]  # (1,)

    @property
    def used(self) -> int:
        return int(self._used[0])

    def held_ids(self) -> np.ndarray:
        """(used,) the neuron at each slot in use, -1 for a hole."""
        return self.neuron_ids[: self.used]


class KernelRows(KernelRowsView):
    """One layer's cached neurons in the kernels' layouts, slot by slot; the prefetcher's NeuronCache writes it."""

    def __init__(self, layout: FfnLayout, capacity: int, num_neurons: int,
                 arrays: dict[str, np.ndarray] | None = None):
        """arrays: the kernel_rows_arrays() to write (shared memory), else allocated here."""
        self.kinds = kinds = layout.part_kinds()
        require_grouped_down(kinds)
        self.byte_slices = layout.part_byte_slices()
        self.row_kind = kinds["up"]
        self.gated = "gate" in kinds
        self.d = dict((name, n) for name, n, _ in layout.bundle_parts)["up"]
        self.capacity = kernel_slots(capacity)
        specs = kernel_rows_arrays(layout, capacity)
        if arrays is None:
            arrays = {name: np.zeros(shape, dtype) for name, shape, dtype in specs}
        for name, shape, dtype in specs:
            if arrays[name].shape != shape or arrays[name].dtype != dtype:
                raise ValueError(f"kernel rows array {name!r} is {arrays[name].shape} {arrays[name].dtype}, "
                                 f"expected {shape} {dtype}")
        super().__init__(arrays)
        self.neuron_ids[:] = -1
        self._used[0] = 0
        self.slot_of = np.full(num_neurons, -1, dtype=np.int64)  # (n_ff,)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def _matrix_rows(self, slots: np.ndarray) -> list[np.ndarray]:
        """Rows of the gate (then up) matrix that slots (k,) use, one array per matrix."""
        return [slots + index * self.capacity for index in range(2 if self.gated else 1)]

    def depart(self, ids: np.ndarray) -> None:
        """Neurons ids (k,), cached, leave: their slots become holes that add nothing to a product."""
        slots = self.slot_of[ids]  # (k,)
        if (slots < 0).any():
            raise ValueError(f"depart: neuron {int(ids[slots < 0][0])} holds no slot")
        rows = np.concatenate(self._matrix_rows(slots))  # (m·k,)
        if "scale_words" in self.arrays:
            self.arrays["scale_words"][:, rows] = 0  # scale 0, zero 0: every weight of the row is 0
        else:
            self.arrays["rows_bits"][rows] = 0
        if not self.gated:
            self.arrays["up_bias"][slots] = 0
        self.neuron_ids[slots] = -1
        self.slot_of[ids] = -1

    def arrive(self, ids: np.ndarray, bundles: np.ndarray) -> None:
        """Neurons ids (k,), not cached, arrive with their bundles (k, bundle_bytes) uint8 as read: into the
        lowest free slots."""
        if len(ids) == 0:
            return
        ids = np.asarray(ids, dtype=np.int64)
        if (self.slot_of[ids] >= 0).any():
            raise ValueError(f"arrive: neuron {int(ids[self.slot_of[ids] >= 0][0])} already holds a slot")
        used = self.used
        holes = np.flatnonzero(self.neuron_ids[:used] < 0)[: len(ids)]  # (h,)
        slots = np.concatenate((holes, np.arange(used, used + len(ids) - len(holes))))  # (k,)
        if len(slots) and slots[-1] >= self.capacity:
            raise ValueError(f"arrive: {len(ids)} neurons do not fit {self.capacity} slots "
                             f"({used - len(holes)} held)")
        self._write(slots, np.ascontiguousarray(bundles), ids)
        self.neuron_ids[slots] = ids
        self.slot_of[ids] = slots
        self._used[0] = max(used, int(slots[-1]) + 1)

    def _write(self, slots: np.ndarray, bundles: np.ndarray, ids: np.ndarray) -> None:
        parts = ("gate", "up") if self.gated else ("up",)
        for rows, name in zip(self._matrix_rows(slots), parts):
            first = self.byte_slices[name].start
            if self.row_kind == "q8_0":
                write_q8_rows(self.arrays["rows_bits"], rows, bundles, first)
                continue
            write_q4_rows(self.arrays["packed"], rows, bundles, first, block_bytes_of(self.row_kind), self.d)
            write_q4_scales(self.arrays["scale_words"], rows, bundles, first, self.row_kind)
        self.arrays["down_values"][slots] = bundles[:, self.byte_slices["down"]]
        if not self.gated:
            bias = qf.dequantize_rows(self.kinds["up_bias"], np.ascontiguousarray(
                bundles[:, self.byte_slices["up_bias"]]), 1)  # (k, 1)
            self.arrays["up_bias"][slots] = bias.reshape(-1)


def kernel_rows_for(layout: FfnLayout, capacity_rows: list[int],
                    arrays: list[dict[str, np.ndarray]] | None = None) -> list[KernelRows]:
    """Per layer, the KernelRows of a cache of capacity_rows[layer] (over `arrays`, shared memory, if given)."""
    return [KernelRows(layout, capacity, region.num_neurons, None if arrays is None else arrays[layer])
            for layer, (capacity, region) in enumerate(zip(capacity_rows, layout.layers))]
