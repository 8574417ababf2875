"""Opening a flash store: manifest checks, verified resident weights, full verification.

Every process that needs the store goes through here, so a corrupt or truncated
store is refused the same way everywhere, with the file and region named.

Quantized stores (protocol/quant_format.py): resident matrices come back as
`QuantizedTensor` (the blocks as stored, their kind and float shape) for compute
that holds them quantized; `dequantize_resident_weights` turns blocks into float32 for compute that
multiplies floats; `bundle_rows_as_float` decodes bundle rows (numpy only: torch is
imported where it is used, so the torch-free prefetcher can decode rows).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flashllm.protocol import quant_format as qf
from flashllm.protocol.store_format import (
    ALIGNMENT_BYTES, FfnLayout, Manifest, StoreError, align_down, align_up, read_manifest,
)
from flashllm.workers.flash_io.direct_io import DirectFile, aligned_buffer
from flashllm.workers.flash_io.linux_aio import AioQueue, AioUnavailable

if TYPE_CHECKING:  # torch is imported where it is used: the prefetch worker reads bundles without it
    import torch

VERIFY_CHUNK_BYTES = 8 << 20
NUMPY_FLOAT_KINDS = ("float16", "float32")  # bundle parts numpy multiplies as read


def open_store(store_dir: str) -> Manifest:
    """Read the manifest and check that every file is present and long enough."""
    manifest = read_manifest(store_dir)
    resident_path = os.path.join(store_dir, manifest.resident_file)
    if not os.path.isfile(resident_path):
        raise StoreError(f"{resident_path}: missing; the store is incomplete, re-run `flashllm convert`")
    ffn_path = os.path.join(store_dir, manifest.ffn.file)
    if not os.path.isfile(ffn_path):
        raise StoreError(f"{ffn_path}: missing; the store is incomplete, re-run `flashllm convert`")
    ffn_size = os.path.getsize(ffn_path)
    for layer, region in enumerate(manifest.ffn.layers):
        if region.offset_bytes + region.length_bytes > ffn_size:
            raise StoreError(
                f"{ffn_path}: truncated — FFN region of layer {layer} needs bytes "
                f"[{region.offset_bytes}, {region.offset_bytes + region.length_bytes}) but the file has {ffn_size}; "
                "re-run `flashllm convert`"
            )
        expected = region.num_neurons * manifest.ffn.bundle_bytes
        if region.length_bytes != expected:
            raise StoreError(f"{manifest.ffn.file}: layer {layer} region is {region.length_bytes} bytes, "
                             f"expected {expected} ({region.num_neurons} bundles of {manifest.ffn.bundle_bytes})")
    if ffn_size < manifest.ffn.file_bytes:
        raise StoreError(f"{ffn_path}: truncated to {ffn_size} bytes, manifest says {manifest.ffn.file_bytes}; "
                         "re-run `flashllm convert`")
    return manifest


def drop_file_cache(path: str) -> None:
    """Ask the kernel to drop a store file's cached pages once its tensors are held in memory of their own.

    safetensors maps the file: the tensors it returns live in the page cache, which a memory cgroup charges
    to whoever read it. Once they are converted (or copied) the cached pages are a second copy of the weights
    that stays charged until reclaimed; pages still mapped (tensors held as stored) are kept by the kernel."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):  # not Linux
        pass
    finally:
        os.close(fd)


def resident_tensor_elements(store_dir: str, manifest: Manifest) -> int:
    """Total weights of the resident tensors, from the safetensors header alone (nothing loaded).
    A quantized matrix counts its float shape's weights, not its bytes."""
    from safetensors import safe_open

    path = os.path.join(store_dir, manifest.resident_file)
    total = 0
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            info = manifest.resident_quantized.get(name)
            shape = info.shape if info is not None else f.get_slice(name).get_shape()
            count = 1
            for n in shape:
                count *= n
            total += count
    return total


@dataclass
class QuantizedTensor:
    """A resident matrix as a quantized store holds it: blocks (rows, bytes_per_row(kind, elements)) uint8."""

    blocks: torch.Tensor  # (rows, bytes per row) uint8, CPU
    kind: str  # quant_format kind: "q8_0", "q4_0", "q4_1"
    shape: tuple[int, int]  # (rows, elements): the float matrix it stands for

    def dequantize(self) -> torch.Tensor:
        """(rows, elements) float32."""
        import torch

        return torch.from_numpy(qf.dequantize_rows(self.kind, self.blocks.numpy(), self.shape[1]))


