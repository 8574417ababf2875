"""Block math of the store's weight kinds: bytes per row, quantize, dequantize.

A "kind" names how one row of `elements` weights is laid out in bytes. Rows of
the blocked kinds hold elements // 32 blocks back to back (elements % 32 == 0):

    float32   4 B per weight                   (little-endian IEEE)
    float16   2 B per weight
    bfloat16  2 B per weight                   (the high half of a float32)
    q4_0      18 B per 32: fp16 d | 16 B qs    w = d * (q - 8)
    q4_1      20 B per 32: fp16 d | fp16 m | 16 B qs    w = d * q + m
    q8_0      34 B per 32: fp16 d | 32 x int8 q         w = d * q
    q4_0_grouped_col   `elements` 4-bit q, 2 per byte (low nibble first)
    q4_1_grouped_col   the same
    q8_0_grouped_col   `elements` x int8 q

In q4_0/q4_1 weight j of a block is the low nibble of qs[j] for j < 16 and the
high nibble of qs[j - 16] for j >= 16: GGUF's own block layouts, so GGUF rows
are copied into a store unchanged.

The *_grouped_col kinds are a neuron's DOWN column. GGUF blocks ffn_down (d,
n_ff) along its rows, i.e. across neurons: for output row j and neuron group g
(neurons 32g .. 32g+31) one block holds d[j, g] (and m[j, g] for q4_1) and the
32 neurons' values. A column keeps only its values; the scales of the whole
layer are one small resident table, float16 (d, n_ff / 32, 2) for q4_1 (d, m)
and (d, n_ff / 32, 1) otherwise. So the store holds GGUF's blocks exactly, and
decoding a column needs its neuron id: `dequantize_grouped_columns`.

The quantizers follow GGUF's reference quantizers (ggml-quants.c, gguf.quants):
round-to-nearest per 32-weight block. K-quant rows (Q4_K, Q6_K) are re-blocked
here: Q4_K's 32-weight sub-blocks become q4_1 blocks (only the fp16 rounding of
each sub-block's scale and min changes), Q6_K becomes q8_0.

Pure numpy: convert writes with it, compute and tests read with it.
"""
from __future__ import annotations

import numpy as np

BLOCK_ELEMENTS = 32
K_BLOCK_ELEMENTS = 256  # QK_K: one Q4_K / Q6_K super-block

FLOAT_KINDS = ("float32", "float16", "bfloat16")
BLOCK_KINDS = ("q4_0", "q4_1", "q8_0")
GROUPED_COLUMN_KINDS = {"q4_0": "q4_0_grouped_col", "q4_1": "q4_1_grouped_col", "q8_0": "q8_0_grouped_col"}
QUANTIZED_KINDS = BLOCK_KINDS + tuple(GROUPED_COLUMN_KINDS.values())
KINDS = FLOAT_KINDS + QUANTIZED_KINDS

_FLOAT_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
_Q4_K_BLOCK_BYTES = 2 + 2 + 12 + K_BLOCK_ELEMENTS // 2  # d, dmin, packed 6-bit scales/mins, nibbles
_Q6_K_BLOCK_BYTES = K_BLOCK_ELEMENTS // 2 + K_BLOCK_ELEMENTS // 4 + K_BLOCK_ELEMENTS // 16 + 2


class QuantFormatError(ValueError):
    """A kind this build does not know, or a row length its blocks cannot hold."""


def is_quantized(kind: str) -> bool:
    _check_kind(kind)
    return kind in QUANTIZED_KINDS


def is_grouped_column(kind: str) -> bool:
    return kind in _GROUPED_BLOCK_KIND


_GROUPED_BLOCK_KIND = {grouped: block for block, grouped in GROUPED_COLUMN_KINDS.items()}


def block_kind_of_column(kind: str) -> str:
    """A grouped down column kind → the GGUF block kind its values and scales come from (q4_0, q4_1, q8_0)."""
    return _GROUPED_BLOCK_KIND[kind]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise QuantFormatError(f"unknown weight kind {kind!r}; this build knows {', '.join(KINDS)}")


def _check_blocked(kind: str, elements: int) -> None:
    if kind in BLOCK_KINDS and elements % BLOCK_ELEMENTS:
        raise QuantFormatError(f"{kind} rows hold whole {BLOCK_ELEMENTS}-weight blocks, but a row here has "
                               f"{elements} weights; use --dtype float16 for this model")


