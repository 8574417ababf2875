"""`flashllm convert`: write a flash store from a model source, one layer at a time.

The store is written into `OUT.partial` and renamed into place only when every
file is complete, so a failed or interrupted conversion leaves nothing that
looks like a store. Peak memory stays near one layer's FFN weights plus the
largest resident tensor (the embedding).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import numpy as np
from tqdm import tqdm

from flashllm.protocol.store_format import (
    ALIGNMENT_BYTES, DTYPE_ITEMSIZE, FFN_FILE, GATED_BUNDLE_PARTS, RELU_BUNDLE_PARTS, RESIDENT_FILE,
    TOKENIZER_FILE, FfnLayerRegion, FfnLayout, Manifest, TokenizerInfo, align_up, sha256_hex, write_manifest,
)
from flashllm.runtime.tools.convert.sources import ConvertError, open_source

SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32"}
DISK_SPACE_MARGIN_BYTES = 64 << 20


def _bundle_parts(arch, dtype: str) -> list[tuple[str, int, str]]:
    d = arch.hidden_size
    if arch.gated_ffn:
        return [(name, d, dtype) for name in GATED_BUNDLE_PARTS]
    return [(name, 1 if name == "up_bias" else d, dtype) for name in RELU_BUNDLE_PARTS]


def build_bundles(ffn: dict[str, np.ndarray], gated: bool, dtype: str) -> np.ndarray:
    """(n_ff, bundle_elements) matrix: row i is neuron i's bundle in storage order."""
    if gated:
        columns = [ffn["gate"], ffn["up"], ffn["down"].T]  # (n_ff, d) each
    else:
        columns = [ffn["up"], ffn["down"].T, ffn["up_bias"][:, None]]
    return np.ascontiguousarray(np.concatenate(columns, axis=1).astype(dtype))  # (n_ff, E)


class _StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor (the header is known up front from shapes)."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...]]], dtype: str):
        itemsize = DTYPE_ITEMSIZE[dtype]
        header, offset = {}, 0
        for name, shape in specs:
            n_bytes = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
            offset += n_bytes
        header["__metadata__"] = {"format": "pt", "writer": "flashllm"}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self.data_bytes = offset
        self._specs = dict(specs)
        self._dtype = dtype
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        self.checksums: dict[str, str] = {}

    def write(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array.astype(self._dtype)).tobytes()
        self.checksums[name] = sha256_hex(data)
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


def estimate_store_bytes(source, dtype: str) -> int:
    arch, itemsize = source.arch, DTYPE_ITEMSIZE[dtype]
    resident = sum(int(np.prod(shape)) for _, shape in source.resident_specs()) * itemsize
    bundle_bytes = sum(n for _, n, _ in _bundle_parts(arch, dtype)) * itemsize
    return resident + arch.num_hidden_layers * align_up(arch.intermediate_size * bundle_bytes)


def convert(src: str, out: str, dtype: str = "float16", force: bool = False, progress: bool = True) -> Manifest:
    if dtype not in SAFETENSORS_DTYPE:
        raise ConvertError(f"--dtype {dtype!r} is not supported; use one of {', '.join(SAFETENSORS_DTYPE)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    source = open_source(src)
    arch = source.arch

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    need_bytes = estimate_store_bytes(source, dtype)
    free_bytes = shutil.disk_usage(parent).free
    if free_bytes < need_bytes + DISK_SPACE_MARGIN_BYTES:
        raise ConvertError(
            f"not enough disk space in {parent}: the store needs {need_bytes / 2**20:.0f} MiB "
            f"(+{DISK_SPACE_MARGIN_BYTES >> 20} MiB margin), {free_bytes / 2**20:.0f} MiB free; "
            "free some space or choose another --out"
        )

    partial = out + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    try:
        manifest = _write_store(source, partial, dtype, progress)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(partial, out)
        return manifest
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_store(source, store_dir: str, dtype: str, progress: bool) -> Manifest:
    arch = source.arch
    itemsize = DTYPE_ITEMSIZE[dtype]
    parts = _bundle_parts(arch, dtype)
    bundle_bytes = sum(n for _, n, _ in parts) * itemsize
    resident_specs = source.resident_specs()

    bar = tqdm(total=arch.num_hidden_layers + len(resident_specs), desc="convert", unit="tensor",
               disable=not progress, file=sys.stderr)
    regions: list[FfnLayerRegion] = []
    with open(os.path.join(store_dir, FFN_FILE), "wb") as ffn_file:
        offset = 0
        for layer in range(arch.num_hidden_layers):
            bundles = build_bundles(source.load_ffn(layer), arch.gated_ffn, dtype)  # (n_ff, E)
            data = bundles.tobytes()
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

    writer = _StreamingSafetensorsWriter(os.path.join(store_dir, RESIDENT_FILE), resident_specs, dtype)
    try:
        for name, _shape in resident_specs:
            writer.write(name, source.load_resident(name))
            bar.set_postfix_str(name)
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
        dtype=dtype,
        ffn=FfnLayout(file=FFN_FILE, dtype=dtype, alignment_bytes=ALIGNMENT_BYTES, bundle_parts=parts,
                      bundle_bytes=bundle_bytes, file_bytes=file_bytes, layers=regions),
        resident_file=RESIDENT_FILE,
        resident_sha256=writer.checksums,
        tokenizer=TokenizerInfo(file=TOKENIZER_FILE, **tok_info),
        source=os.path.abspath(getattr(source, "path", getattr(source, "folder", ""))),
    )
    write_manifest(store_dir, manifest)
    return manifest
