"""`flashllm convert`: write a flash store from a model source, one layer at a time.

The store is written into `OUT.partial` and renamed into place only when every
file is complete, so a failed or interrupted conversion leaves nothing that
looks like a store. Peak memory stays near one layer's FFN weights plus the
largest resident tensor (the embedding). What each tensor is stored as (float,
GGUF blocks kept, re-blocked or quantized) is quant_policy's decision, made
once in `plan_store` before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import (
    ALIGNMENT_BYTES, BUNDLE_ALIGNMENT_BYTES, DOWN_GROUP_SCALES_NAME, FFN_FILE, GATED_BUNDLE_PARTS,
    QUANTIZED_STORE_DTYPES, RELU_BUNDLE_PARTS, RESIDENT_FILE,
    TOKENIZER_FILE, FfnLayerRegion, FfnLayout, Manifest, QuantizedTensorInfo, TokenizerInfo, align_up,
    bundle_parts_bytes, sha256_hex, write_manifest,
)
from flashllm.runtime.tools.convert.quant_policy import (
    FLOAT_DTYPES, VECTOR_KIND_OF_QUANTIZED_STORE, ReblockReport, check_dtype_option, down_block_kind,
    encode_down_columns, encode_matrix, is_quantizable_resident, matrix_kind, widest_kind,
)
from flashllm.runtime.tools.convert.sources import ConvertError, open_source
from flashllm.workers.flash_io.integrity import bundle_digests, write_checksums

SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}  # quantized tensors: "U8" rows
DISK_SPACE_MARGIN_BYTES = 64 << 20
BUNDLE_PADDING_MAX_SHARE = 0.125


@dataclass
class ResidentTensorPlan:
    name: str  # store name
    shape: tuple[int, ...]  # float shape from the config
    kind: str  # quant_format kind it is stored as
    source_kind: str  # how the source stores it

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The safetensors shape: (rows, bytes per row) for blocks, the float shape otherwise."""
        if qf.is_quantized(self.kind):
            return (self.shape[0], qf.bytes_per_row(self.kind, self.shape[1]))
        return self.shape

    @property
    def stored_bytes(self) -> int:
        rows = int(np.prod(self.shape[:-1]))
        return rows * qf.bytes_per_row(self.kind, self.shape[-1])


@dataclass
class StorePlan:
    """What every tensor is stored as: decided once, before anything is written."""

    dtype: str  # the store's dtype: its FFN gate/up rows' kind
    bundle_parts: list[tuple[str, int, str]]  # (name, elements, kind) in storage order
    resident: list[ResidentTensorPlan]
    down_block_kind: str | None = None  # a quantized store's down blocks; their scales are resident tables
    bundle_alignment_bytes: int = 1

    @property
    def bundle_bytes(self) -> int:
        return align_up(bundle_parts_bytes(self.bundle_parts), self.bundle_alignment_bytes)

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED_STORE_DTYPES


def _ffn_row_parts(arch) -> tuple[str, ...]:
    return ("gate", "up") if arch.gated_ffn else ("up",)


def _check_blocked(kind: str, elements: int, what: str) -> None:
    try:
        qf.bytes_per_row(kind, elements)
    except qf.QuantFormatError as exc:
        raise ConvertError(f"{what}: {exc}") from None