def bytes_per_row(kind: str, elements: int) -> int:
    """Bytes of one row of `elements` weights stored as `kind`."""
    _check_kind(kind)
    _check_blocked(kind, elements)
    if kind in _FLOAT_ITEMSIZE:
        return elements * _FLOAT_ITEMSIZE[kind]
    if kind in _GROUPED_BLOCK_KIND:
        return elements if kind == "q8_0_grouped_col" else -(-elements // 2)
    return elements // BLOCK_ELEMENTS * _BLOCK_BYTES[kind]


def _as_byte_rows(kind: str, raw: np.ndarray, elements: int) -> np.ndarray:
    """raw (..., bytes_per_row) as a contiguous uint8 array; checks the width."""
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8).reshape(*raw.shape[:-1], -1)
    expected = bytes_per_row(kind, elements)
    if raw.shape[-1] != expected:
        raise QuantFormatError(f"{kind} rows of {elements} weights are {expected} bytes, got rows of {raw.shape[-1]}")
    return raw


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs (..., 16) uint8 -> (..., 32) uint8 values 0..15 in weight order."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q (..., 32) values 0..15 -> (..., 16) uint8 (low nibble: weights 0..15, high: 16..31)."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << np.uint8(4))


def dequantize_rows(kind: str, raw: np.ndarray, elements: int) -> np.ndarray:
    """raw (..., bytes_per_row) uint8 -> (..., elements) float32."""
    raw = _as_byte_rows(kind, raw, elements)
    lead = raw.shape[:-1]
    if kind == "float32":
        return raw.view("<f4").reshape(*lead, elements).astype(np.float32)
    if kind == "float16":
        return raw.view("<f2").reshape(*lead, elements).astype(np.float32)
    if kind == "bfloat16":
        bits = raw.view("<u2").reshape(*lead, elements).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    if kind in _GROUPED_BLOCK_KIND:
        raise QuantFormatError(f"{kind} parts decode with dequantize_grouped_columns (they need their scales)")
    blocks = raw.reshape(*lead, elements // BLOCK_ELEMENTS, _BLOCK_BYTES[kind])  # (..., nb, block_bytes)
    d = blocks[..., 0:2].copy().view("<f2").astype(np.float32)  # (..., nb, 1)
    if kind == "q8_0":
        q = blocks[..., 2:].view(np.int8).astype(np.float32)  # (..., nb, 32)
        w = d * q
    elif kind == "q4_0":
        q = _unpack_nibbles(blocks[..., 2:]).astype(np.float32)
        w = d * (q - np.float32(8))
    else:  # q4_1
        m = blocks[..., 2:4].copy().view("<f2").astype(np.float32)
        q = _unpack_nibbles(blocks[..., 4:]).astype(np.float32)
        w = d * q + m
    return w.reshape(*lead, elements)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (what ggml's quantizers use), not numpy's round-half-to-even."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))  # gguf's np_roundf: no a + 0.5 rounding step


def quantize_rows(kind: str, w: np.ndarray) -> np.ndarray:
    """w (..., elements) float -> (..., bytes_per_row) uint8, round-to-nearest (GGUF's reference math)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    elements = w.shape[-1]
    lead = w.shape[:-1]
    bytes_per_row(kind, elements)  # checks kind and block divisibility
    if kind == "float32":
        return w.astype("<f4").view(np.uint8).reshape(*lead, -1)
    if kind == "float16":
        return w.astype("<f2").view(np.uint8).reshape(*lead, -1)
    if kind == "bfloat16":
        bits = w.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return rounded.astype("<u2").view(np.uint8).reshape(*lead, -1)
    if kind in _GROUPED_BLOCK_KIND:
        raise QuantFormatError(f"{kind} parts are written by split_down_blocks / quantize_down_columns")
    blocks = w.reshape(*lead, elements // BLOCK_ELEMENTS, BLOCK_ELEMENTS)  # (..., nb, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "q8_0":
            d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = _round_half_away(blocks * inv).astype(np.int8).view(np.uint8)
            parts = [d.astype("<f2").view(np.uint8), q]
        elif kind == "q4_0":
            imax = np.abs(blocks).argmax(axis=-1)[..., None]
            d = np.take_along_axis(blocks, imax, axis=-1) / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.clip(np.trunc(blocks * inv + np.float32(8.5)), 0, 15)
            parts = [d.astype("<f2").view(np.uint8), _pack_nibbles(q)]
        else:  # q4_1
            lo = blocks.min(axis=-1, keepdims=True)
            d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.clip(np.trunc((blocks - lo) * inv + np.float32(0.5)), 0, 15)
            parts = [d.astype("<f2").view(np.uint8), lo.astype("<f2").view(np.uint8), _pack_nibbles(q)]
    return np.concatenate(parts, axis=-1).reshape(*lead, -1)


# ---- down columns: GGUF's across-neuron blocks split into per-neuron values + a resident scale table ----

def down_scale_channels(block_kind: str) -> int:
    """Scale table entries per (output row, neuron group): 2 for q4_1 (d, m), 1 for q4_0 / q8_0 (d)."""
    return 2 if block_kind == "q4_1" else 1


def down_scale_table_shape(column_kind: str, d: int, n_ff: int) -> tuple[int, int, int]:
    """The (d, n_ff / 32, channels) float16 scale table of one layer's `column_kind` down columns."""
    return (d, n_ff // BLOCK_ELEMENTS, down_scale_channels(_GROUPED_BLOCK_KIND[column_kind]))


def split_down_blocks(block_kind: str, blocks: np.ndarray, n_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """ffn_down's blocks (d, bytes_per_row(block_kind, n_ff)) -> (values, scales), byte-exact:
    values (n_ff, bytes_per_row(grouped kind, d)) uint8, row i = neuron i's down column;
    scales (d, n_ff / 32, down_scale_channels) float16."""
    raw = _as_byte_rows(block_kind, blocks, n_ff)
    d = raw.shape[0]
    groups = raw.reshape(d, n_ff // BLOCK_ELEMENTS, _BLOCK_BYTES[block_kind])  # (d, G, block_bytes)
    channels = down_scale_channels(block_kind)
    scales = groups[..., : 2 * channels].copy().view("<f2")  # (d, G, channels)
    if block_kind == "q8_0":
        q = groups[..., 2:].reshape(d, n_ff)  # (d, n_ff) int8 bits
        return np.ascontiguousarray(q.T), scales
    q = _unpack_nibbles(groups[..., 2 * channels:]).reshape(d, n_ff)  # (d, n_ff) values 0..15
    column = np.ascontiguousarray(q.T)  # (n_ff, d)
    if d % 2:
        column = np.concatenate([column, np.zeros((n_ff, 1), np.uint8)], axis=1)
    return column[:, 0::2] | (column[:, 1::2] << np.uint8(4)), scales  # (n_ff, ceil(d/2))


def quantize_down_columns(block_kind: str, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """down (d, n_ff) float -> (values, scales) as split_down_blocks gives them: the rows quantized
    round-to-nearest in 32-neuron blocks, the way GGUF files hold ffn_down."""
    down = np.ascontiguousarray(down, dtype=np.float32)
    return split_down_blocks(block_kind, quantize_rows(block_kind, down), down.shape[1])


def grouped_column_values(kind: str, values: np.ndarray, elements: int) -> np.ndarray:
    """values (k, bytes_per_row(kind, elements)) uint8 -> (k, elements) the stored q: 0..15 (q4) or int8."""
    values = np.ascontiguousarray(values).view(np.uint8)
    if kind == "q8_0_grouped_col":
        return values.view(np.int8)[:, :elements]
    q = np.stack([values & np.uint8(0x0F), values >> np.uint8(4)], axis=-1)  # (k, bytes, 2)
    return q.reshape(values.shape[0], -1)[:, :elements]


def dequantize_grouped_columns(kind: str, values: np.ndarray, scales: np.ndarray, neuron_ids: np.ndarray
                               ) -> np.ndarray:
    """Down columns of the neurons `neuron_ids` (k,): values (k, bytes) uint8 and their layer's scale
    table (d, n_ff / 32, channels) float16 -> (k, d) float32, exactly GGUF's w = d*q (+ m)."""
    if kind not in _GROUPED_BLOCK_KIND:
        raise QuantFormatError(f"{kind} is not a grouped down-column kind ({', '.join(_GROUPED_BLOCK_KIND)})")
    d = scales.shape[0]
    groups = np.asarray(neuron_ids, dtype=np.int64) // BLOCK_ELEMENTS  # (k,)
    s = scales[:, groups, :].astype(np.float32).transpose(1, 0, 2)  # (k, d, channels)
    q = grouped_column_values(kind, values, d).astype(np.float32)  # (k, d)
    block = _GROUPED_BLOCK_KIND[kind]
    if block == "q4_1":
        return s[..., 0] * q + s[..., 1]
    if block == "q4_0":
        return s[..., 0] * (q - np.float32(8))
    return s[..., 0] * q


# ---- K-quant re-blocking (GGUF Q4_K_M files are made of Q4_K and Q6_K rows) ----

def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """packed (..., 12) uint8 -> (sc, m) each (..., 8): the 6-bit sub-block scales and mins."""
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _check_k_row(raw: np.ndarray, elements: int, block_bytes: int, name: str) -> np.ndarray:
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if elements % K_BLOCK_ELEMENTS or raw.shape[-1] != elements // K_BLOCK_ELEMENTS * block_bytes:
        raise QuantFormatError(f"{name} rows of {elements} weights must be whole {K_BLOCK_ELEMENTS}-weight "
                               f"super-blocks of {block_bytes} bytes; got rows of {raw.shape[-1]} bytes")
    return raw.reshape(*raw.shape[:-1], elements // K_BLOCK_ELEMENTS, block_bytes)


def q4_k_rows_to_q4_1(raw: np.ndarray, elements: int) -> np.ndarray:
    """Q4_K rows (..., elements/256*144) -> q4_1 rows (..., elements/32*20).

    Each 32-weight sub-block j has w = (d*sc_j)*q - (dmin*m_j) with the same
    4-bit q: a q4_1 block with scale d*sc_j and min -dmin*m_j, each rounded to
    fp16 (the only change)."""
    blocks = _check_k_row(raw, elements, _Q4_K_BLOCK_BYTES, "Q4_K")  # (..., nsb, 144)
    lead = blocks.shape[:-1]
    d = blocks[..., 0:2].copy().view("<f2").astype(np.float32)  # (..., nsb, 1)
    dmin = blocks[..., 2:4].copy().view("<f2").astype(np.float32)
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16])  # (..., nsb, 8)
    qs = blocks[..., 16:].reshape(*lead, 4, 32)  # 4 chunks of 64 weights: low nibbles then high nibbles
    q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2).reshape(*lead, 8, 32)  # (..., nsb, 8, 32)
    scale = (d * sc.astype(np.float32)).astype("<f2")[..., None]  # (..., nsb, 8, 1)
    low = (-(dmin * mn.astype(np.float32))).astype("<f2")[..., None]
    out = np.concatenate([scale.view(np.uint8), low.view(np.uint8), _pack_nibbles(q)], axis=-1)  # (..., nsb, 8, 20)
    return out.reshape(*lead[:-1], -1)


def dequantize_q4_k_rows(raw: np.ndarray, elements: int) -> np.ndarray:
    """Q4_K rows -> (..., elements) float32 (GGUF's dequantization, float32 arithmetic)."""
    blocks = _check_k_row(raw, elements, _Q4_K_BLOCK_BYTES, "Q4_K")
    lead = blocks.shape[:-1]
    d = blocks[..., 0:2].copy().view("<f2").astype(np.float32)
    dmin = blocks[..., 2:4].copy().view("<f2").astype(np.float32)
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16])
    qs = blocks[..., 16:].reshape(*lead, 4, 32)
    q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2).reshape(*lead, 8, 32).astype(np.float32)
    w = (d * sc.astype(np.float32))[..., None] * q - (dmin * mn.astype(np.float32))[..., None]
    return w.reshape(*lead[:-1], elements)


def dequantize_q6_k_rows(raw: np.ndarray, elements: int) -> np.ndarray:
    """Q6_K rows (..., elements/256*210) -> (..., elements) float32 (GGUF's dequantization)."""
    blocks = _check_k_row(raw, elements, _Q6_K_BLOCK_BYTES, "Q6_K")  # (..., nsb, 210)
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(*lead, 8, 32)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    qh = (qh & np.uint8(0x03)).reshape(*lead, 8, 32)
    q = ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(*lead, 16, 16).astype(np.float32)
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # (..., nsb, 16)
    d = blocks[..., 208:210].copy().view("<f2").astype(np.float32)  # (..., nsb, 1)
    return ((d * scales)[..., None] * q).reshape(*lead[:-1], elements)


def q6_k_rows_to_q8_0(raw: np.ndarray, elements: int) -> np.ndarray:
    """Q6_K rows -> q8_0 rows (re-quantized round-to-nearest per 32; not exact: print the error)."""
    return quantize_rows("q8_0", dequantize_q6_k_rows(raw, elements))