def dequantize_resident_weights(weights: dict[str, "torch.Tensor | QuantizedTensor"]) -> dict[str, torch.Tensor]:
    """Every quantized matrix as float32 (the float compute path); float tensors pass through as they are."""
    return {name: t.dequantize() if isinstance(t, QuantizedTensor) else t for name, t in weights.items()}


def bundle_rows_as_float(layout: FfnLayout, rows: np.ndarray, down_scales: np.ndarray | None = None,
                         neuron_ids: np.ndarray | None = None) -> np.ndarray:
    """Bundle rows as read -> rows in the [gate | up | down] element layout the float FFN multiplies.

    float16/float32 stores: `rows` itself (k, bundle_elements), untouched. Quantized stores: rows
    (k, bundle_bytes) uint8, and bfloat16 stores: rows (k, bundle_elements) of uint16 bits -> a new
    (k, bundle_elements) float32 array, each part decoded by its kind. A grouped down column also needs
    its layer's scale table (d, n_ff/32, c) and the rows' neuron ids (k,)."""
    if all(kind in NUMPY_FLOAT_KINDS for _, _, kind in layout.bundle_parts):
        return rows
    rows = np.ascontiguousarray(rows).view(np.uint8)  # (k, bundle_bytes)
    if rows.ndim != 2 or rows.shape[1] != layout.bundle_bytes:
        raise ValueError(f"expected bundle rows (k, {layout.bundle_bytes}) uint8, got {rows.shape} {rows.dtype}")
    out = np.empty((rows.shape[0], layout.bundle_elements), dtype=np.float32)  # (k, E)
    element_slices, byte_slices = layout.part_slices(), layout.part_byte_slices()
    for name, elements, kind in layout.bundle_parts:
        part = rows[:, byte_slices[name]]
        if qf.is_grouped_column(kind):
            if down_scales is None or neuron_ids is None:
                raise ValueError(f"{kind} down columns decode with their layer's scale table and neuron ids")
            out[:, element_slices[name]] = qf.dequantize_grouped_columns(kind, part, down_scales, neuron_ids)
        else:
            out[:, element_slices[name]] = qf.dequantize_rows(kind, part, elements)
    return out


def layer_table(tables: list[np.ndarray] | None, layer: int) -> np.ndarray | None:
    """One layer's down scale table from load_down_group_scales' list (None for stores without them)."""
    return None if tables is None else tables[layer]


def load_down_group_scales(store_dir: str, manifest: Manifest) -> list[np.ndarray] | None:
    """A quantized store's down scale tables, per layer (d, n_ff/32, c) float16, checksums checked;
    None for a store whose down columns need none. Each is held group-major ((n_ff/32, c, d) in memory, a
    transposed view): a down sum reads the scales of each neuron's group as whole rows
    (flash_io/kernel_layout.add_down_sums)."""
    if manifest.ffn.down_group_scales is None:
        return None
    return list(each_down_group_scales(store_dir, manifest))


def each_down_group_scales(store_dir: str, manifest: Manifest):
    """load_down_group_scales' tables one layer at a time (a caller that copies them elsewhere, e.g. into
    shared memory or a held layer, then holds one at a time, not all twice); None for each layer of a store
    whose down columns need none."""
    from safetensors import safe_open

    layout = manifest.ffn
    if layout.down_group_scales is None:
        yield from (None for _ in layout.layers)
        return
    path = os.path.join(store_dir, manifest.resident_file)
    with safe_open(path, framework="np") as f:
        for layer in range(len(layout.layers)):
            name = layout.down_group_scales_name(layer)
            table = f.get_tensor(name)
            if hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest() != manifest.resident_sha256.get(name):
                raise StoreError(f"{path}: checksum mismatch in tensor {name!r}; the store is corrupt, "
                                 "re-run `flashllm convert`")
            yield np.ascontiguousarray(table.transpose(1, 2, 0)).transpose(2, 0, 1)


