"""Writing single rows into torch's CPU int4 tile layout, compiled (numba).

A sparse step puts a few hundred neurons a layer into a held int4 matrix, at
whatever slots are free. torch's CPU int4 packing is not row-local: inside a
tile of 64 rows, byte k·32 + (n mod 32) of the tile holds weight k of row n
(low nibble when n mod 64 < 32) and of row n + 32 (high nibble). So a row is
4 bits at a 32-byte stride, sharing each byte with another row: a
read-modify-write per weight. Expressed with torch's indexing that is a
gather and a scatter over a strided view plus nibble arithmetic on the
gathered rows, several passes over memory for each; one compiled loop does it
in one pass (docs/benchmarks.md has both timings).

numba, not a C extension: it needs no compiler at install time; compiled code is cached on disk
(cache=True), so only the first run on a machine compiles. nogil: a helper thread converts the down
columns meanwhile.
"""
from __future__ import annotations

import numba
import numpy as np

TILE_ROWS = 64


@numba.njit(nogil=True, cache=True)
def _write_q4_rows(packed: np.ndarray, rows: np.ndarray, bundles: np.ndarray, first_block_byte: int,
                   block_bytes: int, blocks_per_row: int) -> None:  # pragma: no cover - compiled
    tile_bytes = TILE_ROWS * blocks_per_row * 16  # 64 rows of d/2 bytes
    nibbles_at = block_bytes - 16  # a GGUF q4 block ends with its 16 bytes of nibbles
    for i in range(rows.shape[0]):
        row = rows[i]
        column = row % 32
        high = (row % TILE_ROWS) >= 32
        base = (row // TILE_ROWS) * tile_bytes + column
        for group in range(blocks_per_row):
            block = first_block_byte + group * block_bytes + nibbles_at
            for j in range(16):  # block byte j: weight j (low nibble) and weight j + 16 (high nibble)
                value = bundles[i, block + j]
                low_at = base + (group * 32 + j) * 32
                high_at = low_at + 16 * 32
                if high:
                    packed[low_at] = (packed[low_at] & 0x0F) | ((value & 0x0F) << 4)
                    packed[high_at] = (packed[high_at] & 0x0F) | (value & 0xF0)
                else:
                    packed[low_at] = (packed[low_at] & 0xF0) | (value & 0x0F)
                    packed[high_at] = (packed[high_at] & 0xF0) | (value >> 4)


def write_q4_rows(packed: np.ndarray, rows: np.ndarray, bundles: np.ndarray, first_block_byte: int,
                  block_bytes: int, d: int) -> None:
    """packed (R, d/2) uint8, torch's int4 tile layout, R a multiple of 64: rows `rows` (k,) get the 4-bit
    values of the GGUF q4_0/q4_1 blocks at bytes [first_block_byte, first_block_byte + d/32·block_bytes) of
    bundles (k, bundle_bytes) uint8; every other row's nibbles stay as they were. Scales are the caller's."""
    if packed.dtype != np.uint8 or bundles.dtype != np.uint8 or not packed.flags.c_contiguous:
        raise ValueError("write_q4_rows takes a contiguous uint8 packed matrix and uint8 bundles")
    if packed.shape[0] % TILE_ROWS or packed.shape[1] * 2 != d or d % 32:
        raise ValueError(f"packed {packed.shape} is not whole 64-row tiles of d={d} 4-bit weights")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if len(rows) != len(bundles):
        raise ValueError(f"{len(rows)} rows for {len(bundles)} bundles")
    if len(rows) and (rows.min() < 0 or rows.max() >= packed.shape[0]):
        raise IndexError(f"rows must be in [0, {packed.shape[0]}); got {rows.min()}..{rows.max()}")
    if first_block_byte + d // 32 * block_bytes > bundles.shape[1]:
        raise ValueError(f"the blocks end past a bundle's {bundles.shape[1]} bytes")
    _write_q4_rows(packed.reshape(-1), rows, bundles, first_block_byte, block_bytes, d // 32)
