"""Neuron bundles written into the CPU kernels' layouts, and the down sums over them, compiled (numba).

A quantized store's neuron cache holds each cached neuron the way the CPU
kernels multiply it (flash_io/kernel_rows.py); these loops put a step's
arrivals there. They run in the prefetch process, which has no torch, and
beside compute in one process; torch's indexing needs several passes over
memory for what one loop does in one (docs/benchmarks.md has both timings):

- 4-bit rows: torch's CPU int4 packing is not row-local. Inside a tile of 64
  rows, byte k·32 + (n mod 32) holds weight k of row n (low nibble when
  n mod 64 < 32) and of row n + 32 (high nibble): a row is 4 bits at a
  32-byte stride, a read-modify-write of bytes shared with another row.
- block scales → the int4 kernel's bfloat16 (scale, zero) pairs, one 32-bit
  word each (w = (q - 8)·scale + zero: Q4_0 is (d, 0), Q4_1 (d, m + 8d)).
- 8-bit rows (q8_0 gate/up) → bfloat16 rows d·q.
- down columns stay as stored (a neuron's 4- or 8-bit values; their scales are
  the layer's table, shared by the 32 neurons of a group): add_down_sums adds
  Σ_i a_i · down_i with each value decoded in float32 as it is used, exactly
  GGUF's d·q (+ m). Held as float16 rows they took 2-4x the bytes, which is
  cache the window did not get.
- whole tiles (a whole layer, or a chunk, in neuron order: what dense loads
  and naive converts every layer of every step): gate/up tiles written at
  once, and a whole layer's down columns as W_down's own int4 tiles.

A layer's conversion is a few calls here, each run without the GIL. In torch
it was ~25 ops a layer, each taking the GIL back, and on a converter thread
that doubled the computing thread's time per token (docs/benchmarks.md, stop 32).

numba has no float16 or bfloat16 type on the CPU: halves travel as their
uint16 bits, converted on the float32 bits exactly as numpy's and torch's
casts do (bfloat16 rounds to nearest even; a test checks every half), written
as selects so that the loops vectorize. numba, not a C extension: no compiler
at install time; compiled code is cached on disk (cache=True), so only a
machine's first run compiles. nogil: a reader or computing thread runs beside it.
"""
from __future__ import annotations

import numba
import numpy as np

from flashllm.protocol import quant_format as qf

TILE_ROWS = 64
BLOCK_WEIGHTS = qf.BLOCK_ELEMENTS


def block_bytes_of(kind: str) -> int:
    """Bytes of one GGUF block of `kind` (q4_0, q4_1, q8_0)."""
    return qf.bytes_per_row(kind, BLOCK_WEIGHTS)