def _tensor_sha256(tensor: "torch.Tensor") -> str:
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def load_resident_weights(store_dir: str, manifest: Manifest, verify: bool = True, skip: frozenset[str] = frozenset()
                          ) -> dict[str, "torch.Tensor | QuantizedTensor"]:
    """All resident tensors as stored (CPU), each checked against its manifest checksum: float tensors in
    their dtype, quantized matrices as QuantizedTensor. `skip`: names not loaded (read and checked by their
    own reader, e.g. StoredMatrixRows.block_chunks)."""
    import torch
    from safetensors import safe_open

    path = os.path.join(store_dir, manifest.resident_file)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys() if name not in skip}
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise StoreError(f"{path}: unreadable ({exc}); the store is corrupt, re-run `flashllm convert`") from exc
    missing = sorted(set(manifest.resident_sha256) - set(tensors) - set(skip))
    if missing:
        raise StoreError(f"{path}: tensors missing: {', '.join(missing[:5])}; re-run `flashllm convert`")
    if verify:
        for name, expected in manifest.resident_sha256.items():
            if name in skip:
                continue
            if _tensor_sha256(tensors[name]) != expected:
                raise StoreError(f"{path}: checksum mismatch in tensor {name!r}; the store is corrupt, "
                                 "re-run `flashllm convert`")
    for name, info in manifest.resident_quantized.items():
        if name in skip:
            continue
        rows, elements = info.shape
        expected_shape = (rows, qf.bytes_per_row(info.kind, elements))
        blocks = tensors[name]
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected_shape:
            raise StoreError(f"{path}: tensor {name!r} is {tuple(blocks.shape)} {blocks.dtype}, the manifest says "
                             f"{info.kind} blocks {expected_shape} uint8; the store is corrupt, re-run `flashllm convert`")
        tensors[name] = QuantizedTensor(blocks=blocks, kind=info.kind, shape=(rows, elements))
    if manifest.ffn.down_group_scales is not None:  # the FFN's own tables (load_down_group_scales), not the model's
        for layer in range(len(manifest.ffn.layers)):
            tensors.pop(manifest.ffn.down_group_scales_name(layer), None)
    return tensors


# rows of a store-backed matrix kept as read, least recently used out: a head's exact top 32 rows recur from
# token to token (and the next input's embedding row is one of them), 65% of them within the last 512 rows on
# the demo (docs/benchmarks.md, stop 34); 512 of the demo's rows are 0.3 MiB, counted as resident
STORED_ROWS_CACHED = 512
# rows not kept go to the device together, this many at a time: one at a time, a token's ~16 misses of a head's
# exact rows waited ~70 µs each for the device (docs/benchmarks.md, stop 36)
ROW_READS_IN_FLIGHT = 16


