"""What `flashllm convert --dtype` stores each tensor as, and the bytes it writes for it.

One place decides the kind of every tensor (protocol/quant_format.py names the
kinds):

    --dtype auto (default)   GGUF: Q8_0 / Q4_0 / Q4_1 blocks kept byte for byte;
                             Q4_K re-blocked to q4_1, Q6_K / Q5_x to q8_0 (error
                             printed); F16 / BF16 / F32 matrices as float16.
                             Hugging Face checkpoints: float16.
    --dtype float16|float32|bfloat16   every tensor dequantized to that float type
    --dtype q8_0|q4_0        every weight matrix quantized round-to-nearest per
                             32 weights (GGUF's reference quantizers), from the
                             dequantized source

In a quantized store the FFN's down projection keeps GGUF's blocks, which run
across neurons (32 neurons per block per output row): a neuron's bundle holds its
column's values, the layer's block scales are a resident table
(quant_format.split_down_blocks). Safetensors sources are quantized the same way.
Vectors (norms, biases) stay float32, and a bundle's gate and up rows share one
kind across layers (the widest any layer needs); so do the down blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashllm.protocol import quant_format as qf
from flashllm.runtime.tools.convert.sources import FLOAT_SOURCE_KIND, ConvertError

DTYPE_OPTIONS = ("auto", "float16", "float32", "bfloat16", "q8_0", "q4_0")
FLOAT_DTYPES = ("float16", "float32", "bfloat16")
QUANTIZED_DTYPES = ("q8_0", "q4_0")

GGUF_KEPT_KINDS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
GGUF_REBLOCKED_KINDS = {"Q4_K": "q4_1", "Q6_K": "q8_0", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q5_K": "q8_0"}
FLOAT_SOURCE_KINDS = (FLOAT_SOURCE_KIND, "F32", "F16", "BF16")
DOWN_KIND_FOR_FLOAT_SOURCE = "q8_0"  # a quantized store whose source keeps ffn_down as floats
VECTOR_KIND_OF_QUANTIZED_STORE = "float32"
_WIDTH_ORDER = ("q4_0", "q4_1", "q8_0", "float16")  # each holds the ones before it at least as well

# resident matrices a quantized store keeps as blocks (embeddings, attention, head); others stay float
QUANTIZABLE_RESIDENT = ("embed_tokens", "lm_head", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                        "o_proj.weight", "project_in", "project_out")


def check_dtype_option(dtype: str) -> None:
    if dtype not in DTYPE_OPTIONS:
        raise ConvertError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_OPTIONS)} "
                           "(auto keeps a GGUF file's quantization, float16 for Hugging Face checkpoints)")


def is_quantizable_resident(name: str) -> bool:
    return any(name == base or name.endswith("." + base) for base in QUANTIZABLE_RESIDENT)


def matrix_kind(dtype: str, source_kind: str, tensor: str) -> str:
    """The kind a weight matrix is stored as, from the --dtype option and how the source stores it."""
    if dtype != "auto":
        return dtype
    if source_kind in GGUF_KEPT_KINDS:
        return GGUF_KEPT_KINDS[source_kind]
    if source_kind in GGUF_REBLOCKED_KINDS:
        return GGUF_REBLOCKED_KINDS[source_kind]
    if source_kind in FLOAT_SOURCE_KINDS:
        return "float16"
    raise ConvertError(
        f"tensor {tensor!r} is stored as {source_kind}, which flashllm has no kernel for (it keeps "
        f"{', '.join(GGUF_KEPT_KINDS)} and re-blocks {', '.join(GGUF_REBLOCKED_KINDS)}); convert with "
        "--dtype q8_0 or --dtype float16 to re-quantize or dequantize it"
    )


def widest_kind(kinds: list[str]) -> str:
    return max(kinds, key=_WIDTH_ORDER.index)


@dataclass
class _ErrorRecord:
    largest_abs_error: float = 0.0
    largest_abs_weight: float = 0.0


@dataclass
class ReblockReport:
    """The largest absolute error of every conversion that is not byte-exact, one line per kind of change."""

    records: dict[str, _ErrorRecord] = field(default_factory=dict)

    def add(self, what: str, original: np.ndarray, stored: np.ndarray) -> None:
        record = self.records.setdefault(what, _ErrorRecord())
        record.largest_abs_error = max(record.largest_abs_error, float(np.abs(stored - original).max(initial=0.0)))
        record.largest_abs_weight = max(record.largest_abs_weight, float(np.abs(original).max(initial=0.0)))

    def lines(self) -> list[str]:
        out = []
        for what, r in self.records.items():
            share = r.largest_abs_error / r.largest_abs_weight if r.largest_abs_weight else 0.0
            out.append(f"{what}: largest absolute error {r.largest_abs_error:.2g} "
                       f"({share:.2%} of the largest weight)")
        return out


def encode_matrix(kind: str, source_kind: str, what: str, floats, blocks, report: ReblockReport) -> np.ndarray:
    """(rows, bytes_per_row(kind, cols)) uint8 of one matrix.

    floats(): the matrix dequantized to float32 (rows, cols); blocks(): the source's own blocks
    (rows, bytes), asked for only when they are kept or re-blocked. `what` names the tensors in the
    printed error line."""
    if kind in FLOAT_DTYPES:  # dequantizing to a float type: as exact as the float type (not reported)
        return qf.quantize_rows(kind, floats())
    if GGUF_KEPT_KINDS.get(source_kind) == kind:
        return np.ascontiguousarray(blocks())  # the source's blocks, byte for byte
    original = floats()
    if source_kind == "Q4_K" and kind == "q4_1":
        stored = qf.q4_k_rows_to_q4_1(blocks(), original.shape[-1])
        report.add(f"Q4_K {what} re-blocked to q4_1", original, qf.dequantize_rows(kind, stored, original.shape[-1]))
        return stored
    stored = qf.quantize_rows(kind, original)
    label = ("quantized round-to-nearest to" if source_kind in FLOAT_SOURCE_KINDS
             else f"re-quantized from {source_kind} to")
    report.add(f"{what} {label} {kind}", original, qf.dequantize_rows(kind, stored, original.shape[-1]))
    return stored


def down_block_kind(dtype: str, source_kinds: list[str]) -> str:
    """The block kind of a quantized store's down columns: the widest any layer's ffn_down needs."""
    kinds = [matrix_kind(dtype, kind, "ffn_down") for kind in source_kinds]
    kinds = [DOWN_KIND_FOR_FLOAT_SOURCE if kind in FLOAT_DTYPES else kind for kind in kinds]
    return widest_kind(kinds)


def encode_down_columns(block_kind: str, source_kind: str, n_ff: int, floats, blocks, report: ReblockReport
                        ) -> tuple[np.ndarray, np.ndarray]:
    """ffn_down as (values (n_ff, bytes) uint8: row i is neuron i's down part, scales (d, n_ff/32, c) float16).

    The down matrix is encoded as block_kind rows (the source's blocks when it has them) and split:
    exact whenever encode_matrix keeps or re-blocks the source's blocks exactly."""
    stored = encode_matrix(block_kind, source_kind, "ffn down rows", floats, blocks, report)  # (d, bytes)
    return qf.split_down_blocks(block_kind, stored, n_ff)