def plan_store(source, dtype: str) -> StorePlan:
    check_dtype_option(dtype)
    arch = source.arch
    d = arch.hidden_size
    if dtype == "auto":
        kinds = [matrix_kind(dtype, source.ffn_kind(layer, part), f"layers.{layer}.ffn_{part}")
                 for layer in range(arch.num_hidden_layers) for part in _ffn_row_parts(arch)]
        row_kind = widest_kind(kinds)
    else:
        row_kind = dtype
    _check_blocked(row_kind, d, f"--dtype {dtype}: FFN rows of {d} weights")
    down_kind, down_scales = None, []
    if row_kind in QUANTIZED_STORE_DTYPES:
        vector_kind = VECTOR_KIND_OF_QUANTIZED_STORE
        down_kind = down_block_kind(dtype, [source.ffn_kind(layer, "down") for layer in range(arch.num_hidden_layers)])
        _check_blocked(down_kind, arch.intermediate_size, f"--dtype {dtype}: ffn_down rows of {arch.intermediate_size}")
        column = ("down", d, qf.GROUPED_COLUMN_KINDS[down_kind])
        if arch.gated_ffn:
            parts = [("gate", d, row_kind), ("up", d, row_kind), column]
        else:
            parts = [("up", d, row_kind), column, ("up_bias", 1, vector_kind)]
        table_shape = qf.down_scale_table_shape(column[2], d, arch.intermediate_size)
        down_scales = [ResidentTensorPlan(DOWN_GROUP_SCALES_NAME.format(layer=layer), table_shape, "float16",
                                          source.ffn_kind(layer, "down")) for layer in range(arch.num_hidden_layers)]
    else:
        vector_kind = row_kind
        names = GATED_BUNDLE_PARTS if arch.gated_ffn else RELU_BUNDLE_PARTS
        parts = [(name, 1 if name == "up_bias" else d, row_kind) for name in names]
    resident = []
    for name, shape in source.resident_specs():
        source_kind = source.resident_kind(name)
        if len(shape) == 2 and is_quantizable_resident(name):
            kind = matrix_kind(dtype, source_kind, name)
            if kind in FLOAT_DTYPES and row_kind in FLOAT_DTYPES:
                kind = row_kind  # a float store is one float type throughout
            _check_blocked(kind, shape[1], f"--dtype {dtype}: tensor {name!r} {tuple(shape)}")
        else:
            kind = vector_kind
        resident.append(ResidentTensorPlan(name, tuple(shape), kind, source_kind))
    return StorePlan(dtype=row_kind, bundle_parts=parts, resident=resident + down_scales, down_block_kind=down_kind,
                     bundle_alignment_bytes=bundle_alignment_of(parts) if down_kind else 1)


def bundle_alignment_of(parts: list[tuple[str, int, str]]) -> int:
    """A quantized bundle is padded to whole device blocks (a neuron's read then costs only its own bundle)
    when that adds at most BUNDLE_PADDING_MAX_SHARE of it; smaller bundles (tiny models) stay packed."""
    unpadded = bundle_parts_bytes(parts)
    padded = align_up(unpadded, BUNDLE_ALIGNMENT_BYTES)
    return BUNDLE_ALIGNMENT_BYTES if padded - unpadded <= BUNDLE_PADDING_MAX_SHARE * unpadded else 1


def encode_layer_bundles(source, layer: int, plan: StorePlan, report: ReblockReport
                         ) -> tuple[np.ndarray, np.ndarray | None]:
    """(bundles (n_ff, bundle_bytes) uint8: row i is neuron i's bundle, each part in its kind, then zero
    padding; the layer's down scale table (d, n_ff/32, c) float16, or None for a float store)."""
    floats = source.load_ffn(layer)  # {"gate"|"up": (n_ff, d), "down": (d, n_ff), "up_bias": (n_ff,)}
    encoded, scales = [], None
    n_ff = source.arch.intermediate_size
    for name, _elements, kind in plan.bundle_parts:
        if name == "down" and plan.down_block_kind is not None:
            values, scales = encode_down_columns(plan.down_block_kind, source.ffn_kind(layer, "down"), n_ff,
                                                 lambda: floats["down"], lambda: source.load_ffn_blocks(layer, "down"),
                                                 report)
            encoded.append(values)  # (n_ff, bytes)
        elif name == "down":
            encoded.append(qf.quantize_rows(kind, np.ascontiguousarray(floats["down"].T)))  # (n_ff, d)
        elif name == "up_bias":
            encoded.append(qf.quantize_rows(kind, floats["up_bias"][:, None]))  # (n_ff, itemsize)
        else:
            source_kind = source.ffn_kind(layer, name)
            encoded.append(encode_matrix(kind, source_kind, f"ffn {name} rows", lambda: floats[name],
                                         lambda: source.load_ffn_blocks(layer, name), report))
    padding = plan.bundle_bytes - bundle_parts_bytes(plan.bundle_parts)
    if padding:
        encoded.append(np.zeros((n_ff, padding), np.uint8))
    return np.ascontiguousarray(np.concatenate(encoded, axis=1)), scales  # (n_ff, bundle_bytes)