class StoredMatrixRows:
    """Rows of a quantized resident matrix read from the store's resident file when asked for, instead of
    being held: an embedding lookup needs only a step's T rows (612 bytes each for the demo's q8_0 table),
    so the table costs only the last `cached_rows` rows read, and each row comes back exactly as stored. Rows
    are read directly (O_DIRECT, else dropped from the page cache after: a memory cgroup would charge cached
    pages to the process)."""

    def __init__(self, path: str, data_offset_bytes: int, kind: str, shape: tuple[int, int], name: str = "",
                 cached_rows: int = STORED_ROWS_CACHED):
        self.path, self.kind, self.shape, self.name = path, kind, tuple(shape), name
        self.row_bytes = qf.bytes_per_row(kind, shape[1])
        self.data_offset_bytes = data_offset_bytes
        self._cached = np.empty((min(cached_rows, shape[0]), self.row_bytes), np.uint8)  # (slots, row bytes)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # row → its slot, least recently used first
        self._fd = os.open(path, os.O_RDONLY)
        # the whole-matrix reads (block_chunks) go through the page cache and drop what they read: no readahead,
        # whose pages past a chunk would stay cached, charged to the process
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        # single rows, anywhere, read directly: each is its aligned blocks, all of a call's in flight together
        self._direct = DirectFile(path)
        # slots as the plan counts them (a coarser device's own alignment where it asks more)
        self._row_stride_bytes = _row_stride_bytes(self.row_bytes, max(ALIGNMENT_BYTES, self._direct.alignment_bytes))
        self._row_staging = aligned_buffer(ROW_READS_IN_FLIGHT * self._row_stride_bytes)  # (reads × stride,)
        try:
            self._aio = AioQueue(ROW_READS_IN_FLIGHT) if self._direct.direct else None
        except AioUnavailable:
            self._aio = None  # one read at a time

    @property
    def nbytes(self) -> int:
        """Bytes held: the rows kept as read and the staging their reads land in."""
        return self._cached.nbytes + self.staging_nbytes

    @property
    def staging_nbytes(self) -> int:
        """Bytes of the staging the direct reads land in (fixed, whatever the matrix)."""
        return self._row_staging.nbytes

    @property
    def reads_in_flight(self) -> int:
        """Rows read at once: ROW_READS_IN_FLIGHT through AIO, else 1 (buffered file or no AIO)."""
        return ROW_READS_IN_FLIGHT if self._aio is not None else 1

    @staticmethod
    def held_bytes(kind: str, shape: tuple[int, int]) -> int:
        """What one of these holds for a (rows, in) matrix of kind, known before making it: the rows kept and the
        staging, its slots aligned to ALIGNMENT_BYTES as the FFN reads' staging is counted."""
        row_bytes = qf.bytes_per_row(kind, shape[1])
        return min(STORED_ROWS_CACHED, shape[0]) * row_bytes + \
            ROW_READS_IN_FLIGHT * _row_stride_bytes(row_bytes, ALIGNMENT_BYTES)

    def _raw_rows(self, unique: np.ndarray) -> np.ndarray:
        """Rows unique (u,) as stored (u, row bytes): from the rows kept where they are, else read and kept."""
        raw = np.empty((len(unique), self.row_bytes), np.uint8)  # (u, row bytes)
        missing = []  # indices into unique of the rows to read
        for index, row in enumerate(unique.tolist()):
            slot = self._slot_of.get(row)
            if slot is None:
                missing.append(index)
                continue
            self._slot_of.move_to_end(row)
            raw[index] = self._cached[slot]
        for first in range(0, len(missing), ROW_READS_IN_FLIGHT):
            indices = missing[first:first + ROW_READS_IN_FLIGHT]
            raw[indices] = self._read_scattered(unique[indices])
        for index in missing:
            if len(self._cached):
                slot = len(self._slot_of) if len(self._slot_of) < len(self._cached) else \
                    self._slot_of.popitem(last=False)[1]
                self._slot_of[int(unique[index])] = slot
                self._cached[slot] = raw[index]
        return raw

    def _read_scattered(self, rows: np.ndarray) -> np.ndarray:
        """At most ROW_READS_IN_FLIGHT rows (k,) anywhere in the matrix → (k, row bytes) as stored, read directly:
        each row's aligned blocks into its staging slot, every read in flight at once where AIO is available."""
        alignment = self._direct.alignment_bytes
        offsets = self.data_offset_bytes + rows.astype(np.int64) * self.row_bytes  # (k,)
        starts = align_down(offsets, alignment)  # (k,)
        lengths = align_up(offsets + self.row_bytes, alignment) - starts  # (k,) whole blocks
        needed = offsets - starts + self.row_bytes  # (k,) what a read must deliver (the file may end first)
        slots = np.arange(len(rows)) * self._row_stride_bytes  # (k,) staging offsets

        def check(index: int, got_bytes: int) -> None:
            if got_bytes < needed[index]:
                raise StoreError(f"{self.path}: short read at row {int(rows[index])}; the store is corrupt, "
                                 "re-run `flashllm convert`")

        if self._aio is not None:
            self._aio.read_all(self._direct.fileno(), starts, lengths, self._row_staging.ctypes.data + slots, check)
        else:
            for index, (start, length, slot) in enumerate(zip(starts.tolist(), lengths.tolist(), slots.tolist())):
                check(index, self._direct.read_into(start, self._row_staging[slot:slot + length], min_bytes=0))
        first = slots + (offsets - starts)  # (k,) where each row begins in the staging
        return self._row_staging[first[:, None] + np.arange(self.row_bytes)]  # (k, row bytes)

    def rows(self, ids: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
        """ids (...) int → the rows (..., in) in dtype, dequantized exactly as stored."""
        import torch

        from flashllm.workers.models.quant_linear import QuantizedBlocks, dequantize

        flat = ids.reshape(-1).cpu().numpy().astype(np.int64)  # (n,)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise ValueError(f"token id out of range 0..{self.shape[0] - 1}")
        unique, inverse = np.unique(flat, return_inverse=True)
        raw = self._raw_rows(unique)  # (u, row bytes)
        values = dequantize(QuantizedBlocks(self.kind, torch.from_numpy(raw), (len(unique), self.shape[1])))
        # inverse copied: indexing by a tensor over np.unique's own array took ~0.6 ms against ~15 µs (torch 2.13)
        return values[torch.from_numpy(inverse.copy())].reshape(*ids.shape, self.shape[1]).to(dtype)

    def block_chunks(self, rows_per_chunk: int, expected_sha256: str | None = None):
        """Yield (first row, raw blocks (rows, row bytes) uint8 torch tensor) over the whole matrix, a chunk at a
        time (so holding it in another form never needs all of it as stored), dropping each chunk from the page
        cache; with expected_sha256, a StoreError at the end if the bytes do not match the manifest."""
        import torch

        digest = hashlib.sha256() if expected_sha256 else None
        for start in range(0, self.shape[0], rows_per_chunk):
            stop = min(start + rows_per_chunk, self.shape[0])
            raw = self._read_rows(start, np.empty((stop - start, self.row_bytes), np.uint8))  # (rows, row bytes)
            if digest is not None:
                digest.update(raw.data)
            yield start, torch.from_numpy(raw)
        if digest is not None and digest.hexdigest() != expected_sha256:
            raise StoreError(f"{self.path}: checksum mismatch in tensor {self.name!r}; the store is corrupt, "
                             "re-run `flashllm convert`")

    def _read_rows(self, start: int, out: np.ndarray) -> np.ndarray:
        """Rows start.. into out (rows, row bytes) uint8, then the pages they lie on dropped from the page cache:
        the kernel drops only whole pages in the range it is given, so a row's own range (a head's row is
        612 bytes on the demo) would leave its page cached, charged to this process and never counted."""
        offset = self.data_offset_bytes + start * self.row_bytes
        if os.preadv(self._fd, [memoryview(out).cast("B")], offset) != out.nbytes:
            raise StoreError(f"{self.path}: short read at row {start}; the store is corrupt, re-run `flashllm convert`")
        first_page = align_down(offset, mmap.PAGESIZE)
        os.posix_fadvise(self._fd, first_page, align_up(offset + out.nbytes, mmap.PAGESIZE) - first_page,
                         os.POSIX_FADV_DONTNEED)
        return out

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        if getattr(self, "_aio", None) is not None:
            self._aio.close()
            self._aio = None
        if getattr(self, "_direct", None) is not None:
            self._direct.close()

    def __del__(self):
        self.close()


def _row_stride_bytes(row_bytes: int, alignment_bytes: int) -> int:
    """Staging bytes a direct read of one row takes: its row rounded out to whole blocks wherever it starts, and
    a multiple of the alignment so that every slot's address is aligned too."""
    return align_up(row_bytes, alignment_bytes) + alignment_bytes


def stored_matrix_rows(store_dir: str, manifest: Manifest, name: str) -> StoredMatrixRows:
    """The quantized resident matrix `name`, read row by row from the resident file (its safetensors header
    gives where the tensor's bytes start)."""
    import json
    import struct

    path = os.path.join(store_dir, manifest.resident_file)
    with open(path, "rb") as f:
        header_bytes = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_bytes))
    info = manifest.resident_quantized[name]
    start, _ = header[name]["data_offsets"]
    return StoredMatrixRows(path, 8 + header_bytes + start, info.kind, tuple(info.shape), name)


