"""A SwiGLU layer's FFN multiplied straight from its bundles as read, for a decode step (compiled, numba).

Naive streams most layers of a model below its size at every token. Put in
the int4 kernels' layout first (quant_ffn.QuantNeuronMatrix.load_whole_layer),
a layer's conversion took several times its products; these loops take the
bundles as flash gave them, [gate_i | up_i | down_i] in GGUF's blocks
(protocol/quant_format.py), and multiply them in one pass (docs/benchmarks.md,
stop 35, has the timings). For many tokens (a prompt) the conversion pays once
for all of them and the kernels win: `direct_products_pay` decides, one place
for every caller.

The math is GGUF's, in float32: a gate/up block's dot is d·Σq·x (+ m·Σx for
q4_1, − 8d·Σx for q4_0) and a neuron group's down sum is d_r·Σa·q_r (+ m_r·Σa,
− 8d_r·Σa) with the group's row of the layer's scale table. The activations
stay float32 (the int4 kernels take bfloat16), so a product here is closer to
the float reference than the kernels' is, not bit-equal to it. Torch-free, as
the other compiled loops (memory baselines load them in a torch-free process).

Layouts: the 16 nibble bytes of a q4 block are walked as 16 lanes (byte j:
weight j low, weight j + 16 high) with the block's scale applied per lane, so
the loop over a block is one vector op; the block arrays are 3-D views of the
bundles (rows, blocks, block bytes) because numba vectorizes indexing by
constants there, not offsets computed in the loop (3x slower when it did).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import FfnLayout
from flashllm.workers.flash_io.kernel_layout import _half_bits_to_float, _half_of

# A forward call of at most this many tokens multiplies the bundles directly; more convert the layer once and
# use the int4 kernels, whose cost grows less with the tokens (the break-even measured on the demo's layers,
# docs/benchmarks.md, stop 35).
DIRECT_MAX_TOKENS = 4

_GATE_UP_KINDS = ("q4_0", "q4_1", "q8_0")


@numba.njit(nogil=True, cache=True, inline="always")
def _swiglu(gate, up):  # pragma: no cover - compiled
    """A neuron's activation from its gate and up products: silu(gate)·up."""
    return gate / (np.float32(1) + np.exp(-gate)) * up


@numba.njit(nogil=True, cache=True, fastmath=True)
def _gate_up_q4(blocks, nibbles, x_lanes, x_block_sums, with_min, acts):  # pragma: no cover - compiled
    """blocks (n, 2·nb, 18|20) uint8: row i's gate blocks then its up blocks, nibbles the same blocks' last 16
    bytes (a view: indexed from 0, it vectorizes); x_lanes (N, nb, 2, 16): each token's inputs j and j + 16 of
    block b; x_block_sums (N, nb) → acts (N, n) = silu(gate·x)·(up·x)."""
    n, nb = blocks.shape[0], x_lanes.shape[1]
    lanes_gate = np.empty(16, np.float32)
    lanes_up = np.empty(16, np.float32)
    for i in range(n):
        for t in range(x_lanes.shape[0]):
            lanes_gate[:] = 0
            lanes_up[:] = 0
            gate = np.float32(0)
            up = np.float32(0)
            for b in range(nb):
                d_gate = _half_of(blocks[i, b, 0], blocks[i, b, 1])
                d_up = _half_of(blocks[i, nb + b, 0], blocks[i, nb + b, 1])
                if with_min:  # w = d·q + m
                    gate += _half_of(blocks[i, b, 2], blocks[i, b, 3]) * x_block_sums[t, b]
                    up += _half_of(blocks[i, nb + b, 2], blocks[i, nb + b, 3]) * x_block_sums[t, b]
                else:  # w = d·(q - 8)
                    gate -= np.float32(8) * d_gate * x_block_sums[t, b]
                    up -= np.float32(8) * d_up * x_block_sums[t, b]
                for j in range(16):
                    byte_gate = nibbles[i, b, j]
                    byte_up = nibbles[i, nb + b, j]
                    x_low = x_lanes[t, b, 0, j]
                    x_high = x_lanes[t, b, 1, j]
                    lanes_gate[j] += d_gate * (np.float32(byte_gate & 0x0F) * x_low
                                               + np.float32(byte_gate >> 4) * x_high)
                    lanes_up[j] += d_up * (np.float32(byte_up & 0x0F) * x_low + np.float32(byte_up >> 4) * x_high)
            for j in range(16):
                gate += lanes_gate[j]
                up += lanes_up[j]
            acts[t, i] = _swiglu(gate, up)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _gate_up_q8(blocks, x_blocks, acts):  # pragma: no cover - compiled
    """As _gate_up_q4 for q8_0 blocks (n, 2·nb, 34) and x_blocks (N, nb, 32): w = d·q, q an int8."""
    n, nb = blocks.shape[0], x_blocks.shape[1]
    lanes_gate = np.empty(32, np.float32)
    lanes_up = np.empty(32, np.float32)
    for i in range(n):
        for t in range(x_blocks.shape[0]):
            lanes_gate[:] = 0
            lanes_up[:] = 0
            for b in range(nb):
                d_gate = _half_of(blocks[i, b, 0], blocks[i, b, 1])
                d_up = _half_of(blocks[i, nb + b, 0], blocks[i, nb + b, 1])
                for j in range(32):
                    lanes_gate[j] += d_gate * np.float32(np.int8(blocks[i, b, 2 + j])) * x_blocks[t, b, j]
                    lanes_up[j] += d_up * np.float32(np.int8(blocks[i, nb + b, 2 + j])) * x_blocks[t, b, j]
            acts[t, i] = _swiglu(lanes_gate.sum(), lanes_up.sum())


