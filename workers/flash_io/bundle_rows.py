"""Bundle rows as read from ffn.bin -> float rows the FFN multiplies (numpy only).

The prefetcher decodes rows here and must stay torch-free (its process baseline
is Python + numpy), so this lives apart from store_reader, which imports torch.
"""
from __future__ import annotations

import numpy as np

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import FfnLayout

NUMPY_FLOAT_KINDS = ("float16", "float32")  # bundle parts numpy multiplies as read


def bundle_rows_as_float(layout: FfnLayout, rows: np.ndarray) -> np.ndarray:
    """Bundle rows as read -> rows in the [gate | up | down] element layout the float FFN multiplies.

    float16/float32 stores: `rows` itself (k, bundle_elements), untouched. Quantized stores: rows
    (k, bundle_bytes) uint8, and bfloat16 stores: rows (k, bundle_elements) of uint16 bits -> a new
    (k, bundle_elements) float32 array, each part decoded by its kind."""
    if all(kind in NUMPY_FLOAT_KINDS for _, _, kind in layout.bundle_parts):
        return rows
    rows = np.ascontiguousarray(rows).view(np.uint8)  # (k, bundle_bytes)
    if rows.ndim != 2 or rows.shape[1] != layout.bundle_bytes:
        raise ValueError(f"expected bundle rows (k, {layout.bundle_bytes}) uint8, got {rows.shape} {rows.dtype}")
    out = np.empty((rows.shape[0], layout.bundle_elements), dtype=np.float32)  # (k, E)
    element_slices, byte_slices = layout.part_slices(), layout.part_byte_slices()
    for name, elements, kind in layout.bundle_parts:
        out[:, element_slices[name]] = qf.dequantize_rows(kind, rows[:, byte_slices[name]], elements)
    return out