def verify_store(store_dir: str) -> list[str]:
    """Check every region of the store, FFN included. Returns a line per checked region; raises on the first bad one."""
    manifest = open_store(store_dir)
    lines = []
    load_resident_weights(store_dir, manifest, verify=True)
    lines.append(f"{manifest.resident_file}: {len(manifest.resident_sha256)} tensors ok")
    ffn_path = os.path.join(store_dir, manifest.ffn.file)
    with open(ffn_path, "rb") as f:
        for layer, region in enumerate(manifest.ffn.layers):
            digest = hashlib.sha256()
            f.seek(region.offset_bytes)
            remaining = region.length_bytes
            while remaining:
                chunk = f.read(min(VERIFY_CHUNK_BYTES, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            if remaining or digest.hexdigest() != region.sha256:
                raise StoreError(f"{ffn_path}: checksum mismatch in the FFN region of layer {layer} "
                                 f"(bytes {region.offset_bytes}..{region.offset_bytes + region.length_bytes}); "
                                 "the store is corrupt, re-run `flashllm convert`")
            lines.append(f"{manifest.ffn.file}: layer {layer} ok ({region.length_bytes} bytes)")
    if manifest.sparsity is not None:
        sparsity_path = os.path.join(store_dir, manifest.sparsity.file)
        if not os.path.isfile(sparsity_path):
            raise StoreError(f"{sparsity_path}: missing; re-run `flashllm calibrate`")
        with open(sparsity_path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != manifest.sparsity.sha256:
                raise StoreError(f"{sparsity_path}: checksum mismatch; re-run `flashllm calibrate`")
        lines.append(f"{manifest.sparsity.file}: ok")
    return lines