@numba.njit(nogil=True, cache=True, inline="always")
def _add_column_nibbles(sums, columns, i, a):  # pragma: no cover - compiled
    """sums (pairs, 2) += a · down column i's 4-bit values (columns (n, pairs) uint8: low nibble, high nibble)."""
    for p in range(sums.shape[0]):
        byte = columns[i, p]
        sums[p, 0] += a * np.float32(byte & 0x0F)
        sums[p, 1] += a * np.float32(byte >> 4)


@numba.njit(nogil=True, cache=True, inline="always")
def _add_group_nibbles(out, t, group, sums, act_sum, table_bits, centre, with_min):  # pragma: no cover - compiled
    """out[t] += neuron group `group`'s down sum from its sums (pairs, 2) and act_sum."""
    for p in range(sums.shape[0]):
        for half in range(2):
            r = 2 * p + half
            scale = _half_bits_to_float(np.uint32(table_bits[group, 0, r]))
            if with_min:
                minimum = _half_bits_to_float(np.uint32(table_bits[group, 1, r]))
                out[t, r] += scale * sums[p, half] + minimum * act_sum
            else:
                out[t, r] += scale * (sums[p, half] - np.float32(centre) * act_sum)


@numba.njit(nogil=True, cache=True, inline="always")
def _add_group_bytes(out, t, group, sums, table_bits):  # pragma: no cover - compiled
    """out[t] += neuron group `group`'s q8_0 down sum from its sums (d,)."""
    for r in range(sums.shape[0]):
        out[t, r] += _half_bits_to_float(np.uint32(table_bits[group, 0, r])) * sums[r]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _down_nibbles(columns, acts, table_bits, centre, with_min, out):  # pragma: no cover - compiled
    """out (N, d) += Σ_i acts[t, i] · down column i: columns (n, d/2) uint8 (value r: byte r/2, low nibble
    for even r), table_bits (n/32, c, d) the layer's float16 (d_r, m_r) per neuron group, as bits."""
    n, pairs = columns.shape
    sums = np.empty((pairs, 2), np.float32)
    for t in range(acts.shape[0]):
        for group in range((n + 31) // 32):
            sums[:] = 0
            act_sum = np.float32(0)
            for i in range(group * 32, min(n, group * 32 + 32)):
                a = acts[t, i]
                act_sum += a
                _add_column_nibbles(sums, columns, i, a)
            _add_group_nibbles(out, t, group, sums, act_sum, table_bits, centre, with_min)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _down_bytes(columns, acts, table_bits, out):  # pragma: no cover - compiled
    """As _down_nibbles for q8_0 columns (n, d) int8 bits: value r = d_r·q_r."""
    n, d = columns.shape
    sums = np.empty(d, np.float32)
    for t in range(acts.shape[0]):
        for group in range((n + 31) // 32):
            sums[:] = 0
            for i in range(group * 32, min(n, group * 32 + 32)):
                a = acts[t, i]
                for r in range(d):
                    sums[r] += a * np.float32(np.int8(columns[i, r]))
            _add_group_bytes(out, t, group, sums, table_bits)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _down_nibbles_of_ids(columns, ids, acts, table_bits, centre, with_min, out, open_group, open_sums,
                         open_act_sums):  # pragma: no cover - compiled
    """As _down_nibbles for the columns of neurons `ids` (n,) ascending, over calls in id order: each neuron
    group's sums are added to out when the next group starts, so a call leaves its last group open
    (open_group[0], open_sums (N, pairs, 2), open_act_sums (N,)) for the next call, or _close_nibbles. A
    token's sum depends only on its own acts: a neuron it does not keep (act 0) adds exact zeros."""
    n, pairs = columns.shape
    sums = np.empty((pairs, 2), np.float32)  # the open group's, for one token (contiguous: the loop vectorizes)
    for t in range(acts.shape[0]):
        group = open_group[0]
        sums[:] = open_sums[t]
        act_sum = open_act_sums[t]
        for i in range(n):
            g = ids[i] // 32
            if g != group:
                if group >= 0:
                    _add_group_nibbles(out, t, group, sums, act_sum, table_bits, centre, with_min)
                sums[:] = 0
                act_sum = np.float32(0)
                group = g
            a = acts[t, i]
            act_sum += a
            _add_column_nibbles(sums, columns, i, a)
        open_sums[t] = sums
        open_act_sums[t] = act_sum
    if n:
        open_group[0] = ids[n - 1] // 32


@numba.njit(nogil=True, cache=True, fastmath=True)
def _close_nibbles(out, open_group, open_sums, open_act_sums, table_bits, centre,
                   with_min):  # pragma: no cover - compiled
    if open_group[0] >= 0:
        for t in range(out.shape[0]):
            _add_group_nibbles(out, t, open_group[0], open_sums[t], open_act_sums[t], table_bits, centre, with_min)
        open_group[0] = -1


@numba.njit(nogil=True, cache=True, fastmath=True)
def _down_bytes_of_ids(columns, ids, acts, table_bits, out, open_group, open_sums):  # pragma: no cover - compiled
    """As _down_nibbles_of_ids for q8_0 columns (n, d) int8 bits; open_sums (N, d)."""
    n, d = columns.shape
    sums = np.empty(d, np.float32)
    for t in range(acts.shape[0]):
        group = open_group[0]
        sums[:] = open_sums[t]
        for i in range(n):
            g = ids[i] // 32
            if g != group:
                if group >= 0:
                    _add_group_bytes(out, t, group, sums, table_bits)
                sums[:] = 0
                group = g
            a = acts[t, i]
            for r in range(d):
                sums[r] += a * np.float32(np.int8(columns[i, r]))
        open_sums[t] = sums
    if n:
        open_group[0] = ids[n - 1] // 32


@numba.njit(nogil=True, cache=True, fastmath=True)
def _close_bytes(out, open_group, sums, table_bits):  # pragma: no cover - compiled
    if open_group[0] >= 0:
        for t in range(out.shape[0]):
            _add_group_bytes(out, t, open_group[0], sums[t], table_bits)
        open_group[0] = -1


@functools.cache
def load_compiled_products() -> None:
    """Compile (or load from numba's cache) every loop here now, on tiny arrays: an engine that will multiply
    bundles pays it while it starts, not in its first decode step (seconds on a machine's first run). Once a
    process: later calls return at once."""
    # views of a bundle array, as RawBundleRows passes them: numba compiles one version per array layout
    bundles = np.zeros((32, 128), np.uint8)
    acts = np.zeros((1, 32), np.float32)
    for block_bytes in (18, 20):
        blocks = bundles[:, :2 * block_bytes].reshape(32, 2, block_bytes)
        _gate_up_q4(blocks, blocks[:, :, -16:], np.zeros((1, 1, 2, 16), np.float32), np.zeros((1, 1), np.float32),
                    block_bytes == 20, acts)
    _gate_up_q8(bundles[:, :68].reshape(32, 2, 34), np.zeros((1, 1, 32), np.float32), acts)
    for with_min in (False, True):
        _down_nibbles(bundles[:, :16], acts, np.zeros((1, 2, 32), np.uint16), 8, with_min,
                      np.zeros((1, 32), np.float32))
    _down_bytes(bundles[:, :32], acts, np.zeros((1, 1, 32), np.uint16), np.zeros((1, 32), np.float32))
    ids, group = np.arange(32, dtype=np.int64), np.full(1, -1, np.int64)
    out = np.zeros((1, 32), np.float32)
    for with_min in (False, True):
        table = np.zeros((1, 2, 32), np.uint16)
        _down_nibbles_of_ids(bundles[:, :16], ids, acts, table, 8, with_min, out, group,
                             np.zeros((1, 16, 2), np.float32), np.zeros(1, np.float32))
        _close_nibbles(out, group, np.zeros((1, 16, 2), np.float32), np.zeros(1, np.float32), table, 8, with_min)
    _down_bytes_of_ids(bundles[:, :32], ids, acts, np.zeros((1, 1, 32), np.uint16), out, group,
                       np.zeros((1, 32), np.float32))
    _close_bytes(out, group, np.zeros((1, 32), np.float32), np.zeros((1, 1, 32), np.uint16))


def direct_products_apply(layout: FfnLayout) -> bool:
    """Whether this store's layers can be multiplied straight from their bundles: a quantized SwiGLU layout whose
    bundle is [gate | up | down], gate and up of one block kind, down grouped columns (a GGUF llama store)."""
    if not layout.is_quantized:
        return False
    if [name for name, _, _ in layout.bundle_parts] != ["gate", "up", "down"]:
        return False
    kinds = layout.part_kinds()
    return kinds["gate"] == kinds["up"] and kinds["gate"] in _GATE_UP_KINDS and \
        kinds["down"] == qf.GROUPED_COLUMN_KINDS[kinds["gate"]]


def direct_products_pay(num_tokens: int) -> bool:
    """A forward call of num_tokens tokens multiplies bundles directly rather than converting the layer."""
    return num_tokens <= DIRECT_MAX_TOKENS


class _BundleParts:
    """Bundles as read (k, bundle_bytes) uint8 seen as the loops take them, with the layer's down scale table, and
    their activations. A view of the reader's buffer: valid while that buffer is not read into."""

    def __init__(self, layout: FfnLayout, bundles: np.ndarray, down_table: np.ndarray):
        """down_table: the layer's (d, n_ff/32, c) float16 table, a view of group-major memory (store_reader)."""
        self.kind = layout.part_kinds()["gate"]
        self.d = layout.bundle_parts[0][1]
        byte_slices = layout.part_byte_slices()
        block_bytes = qf.bytes_per_row(self.kind, qf.BLOCK_ELEMENTS)
        n = bundles.shape[0]
        gate_up = bundles[:, byte_slices["gate"].start:byte_slices["up"].stop]  # (n, 2·d/32·block bytes)
        self.blocks = gate_up.reshape(n, 2 * self.d // qf.BLOCK_ELEMENTS, block_bytes)  # (n, 2·nb, block bytes)
        self.down_columns = bundles[:, byte_slices["down"]]  # (n, d/2) or (n, d)
        self.table_bits = np.ascontiguousarray(down_table.transpose(1, 2, 0)).view(np.uint16)  # (n_ff/32, c, d)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.d)

    def activations(self, x_blocks: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """x_blocks (N, nb, 32) float32 → (N, k) float32: silu(gate·x)·(up·x) of rows [start, stop)."""
        num_tokens, nb = x_blocks.shape[:2]
        blocks = self.blocks[start:stop]
        acts = np.empty((num_tokens, blocks.shape[0]), np.float32)  # (N, k)
        if self.kind == "q8_0":
            _gate_up_q8(blocks, x_blocks, acts)
        else:
            _gate_up_q4(blocks, blocks[:, :, -16:], x_blocks.reshape(num_tokens, nb, 2, 16), x_blocks.sum(axis=2),
                        self.kind == "q4_1", acts)
        return acts


def blocks_of_inputs(x: np.ndarray) -> np.ndarray:
    """x (N, d) → (N, d/32, 32) float32: the inputs by block, as the loops take them."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape[0], -1, qf.BLOCK_ELEMENTS)


class RawBundleRows(_BundleParts):
    """A whole layer's bundles as read (n, bundle_bytes) uint8 and its down scale table: what ffn_from_rows
    multiplies with the loops above."""

    def __init__(self, layout: FfnLayout, bundles: np.ndarray, down_table: np.ndarray,
                 helper: ThreadPoolExecutor | None = None):
        """helper: a thread that multiplies the second half of the neurons while the caller does the first (the
        loops hold no GIL; on two cores a decode step's products are otherwise one core's)."""
        super().__init__(layout, bundles, down_table)
        self.helper = helper

    def ffn(self, x: np.ndarray) -> np.ndarray:
        """x (N, d) float32 → (N, d) float32: the layer's FFN (no down bias: a SwiGLU llama has none)."""
        x_blocks = blocks_of_inputs(x)  # (N, nb, 32)
        n = self.blocks.shape[0]
        split = n // 2 // qf.BLOCK_ELEMENTS * qf.BLOCK_ELEMENTS  # whole neuron groups: each half has its scales
        if self.helper is None or split == 0:
            return self._products(x_blocks, 0, n)
        second = self.helper.submit(self._products, x_blocks, split, n)
        out = self._products(x_blocks, 0, split)
        out += second.result()
        return out

    def _products(self, x_blocks: np.ndarray, start: int, stop: int) -> np.ndarray:
        """x_blocks (N, nb, 32) → (N, d) float32: the FFN over neurons [start, stop), start a multiple of 32."""
        num_tokens = x_blocks.shape[0]
        acts = self.activations(x_blocks, start, stop)  # (N, k)
        out = np.zeros((num_tokens, self.d), np.float32)  # (N, d)
        columns, table_bits = self.down_columns[start:stop], self.table_bits[start // qf.BLOCK_ELEMENTS:]
        if self.kind == "q8_0":
            _down_bytes(columns, acts, table_bits, out)
        else:
            _down_nibbles(columns, acts, table_bits, 8, self.kind == "q4_1", out)
        return out


class NeuronBundleRows(_BundleParts):
    """The bundles as read (k, bundle_bytes) of any neurons `neuron_ids` (k,) ascending of a layer (a decode step's
    masked read, or a chunk of it), with the layer's down table: what DirectSums multiplies."""

    def __init__(self, layout: FfnLayout, bundles: np.ndarray, down_table: np.ndarray, neuron_ids: np.ndarray):
        super().__init__(layout, bundles, down_table)
        self.neuron_ids = np.ascontiguousarray(neuron_ids, dtype=np.int64)  # (k,)


class DirectSums:
    """Each token's FFN over the neurons it keeps, from a masked read's NeuronBundleRows chunks in id order, in
    float32 (the loops above). A token's sum adds its neurons' groups in id order whatever the chunks are and
    whatever else they hold (a neighbour's neurons have act 0 for it), so it is the same in a batch as alone."""

    def __init__(self, x: np.ndarray):
        """x (N, d) float32: the tokens' FFN inputs."""
        self.x_blocks = blocks_of_inputs(x)  # (N, nb, 32)
        num_tokens, d = x.shape
        self.out = np.zeros((num_tokens, d), np.float32)  # (N, d)
        self.open_group = np.full(1, -1, np.int64)
        self.kind, self.table_bits = None, None
        self.sums = self.act_sums = None

    def add(self, rows: NeuronBundleRows, keep: np.ndarray) -> None:
        """rows: the next chunk (ids above the last chunk's); keep (N, k) bool: the rows each token computes."""
        acts = rows.activations(self.x_blocks)  # (N, k)
        acts *= keep
        num_tokens = acts.shape[0]
        if self.sums is None:
            self.kind, self.table_bits = rows.kind, rows.table_bits
            width = rows.down_columns.shape[1]
            self.sums = np.zeros((num_tokens, width) if rows.kind == "q8_0" else (num_tokens, width, 2), np.float32)
            self.act_sums = np.zeros(num_tokens, np.float32)
        if rows.kind == "q8_0":
            _down_bytes_of_ids(rows.down_columns, rows.neuron_ids, acts, rows.table_bits, self.out, self.open_group,
                               self.sums)
        else:
            _down_nibbles_of_ids(rows.down_columns, rows.neuron_ids, acts, rows.table_bits, 8, rows.kind == "q4_1",
                                 self.out, self.open_group, self.sums, self.act_sums)

    def result(self) -> np.ndarray:
        """(N, d) float32: the sums, the last group added."""
        if self.sums is not None:
            if self.kind == "q8_0":
                _close_bytes(self.out, self.open_group, self.sums, self.table_bits)
            else:
                _close_nibbles(self.out, self.open_group, self.sums, self.act_sums, self.table_bits, 8,
                               self.kind == "q4_1")
        return self.out