class _StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor (the header is known up front from the plan)."""

    def __init__(self, path: str, plans: list[ResidentTensorPlan]):
        header, offset = {}, 0
        for plan in plans:
            st_dtype = "U8" if qf.is_quantized(plan.kind) else SAFETENSORS_DTYPE[plan.kind]
            header[plan.name] = {"dtype": st_dtype, "shape": list(plan.stored_shape),
                                 "data_offsets": [offset, offset + plan.stored_bytes]}
            offset += plan.stored_bytes
        header["__metadata__"] = {"format": "pt", "writer": "flashllm"}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self.data_bytes = offset
        self._expected_bytes = {plan.name: plan.stored_bytes for plan in plans}
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        self.checksums: dict[str, str] = {}

    def write(self, name: str, stored: np.ndarray) -> None:
        data = np.ascontiguousarray(stored).tobytes()
        if len(data) != self._expected_bytes[name]:
            raise ConvertError(f"tensor {name!r}: {len(data)} bytes encoded, the plan says {self._expected_bytes[name]}")
        self.checksums[name] = sha256_hex(data)
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


def encode_resident(source, plan: ResidentTensorPlan, report: ReblockReport) -> np.ndarray:
    if not qf.is_quantized(plan.kind):
        return qf.quantize_rows(plan.kind, source.load_resident(plan.name))  # float bytes
    what = ("embedding rows" if plan.name in ("embed_tokens", "lm_head")
            else "attention rows" if "_proj." in plan.name else f"{plan.name} rows")
    return encode_matrix(plan.kind, plan.source_kind, what, lambda: source.load_resident(plan.name),
                         lambda: source.load_resident_blocks(plan.name), report)


def estimate_store_bytes(source, plan: StorePlan) -> int:
    arch = source.arch
    resident = sum(tensor.stored_bytes for tensor in plan.resident)
    return resident + arch.num_hidden_layers * align_up(arch.intermediate_size * plan.bundle_bytes)


def check_disk_space(folder: str, need_bytes: int, what: str, option: str) -> None:
    free_bytes = shutil.disk_usage(folder).free
    if free_bytes < need_bytes + DISK_SPACE_MARGIN_BYTES:
        raise ConvertError(
            f"not enough disk space in {folder}: {what} needs {need_bytes / 2**20:.0f} MiB "
            f"(+{DISK_SPACE_MARGIN_BYTES >> 20} MiB margin), {free_bytes / 2**20:.0f} MiB free; "
            f"free some space or choose another {option}"
        )


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def convert(src: str, out: str, dtype: str = "auto", force: bool = False, progress: bool = True,
            log: Callable[[str], None] = _print_to_stderr) -> Manifest:
    """Write the store of the checkpoint or GGUF file `src` into `out`; `log` gets one line per
    conversion that is not exact."""
    check_dtype_option(dtype)
    _check_out_free(os.path.abspath(out), force)
    return write_store(open_source(src), out, dtype=dtype, force=force, progress=progress, log=log)


def _check_out_free(out: str, force: bool) -> None:
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")


def write_store(source, out: str, dtype: str = "auto", force: bool = False, progress: bool = True,
                log: Callable[[str], None] = _print_to_stderr, progress_label: str = "convert") -> Manifest:
    """Write the store of a model source (sources.py's interface) into `out`, through `out.partial`."""
    check_dtype_option(dtype)
    out = os.path.abspath(out)
    _check_out_free(out, force)
    plan = plan_store(source, dtype)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    check_disk_space(parent, estimate_store_bytes(source, plan), "the store", "--out")

    partial = out + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    try:
        report = ReblockReport()
        manifest = _write_store(source, partial, plan, report, progress, progress_label)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for line in report.lines():
        log(line)
    return manifest


def _write_store(source, store_dir: str, plan: StorePlan, report: ReblockReport, progress: bool,
                 progress_label: str) -> Manifest:
    arch = source.arch
    bar = tqdm(total=arch.num_hidden_layers + len(plan.resident), desc=progress_label, unit="tensor",
               disable=not progress, file=sys.stderr)
    regions: list[FfnLayerRegion] = []
    digests: list = []  # per layer: (n_ff,) bundle checksums, checked by the reader on every read
    down_scales: dict[str, np.ndarray] = {}  # resident name -> (d, n_ff/32, c) float16, written with the resident
    with open(os.path.join(store_dir, FFN_FILE), "wb") as ffn_file:
        offset = 0
        for layer in range(arch.num_hidden_layers):
            bundles, scales = encode_layer_bundles(source, layer, plan, report)  # (n_ff, bundle_bytes) uint8
            if scales is not None:
                down_scales[DOWN_GROUP_SCALES_NAME.format(layer=layer)] = scales
            data = bundles.tobytes()
            digests.append(bundle_digests(bundles))
            ffn_file.seek(offset)
            ffn_file.write(data)
            regions.append(FfnLayerRegion(offset_bytes=offset, length_bytes=len(data),
                                          num_neurons=bundles.shape[0], sha256=sha256_hex(data)))
            offset = align_up(offset + len(data))
            del bundles, data
            bar.set_postfix_str(f"ffn layer {layer}")
            bar.update(1)
        # pad the file to an aligned end so a direct read of the last region never runs past EOF
        ffn_file.truncate(offset)
        file_bytes = offset

    checksum_file = write_checksums(store_dir, digests)

    writer = _StreamingSafetensorsWriter(os.path.join(store_dir, RESIDENT_FILE), plan.resident)
    try:
        for tensor in plan.resident:
            stored = (qf.quantize_rows("float16", down_scales.pop(tensor.name)) if tensor.name in down_scales
                      else encode_resident(source, tensor, report))
            writer.write(tensor.name, stored)
            bar.set_postfix_str(tensor.name)
            bar.update(1)
    finally:
        writer.close()
    bar.close()

    tok_json, tok_info = source.tokenizer()
    if tok_json is None:
        raise ConvertError(f"{source.__class__.__name__}: no tokenizer.json in the source; flashllm needs one to serve text")
    with open(os.path.join(store_dir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(tok_json)

    manifest = Manifest(
        arch=arch,
        dtype=plan.dtype,
        ffn=FfnLayout(file=FFN_FILE, dtype=plan.dtype, alignment_bytes=ALIGNMENT_BYTES, bundle_parts=plan.bundle_parts,
                      bundle_bytes=plan.bundle_bytes, file_bytes=file_bytes, layers=regions,
                      bundle_checksums=checksum_file, bundle_alignment_bytes=plan.bundle_alignment_bytes,
                      down_group_scales=DOWN_GROUP_SCALES_NAME if plan.down_block_kind else None),
        resident_file=RESIDENT_FILE,
        resident_sha256=writer.checksums,
        tokenizer=TokenizerInfo(file=TOKENIZER_FILE, **tok_info),
        source=_source_description(source),
        resident_quantized={t.name: QuantizedTensorInfo(kind=t.kind, shape=list(t.shape))
                            for t in plan.resident if qf.is_quantized(t.kind)},
        synthetic=getattr(source, "synthetic", None),
    )
    write_manifest(store_dir, manifest)
    return manifest


def _source_description(source) -> str:
    """The manifest's `source`: the checkpoint's path, or how a synthetic store was made."""
    if getattr(source, "manifest_source", None):
        return source.manifest_source
    return os.path.abspath(getattr(source, "path", getattr(source, "folder", "")))