@numba.njit(nogil=True, cache=True, inline="always")
def _half_bits_to_float(half):  # pragma: no cover - compiled
    """float16 bits (in a uint32) → float32, exactly, for every finite half (the scales are): as selects, not
    branches, so the loops around it vectorize."""
    magnitude = (half & np.uint32(0x7FFF)) << np.uint32(13)
    normal = np.uint32(magnitude + np.uint32(0x38000000))  # rebias the exponent: +112 << 23
    # zero and subnormals: place the mantissa under 2^-14's exponent, then take 2^-14 away (exact)
    small = np.float32(np.uint32(magnitude + np.uint32(0x38800000)).view(np.float32)
                       - np.float32(6.103515625e-05))  # 2^-14
    bits = np.uint32(small.view(np.uint32)) if (magnitude & np.uint32(0x0F800000)) == np.uint32(0) else normal
    return np.uint32(bits | ((half & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@numba.njit(nogil=True, cache=True, inline="always")
def _float_to_bfloat16_bits(value):  # pragma: no cover - compiled
    bits = np.float32(value).view(np.uint32)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(nogil=True, cache=True, inline="always")
def _half_of(low, high):  # pragma: no cover - compiled
    """The float16 whose little-endian bytes are low, high, as float32."""
    return _half_bits_to_float(np.uint32(low) | (np.uint32(high) << np.uint32(8)))


@numba.njit(nogil=True, cache=True, inline="always")
def _half_at(raw, row, at):  # pragma: no cover - compiled
    """The float16 stored little-endian at bytes [at, at + 2) of raw[row], as float32."""
    return _half_of(raw[row, at], raw[row, at + 1])


@numba.njit(nogil=True, cache=True)
def _write_q4_rows(packed, rows, bundles, first_block_byte, block_bytes, blocks_per_row):  # pragma: no cover
    """Row n of a tile shares its bytes with row n ^ 32 (low nibbles for n % 64 < 32, high ones above): where
    both arrive in this call their bytes are written whole, once, else a row's nibbles are read-modify-written
    (a cache refill at the 7B shape writes most slots: 1.5x faster a row there). A row given twice: the last."""
    tile_bytes = TILE_ROWS * blocks_per_row * 16  # 64 rows of d/2 bytes
    nibbles_at = block_bytes - 16  # a GGUF q4 block ends with its 16 bytes of nibbles
    index_of = np.full(packed.shape[0] // (blocks_per_row * 16), -1, np.int64)  # (R,) slot → its bundle here
    for i in range(rows.shape[0]):
        index_of[rows[i]] = i
    for i in range(rows.shape[0]):
        row = rows[i]
        high = (row % TILE_ROWS) >= 32
        partner = index_of[row ^ 32]  # the row sharing this one's bytes, if it arrives too
        if partner >= 0 and (high or index_of[row] != i):
            continue  # written with the low row's (last) bundle
        base = (row // TILE_ROWS) * tile_bytes + row % 32
        for group in range(blocks_per_row):
            block = first_block_byte + group * block_bytes + nibbles_at
            for j in range(16):  # block byte j: weight j (low nibble) and weight j + 16 (high nibble)
                value = bundles[i, block + j]
                low_at = base + (group * 32 + j) * 32
                high_at = low_at + 16 * 32
                if partner >= 0:
                    other = bundles[partner, block + j]
                    packed[low_at] = (value & 0x0F) | ((other & 0x0F) << 4)
                    packed[high_at] = (value >> 4) | (other & 0xF0)
                elif high:
                    packed[low_at] = (packed[low_at] & 0x0F) | ((value & 0x0F) << 4)
                    packed[high_at] = (packed[high_at] & 0x0F) | (value & 0xF0)
                else:
                    packed[low_at] = (packed[low_at] & 0xF0) | (value & 0x0F)
                    packed[high_at] = (packed[high_at] & 0xF0) | (value >> 4)


@numba.njit(nogil=True, cache=True, inline="always")
def _word_at(row, at):  # pragma: no cover - compiled
    """The 8 bytes row[at:at + 8] as a little-endian 64-bit word (any alignment: one load once compiled)."""
    word = np.uint64(0)
    for b in range(8):
        word |= np.uint64(row[at + b]) << np.uint64(8 * b)
    return word


@numba.njit(nogil=True, cache=True, inline="always")
def _swap_bytes(a, b, shift, mask):  # pragma: no cover - compiled
    """One step of an 8x8 byte transpose held in eight words: a's bytes under `mask` trade places with b's."""
    t = (a ^ (b << shift)) & mask
    return a ^ t, b ^ (t >> shift)


@numba.njit(nogil=True, cache=True)
def _write_q4_tiles(packed, first_row, bundles, first_block_byte, block_bytes, groups):  # pragma: no cover
    """Whole 64-row tiles, bundle rows in order from a tile's start: each tile's bytes written once, no
    read-modify-write. Per tile and block, rows n and n + 32 are paired a word (8 weights) at a time, then
    each 8 rows' words are transposed (three swap steps) into the tile's runs of 8 rows per weight."""
    row_bytes = groups * 16
    nibbles_at = block_bytes - 16
    out_words = packed.view(np.uint64)
    low_nibbles, high_nibbles = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0xF0F0F0F0F0F0F0F0)
    odd_bytes, odd_halves, odd_words = (np.uint64(0xFF00FF00FF00FF00), np.uint64(0xFFFF0000FFFF0000),
                                        np.uint64(0xFFFFFFFF00000000))
    four, eight, sixteen, thirty_two = np.uint64(4), np.uint64(8), np.uint64(16), np.uint64(32)
    # words[c, n]: the paired bytes of rows n and n + 32 for weights 0-7, 8-15 (low nibbles), 16-23, 24-31
    words = np.empty((4, 32), np.uint64)
    for tile in range(bundles.shape[0] // TILE_ROWS):
        base = (first_row + tile * TILE_ROWS) * row_bytes // 8  # the tile's first word
        for group in range(groups):
            at = first_block_byte + group * block_bytes + nibbles_at
            for n in range(32):
                lower, upper = bundles[tile * TILE_ROWS + n], bundles[tile * TILE_ROWS + 32 + n]
                a0, a1 = _word_at(lower, at), _word_at(lower, at + 8)
                b0, b1 = _word_at(upper, at), _word_at(upper, at + 8)
                words[0, n] = (a0 & low_nibbles) | ((b0 & low_nibbles) << four)
                words[1, n] = (a1 & low_nibbles) | ((b1 & low_nibbles) << four)
                words[2, n] = ((a0 >> four) & low_nibbles) | (b0 & high_nibbles)
                words[3, n] = ((a1 >> four) & low_nibbles) | (b1 & high_nibbles)
            for c in range(4):
                first_weight = group * 32 + (c // 2) * 16 + (c % 2) * 8
                for block in range(4):  # rows 8·block .. 8·block + 7
                    n = block * 8
                    x0, x1 = _swap_bytes(words[c, n], words[c, n + 1], eight, odd_bytes)
                    x2, x3 = _swap_bytes(words[c, n + 2], words[c, n + 3], eight, odd_bytes)
                    x4, x5 = _swap_bytes(words[c, n + 4], words[c, n + 5], eight, odd_bytes)
                    x6, x7 = _swap_bytes(words[c, n + 6], words[c, n + 7], eight, odd_bytes)
                    x0, x2 = _swap_bytes(x0, x2, sixteen, odd_halves)
                    x1, x3 = _swap_bytes(x1, x3, sixteen, odd_halves)
                    x4, x6 = _swap_bytes(x4, x6, sixteen, odd_halves)
                    x5, x7 = _swap_bytes(x5, x7, sixteen, odd_halves)
                    x0, x4 = _swap_bytes(x0, x4, thirty_two, odd_words)
                    x1, x5 = _swap_bytes(x1, x5, thirty_two, odd_words)
                    x2, x6 = _swap_bytes(x2, x6, thirty_two, odd_words)
                    x3, x7 = _swap_bytes(x3, x7, thirty_two, odd_words)
                    at_word = base + first_weight * 4 + block  # tile byte weight·32 + n, in words
                    out_words[at_word], out_words[at_word + 4] = x0, x1
                    out_words[at_word + 8], out_words[at_word + 12] = x2, x3
                    out_words[at_word + 16], out_words[at_word + 20] = x4, x5
                    out_words[at_word + 24], out_words[at_word + 28] = x6, x7


@numba.njit(nogil=True, cache=True)
def _write_down_q4_tiles(down_pairs, bundles, first_byte, d):  # pragma: no cover - compiled
    """down_pairs (d/64, cap, 16) uint16, the int4 tiles of W_down (d, cap) two bytes at a time: neuron k's column
    (byte i: rows 2i low, 2i + 1 high) → byte 2i (2i + 1) of tile t at k holds row 64t + 2i (+ 1) low and
    64t + 32 + 2i (+ 1) high. Tile by tile, so the writes run in order."""
    for tile in range(d // TILE_ROWS):
        at = first_byte + tile * 32
        for k in range(bundles.shape[0]):
            column = bundles[k]
            pairs = down_pairs[tile, k]
            for i in range(16):
                lower, upper = np.uint16(column[at + i]), np.uint16(column[at + 16 + i])
                pairs[i] = ((lower & 0x0F) | ((upper & 0x0F) << 4)) | (((lower >> 4) | (upper & 0xF0)) << 8)


@numba.njit(nogil=True, cache=True)
def _write_q4_scales(scale_words, rows, bundles, first_block_byte, block_bytes, with_min
                     ):  # pragma: no cover - compiled
    """scale_words (G, R) uint32: word g of row r = bfloat16 scale (low half) | bfloat16 zero (high half)."""
    groups = scale_words.shape[0]
    for group in range(groups):  # group by group: each group's words are one row of scale_words
        at = first_block_byte + group * block_bytes
        for i in range(rows.shape[0]):
            row = rows[i]
            d = _half_at(bundles, i, at)
            zero = np.float32(0.0)
            if with_min:
                zero = np.float32(_half_at(bundles, i, at + 2) + np.float32(8.0) * d)  # 8d is exact: one rounding
            scale_words[group, row] = np.uint32(_float_to_bfloat16_bits(d)) | \
                (np.uint32(_float_to_bfloat16_bits(zero)) << 16)


@numba.njit(nogil=True, cache=True)
def _write_q8_rows(rows_bits, rows, bundles, first_block_byte, block_bytes):  # pragma: no cover - compiled
    """rows_bits (R, d) uint16 bfloat16 bits ← d·q of each q8_0 block (2 bytes d, 32 int8)."""
    groups = rows_bits.shape[1] // BLOCK_WEIGHTS
    for i in range(rows.shape[0]):
        row = rows[i]
        for group in range(groups):
            at = first_block_byte + group * block_bytes
            d = _half_at(bundles, i, at)
            for j in range(BLOCK_WEIGHTS):
                q = np.float32(np.int8(bundles[i, at + 2 + j]))
                rows_bits[row, group * BLOCK_WEIGHTS + j] = _float_to_bfloat16_bits(np.float32(q * d))


@numba.njit(nogil=True, cache=True, inline="always")
def _scaled(q, table_bits, group, r):  # pragma: no cover - compiled
    """q4_0, q8_0: d_r·q."""
    return np.float32(q * _half_bits_to_float(np.uint32(table_bits[group, 0, r])))


@numba.njit(nogil=True, cache=True, inline="always")
def _minimum(table_bits, group, r):  # pragma: no cover - compiled
    """q4_1: m_r."""
    return _half_bits_to_float(np.uint32(table_bits[group, 1, r]))


# out (d,) float32 += Σ_i weights[i] · the down column of the neuron at slot slots[i]: value r = d_r·(q_r - centre)
# (+ m_r for q4_1), with d_r (and m_r) from the neuron's group's row of table_bits (G, c, d) uint16, q_r a nibble
# of values[slot] (byte r/2: even r low, odd r high) or an int8. Slots whose neuron id is negative (holes) add
# nothing. The neurons are added one after another in the order given, every value in float32: a token's sum
# has the same bits whatever else is cached or batched. One function per formula: a flag tested inside the
# loop keeps it from vectorizing, and a function passed in defeats numba's on-disk cache.

@numba.njit(nogil=True, cache=True)
def _add_nibble_down_sums(out, weights, slots, values, neuron_ids, table_bits, centre):  # pragma: no cover
    offset = np.float32(centre)
    for i in range(slots.shape[0]):
        slot = slots[i]
        if neuron_ids[slot] < 0:
            continue
        group, weight = neuron_ids[slot] // BLOCK_WEIGHTS, np.float32(weights[i])
        for pair in range(out.shape[0] // 2):  # a byte's two values in two statements: it vectorizes
            byte = values[slot, pair]
            out[2 * pair] += weight * _scaled(np.float32(byte & 0x0F) - offset, table_bits, group, 2 * pair)
            out[2 * pair + 1] += weight * _scaled(np.float32(byte >> 4) - offset, table_bits, group, 2 * pair + 1)


@numba.njit(nogil=True, cache=True)
def _add_nibble_down_sums_with_min(out, weights, slots, values, neuron_ids, table_bits):  # pragma: no cover
    for i in range(slots.shape[0]):
        slot = slots[i]
        if neuron_ids[slot] < 0:
            continue
        group, weight = neuron_ids[slot] // BLOCK_WEIGHTS, np.float32(weights[i])
        for pair in range(out.shape[0] // 2):
            byte = values[slot, pair]
            out[2 * pair] += weight * np.float32(_scaled(np.float32(byte & 0x0F), table_bits, group, 2 * pair)
                                                 + _minimum(table_bits, group, 2 * pair))
            out[2 * pair + 1] += weight * np.float32(_scaled(np.float32(byte >> 4), table_bits, group, 2 * pair + 1)
                                                     + _minimum(table_bits, group, 2 * pair + 1))


@numba.njit(nogil=True, cache=True)
def _add_byte_down_sums(out, weights, slots, values, neuron_ids, table_bits):  # pragma: no cover - compiled
    """As _add_nibble_down_sums for q8_0 values: value r = d_r·q_r, q_r an int8."""
    for i in range(slots.shape[0]):
        slot = slots[i]
        if neuron_ids[slot] < 0:
            continue
        group, weight = neuron_ids[slot] // BLOCK_WEIGHTS, np.float32(weights[i])
        for r in range(out.shape[0]):
            out[r] += weight * _scaled(np.float32(np.int8(values[slot, r])), table_bits, group, r)


def down_value_bytes(block_kind: str, d: int) -> int:
    """Bytes of one neuron's down column as stored: d values of 4 bits (q4_0, q4_1) or 8 (q8_0)."""
    return d if block_kind == "q8_0" else d // 2


def add_down_sums(out: np.ndarray, weights: np.ndarray, slots: np.ndarray, values: np.ndarray,
                  neuron_ids: np.ndarray, table_group_major: np.ndarray, block_kind: str) -> None:
    """out (d,) float32 += Σ_i weights[i] · down column of the neuron at slots[i] (k,), in that order: values
    (cap, down_value_bytes) uint8 are each slot's column as stored, neuron_ids (cap,) the neuron at each slot
    (-1: a hole, which adds nothing), table_group_major (n_ff/32, c, d) float16 the layer's scale table."""
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.ndim != 1:
        raise ValueError("add_down_sums adds into a contiguous (d,) float32 vector")
    if values.shape[1] != down_value_bytes(block_kind, out.shape[0]) or values.dtype != np.uint8:
        raise ValueError(f"down values {values.shape} {values.dtype} are not {block_kind} columns of "
                         f"{out.shape[0]} values")
    channels = 2 if block_kind == "q4_1" else 1  # (d, m) or d per value
    if table_group_major.ndim != 3 or table_group_major.shape[1] < channels or \
            table_group_major.shape[2] != out.shape[0]:
        raise ValueError(f"scale table {table_group_major.shape} is not group-major (n_ff/32, c, d) for "
                         f"{block_kind} columns of {out.shape[0]} values")
    slots = _checked_rows(slots, len(weights), values.shape[0])
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    table_bits = np.ascontiguousarray(table_group_major).view(np.uint16)
    if block_kind == "q8_0":
        _add_byte_down_sums(out, weights, slots, values, neuron_ids, table_bits)
    elif block_kind == "q4_1":
        _add_nibble_down_sums_with_min(out, weights, slots, values, neuron_ids, table_bits)
    else:
        _add_nibble_down_sums(out, weights, slots, values, neuron_ids, table_bits, 8)


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float16 bits → float32 as the compiled loops widen them (what the tests check them by)."""
    flat = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    return _each_half_to_float(flat).reshape(np.shape(bits))


@numba.njit(cache=True)
def _each_half_to_float(bits):  # pragma: no cover - compiled
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = _half_bits_to_float(np.uint32(bits[i]))
    return out


def _checked_rows(rows: np.ndarray, count: int, limit: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if len(rows) != count:
        raise ValueError(f"{len(rows)} rows for {count} bundles")
    if len(rows) and (rows.min() < 0 or rows.max() >= limit):
        raise IndexError(f"rows must be in [0, {limit}); got {rows.min()}..{rows.max()}")
    return rows


def write_q4_rows(packed: np.ndarray, rows: np.ndarray, bundles: np.ndarray, first_block_byte: int,
                  block_bytes: int, d: int) -> None:
    """packed (R, d/2) uint8, torch's int4 tile layout, R a multiple of 64: rows `rows` (k,) get the 4-bit
    values of the GGUF q4_0/q4_1 blocks at bytes [first_block_byte, first_block_byte + d/32·block_bytes) of
    bundles (k, bundle_bytes) uint8; every other row's nibbles stay as they were. Scales: write_q4_scales."""
    if packed.dtype != np.uint8 or bundles.dtype != np.uint8 or not packed.flags.c_contiguous:
        raise ValueError("write_q4_rows takes a contiguous uint8 packed matrix and uint8 bundles")
    if packed.shape[0] % TILE_ROWS or packed.shape[1] * 2 != d or d % BLOCK_WEIGHTS:
        raise ValueError(f"packed {packed.shape} is not whole 64-row tiles of d={d} 4-bit weights")
    rows = _checked_rows(rows, len(bundles), packed.shape[0])
    if first_block_byte + d // BLOCK_WEIGHTS * block_bytes > bundles.shape[1]:
        raise ValueError(f"the blocks end past a bundle's {bundles.shape[1]} bytes")
    _write_q4_rows(packed.reshape(-1), rows, bundles, first_block_byte, block_bytes, d // BLOCK_WEIGHTS)


def write_q4_tiles(packed: np.ndarray, first_row: int, bundles: np.ndarray, first_block_byte: int,
                   block_bytes: int, d: int) -> None:
    """packed (R, d/2) uint8, torch's int4 tile layout: rows [first_row, first_row + k) get the 4-bit values of
    the q4_0/q4_1 blocks at first_block_byte of bundles (k, bundle_bytes), k a multiple of 64 and first_row on
    a tile's start, whole tiles written at once (a whole layer or a chunk: ~3x faster a row than
    write_q4_rows' read-modify-write). Scales: write_q4_scales. One call, no GIL: compute's thread runs on."""
    if packed.dtype != np.uint8 or bundles.dtype != np.uint8 or not packed.flags.c_contiguous:
        raise ValueError("write_q4_tiles takes a contiguous uint8 packed matrix and uint8 bundles")
    k = bundles.shape[0]
    if packed.shape[1] * 2 != d or d % BLOCK_WEIGHTS or k % TILE_ROWS or first_row % TILE_ROWS or \
            first_row + k > packed.shape[0]:
        raise ValueError(f"rows [{first_row}, {first_row + k}) are not whole 64-row tiles of packed {packed.shape} "
                         f"(d={d})")
    if first_block_byte + d // BLOCK_WEIGHTS * block_bytes > bundles.shape[1]:
        raise ValueError(f"the blocks end past a bundle's {bundles.shape[1]} bytes")
    _write_q4_tiles(packed.reshape(-1), first_row, bundles, first_block_byte, block_bytes, d // BLOCK_WEIGHTS)


def write_down_q4_tiles(down_packed: np.ndarray, bundles: np.ndarray, first_byte: int, d: int) -> None:
    """down_packed (d, cap/2) uint8: W_down (d, cap) in torch's int4 tile layout, its first k neurons' values
    from the 4-bit down columns at first_byte of bundles (k, bundle_bytes) (a whole layer in neuron order)."""
    if down_packed.dtype != np.uint8 or not down_packed.flags.c_contiguous or down_packed.shape[0] != d or \
            d % TILE_ROWS:
        raise ValueError(f"down_packed {down_packed.shape} is not a contiguous (d={d}, cap/2) tile matrix")
    cap = down_packed.shape[1] * 2
    if bundles.shape[0] > cap or first_byte + d // 2 > bundles.shape[1]:
        raise ValueError(f"{bundles.shape[0]} columns of {d // 2} bytes at {first_byte} do not fit {cap} slots "
                         f"of bundles {bundles.shape}")
    _write_down_q4_tiles(down_packed.reshape(-1).view(np.uint16).reshape(d // TILE_ROWS, cap, 16), bundles,
                         first_byte, d)


def write_q4_scales(scale_words: np.ndarray, rows: np.ndarray, bundles: np.ndarray, first_block_byte: int,
                    kind: str) -> None:
    """scale_words (G, R) uint32, the int4 kernel's (scale, zero) bfloat16 pairs as words: rows (k,) get those
    of the q4_0/q4_1 blocks at first_block_byte of bundles (k, bundle_bytes) uint8."""
    rows = _checked_rows(rows, len(bundles), scale_words.shape[1])
    _write_q4_scales(scale_words, rows, bundles, first_block_byte, block_bytes_of(kind), kind == "q4_1")


def write_q8_rows(rows_bits: np.ndarray, rows: np.ndarray, bundles: np.ndarray, first_block_byte: int) -> None:
    """rows_bits (R, d) uint16 (bfloat16 bits): rows (k,) get d·q of the q8_0 blocks at first_block_byte."""
    rows = _checked_rows(rows, len(bundles), rows_bits.shape[0])
    _write_q8_rows(rows_bits, rows, bundles, first_block_byte, block_bytes_of("q8_0"))


def load_compiled_loops() -> None:
    """Compile (or load from numba's cache) every loop here now, on tiny arrays: a process that will write
    kernel rows pays it while it starts, not in its first decode step (a second or more on a loaded box)."""
    d = 64
    bundles = np.zeros((1, 3 * d // BLOCK_WEIGHTS * block_bytes_of("q8_0")), dtype=np.uint8)
    rows = np.zeros(1, dtype=np.int64)
    write_q4_rows(np.zeros((TILE_ROWS, d // 2), np.uint8), rows, bundles, 0, block_bytes_of("q4_1"), d)
    write_q4_tiles(np.zeros((TILE_ROWS, d // 2), np.uint8), 0, np.zeros((TILE_ROWS, bundles.shape[1]), np.uint8), 0,
                   block_bytes_of("q4_1"), d)
    write_down_q4_tiles(np.zeros((d, TILE_ROWS // 2), np.uint8), np.zeros((TILE_ROWS, d), np.uint8), 0, d)
    for kind in ("q4_0", "q4_1"):
        write_q4_scales(np.zeros((d // BLOCK_WEIGHTS, TILE_ROWS), np.uint32), rows, bundles, 0, kind)
    write_q8_rows(np.zeros((TILE_ROWS, d), np.uint16), rows, bundles, 0)
    for kind in ("q4_0", "q4_1", "q8_0"):
        add_down_sums(np.zeros(d, np.float32), np.ones(1, np.float32), rows,
                      np.zeros((1, down_value_bytes(kind, d)), np.uint8), rows, np.zeros((1, 2, d), np.float16), kind)

