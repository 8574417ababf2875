"""Shared-memory layouts: where the tensors that messages point at live.

Two segments per runtime instance, plain files in /dev/shm mapped with mmap
(not multiprocessing.shared_memory: on Python ≤ 3.12 every attach registers
with a resource tracker that unlinks the segment when the attaching process
exits, cpython#82300). The supervisor creates and unlinks them; workers only
attach. Names carry the instance, whose first field is the supervisor's pid,
so a later supervisor can sweep what a SIGKILLed one left behind:

    /dev/shm/flashllm-<pid>-<hex>-cache       the neuron caches
    /dev/shm/flashllm-<pid>-<hex>-exchange    hidden states, masks, whole layers, logits

Every array starts on a page boundary (so O_DIRECT reads may land in it).

cache segment (written only by the prefetcher, and only while compute is not
inside that layer; "layer ready (version)" hands a layer over):

    headers     (L, 2) int64        per layer: [num_rows, version]
    rows.0      (capacity_0, E)      layer 0's cache matrix: rows [0, num_rows) are
                                     the cached neurons, packed (NeuronCache's layout)
    slot_ids.0  (capacity_0,) int32  store neuron id of each row, -1 = free
    rows.1 ...  slot_ids.1 ...       one pair per layer, capacities may differ

    E = bundle elements ([gate | up | down] or [up | down | up_bias]), cache dtype

exchange segment:

    hidden         (2, max_tokens, d)     FFN input of layer l in [l % 2]     compute → predictor
    mask           (max_tokens, n_ff) bool per-token neuron mask (masked path) predictor → compute
    chunk_staging  (2, chunk_rows, E)     chunks of whole layers, store dtype  prefetch → compute
                                          (masked path: LayerReady or LayerStaged names
                                          the slot, ChunkDone hands it back)
    logits         (logits_rows, V) f32   a chunk of a forward's logits       compute → supervisor

Two hidden buffers by layer parity let layer l+1 be written while layer l is
still read; the message order guarantees l-1's buffer is free (see
workers/compute.py). Two chunk slots let the prefetcher read one chunk while
compute multiplies the other, without ever holding a whole layer.

Pure Python + numpy.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "flashllm-"
PAGE_BYTES = mmap.PAGESIZE
CACHE_SEGMENT = "cache"
EXCHANGE_SEGMENT = "exchange"
CACHE_HEADER_FIELDS = ("num_rows", "version")
_SEGMENT_NAME = re.compile(r"^flashllm-(?P<instance>(?P<pid>\d+)-[0-9a-f]+)-(?P<kind>[a-z]+)$")


class SharedMemoryError(RuntimeError):
    """A segment cannot be created or attached (exists already, missing, wrong size, /dev/shm full)."""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string, e.g. "<f4"
    offset_bytes: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SegmentLayout:
    kind: str
    arrays: tuple[ArraySpec, ...]
    size_bytes: int

    @staticmethod
    def build(kind: str, arrays: list[tuple[str, tuple[int, ...], object]]) -> "SegmentLayout":
        """(name, shape, dtype) in order → page-aligned offsets."""
        specs, offset = [], 0
        for name, shape, dtype in arrays:
            spec = ArraySpec(name, tuple(int(n) for n in shape), np.dtype(dtype).str, offset)
            specs.append(spec)
            offset += -(-max(spec.nbytes, 1) // PAGE_BYTES) * PAGE_BYTES
        return SegmentLayout(kind, tuple(specs), max(offset, PAGE_BYTES))

    def spec(self, name: str) -> ArraySpec:
        for spec in self.arrays:
            if spec.name == name:
                return spec
        raise KeyError(f"segment {self.kind!r} has no array {name!r}")


def neuron_cache_layout(capacity_rows: list[int], bundle_elements: int, dtype,
                        kernel_arrays: list[list[tuple[str, tuple[int, ...], object]]] | None = None,
                        down_table_shapes: list[tuple[int, ...]] | None = None) -> SegmentLayout:
    """Per layer: the cache's rows (capacity, E) and slot ids; or, with kernel_arrays (a quantized store's
    caches for CPU compute, workers/flash_io/kernel_rows.py), those arrays in place of the rows, and the layers'
    down scale tables (down_table_shapes, float16), which the prefetch process fills and compute reads."""
    arrays: list[tuple[str, tuple[int, ...], object]] = [("headers", (len(capacity_rows), len(CACHE_HEADER_FIELDS)), np.int64)]
    for layer, capacity in enumerate(capacity_rows):
        if kernel_arrays is None:
            arrays.append((f"rows.{layer}", (capacity, bundle_elements), dtype))  # (capacity, E)
        else:
            arrays += [(f"kernel.{layer}.{name}", shape, kind) for name, shape, kind in kernel_arrays[layer]]
        arrays.append((f"slot_ids.{layer}", (capacity,), np.int32))
    for layer, shape in enumerate(down_table_shapes or []):
        arrays.append((f"down_table.{layer}", shape, np.float16))
    return SegmentLayout.build(CACHE_SEGMENT, arrays)


CHUNK_SLOTS = 2


def exchange_layout(max_tokens: int, hidden_size: int, num_neurons: int, bundle_elements: int, store_dtype,
                    hidden_dtype, vocab_size: int, logits_rows: int, chunk_rows: int,
                    max_sequences: int | None = None) -> SegmentLayout:
    """max_sequences: the most sequences a decode step holds (the KV slots); None: max_tokens."""
    max_sequences = max_tokens if max_sequences is None else max_sequences
    return SegmentLayout.build(EXCHANGE_SEGMENT, [
        ("hidden", (2, max_tokens, hidden_size), hidden_dtype),  # (2, N, d)
        ("mask", (max_tokens, num_neurons), np.bool_),  # (N, n_ff) the masked path's per-token neurons
        # (2, B, n_ff) the cached path's per-sequence neurons (a decode step: B ≤ max_sequences), in buffer
        # layer % 2 (written for layer l+1 while compute may still read layer l's)
        ("computed", (2, max_sequences, num_neurons), np.bool_),
        ("chunk_staging", (CHUNK_SLOTS, chunk_rows, bundle_elements), store_dtype),  # (2, chunk_rows, E)
        ("logits", (logits_rows, vocab_size), np.float32),  # (R, V)
    ])


def segment_name(instance: str, kind: str) -> str:
    return f"{SEGMENT_PREFIX}{instance}-{kind}"


def segment_path(instance: str, kind: str) -> str:
    return os.path.join(SHM_DIR, segment_name(instance, kind))


class SharedSegment:
    """One mapped segment and numpy views of its arrays (`segment.arrays[name]`).

    Views must be dropped before `close()`: a live view keeps the mapping
    exported and mmap.close() raises BufferError; close() then leaves the
    mapping to the garbage collector (unmapped with the last view) instead
    of crashing.
    """

    def __init__(self, path: str, layout: SegmentLayout, mapping: mmap.mmap, owner: bool):
        self.path, self.layout, self.owner = path, layout, owner
        self._mapping: mmap.mmap | None = mapping
        # np.frombuffer holds a buffer export on the mapping (np.ndarray(buffer=...) does not, and a view
        # would then dangle after close(): a segfault instead of a BufferError)
        self.arrays: dict[str, np.ndarray] = {
            spec.name: np.frombuffer(mapping, dtype=np.dtype(spec.dtype), count=int(np.prod(spec.shape, dtype=np.int64)),
                                     offset=spec.offset_bytes).reshape(spec.shape)
            for spec in layout.arrays
        }

    @staticmethod
    def create(instance: str, layout: SegmentLayout) -> "SharedSegment":
        path = segment_path(instance, layout.kind)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise SharedMemoryError(f"{path} exists already: another runtime instance uses the name "
                                    f"{instance!r}; remove the file if no flashllm process is running") from None
        try:
            os.ftruncate(fd, layout.size_bytes)
            mapping = mmap.mmap(fd, layout.size_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise SharedMemoryError(f"cannot create {path} ({layout.size_bytes / 2**20:.1f} MiB): {exc}; "
                                    f"is {SHM_DIR} large enough (df -h {SHM_DIR})?") from exc
        os.close(fd)  # the mapping keeps the memory; the name keeps the file
        return SharedSegment(path, layout, mapping, owner=True)

    @staticmethod
    def attach(instance: str, layout: SegmentLayout) -> "SharedSegment":
        path = segment_path(instance, layout.kind)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryError(f"{path} is missing: the supervisor that created it is gone") from None
        try:
            size = os.fstat(fd).st_size
            if size != layout.size_bytes:
                raise SharedMemoryError(f"{path} has {size} bytes but the layout needs {layout.size_bytes}: "
                                        "the supervisor and this worker disagree on the layout")
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return SharedSegment(path, layout, mapping, owner=False)

    def close(self) -> None:
        """Drop our views and unmap; other views still alive elsewhere keep the mapping until collected."""
        self.arrays = {}
        if self._mapping is not None:
            mapping, self._mapping = self._mapping, None
            try:
                mapping.close()
            except BufferError:
                pass  # a view outlives us: the GC unmaps when it goes

    def unlink(self) -> None:
        """Remove the name (the owner does this on every exit path); mappings stay valid until closed."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def cache_layer_arrays(segment: SharedSegment, layer: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(rows (capacity, E) or None where the layer holds kernel arrays, slot_ids (capacity,), header (2,) =
    [num_rows, version]) of one layer."""
    arrays = segment.arrays
    return arrays.get(f"rows.{layer}"), arrays[f"slot_ids.{layer}"], arrays["headers"][layer]


def cache_kernel_arrays(segment: SharedSegment, layer: int) -> dict[str, np.ndarray] | None:
    """A layer's kernel arrays by name (neuron_cache_layout's kernel_arrays), None when it holds rows."""
    prefix = f"kernel.{layer}."
    found = {name[len(prefix):]: array for name, array in segment.arrays.items() if name.startswith(prefix)}
    return found or None


def cache_down_tables(segment: SharedSegment) -> list[np.ndarray]:
    """The layers' down scale tables in the segment, in layer order (none when it has none)."""
    tables = []
    while f"down_table.{len(tables)}" in segment.arrays:
        tables.append(segment.arrays[f"down_table.{len(tables)}"])
    return tables


def parse_segment_name(name: str) -> tuple[str, int, str] | None:
    """'flashllm-1234-ab12-cache' → (instance '1234-ab12', pid 1234, kind 'cache'); None for other files."""
    match = _SEGMENT_NAME.match(name)
    if match is None:
        return None
    return match["instance"], int(match["pid"]), match["kind"]


def list_segments() -> list[tuple[str, str]]:
    """(instance, path) of every flashllm segment in /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        parsed = parse_segment_name(name)
        if parsed is not None:
            found.append((parsed[0], os.path.join(SHM_DIR, name)))
    return found
