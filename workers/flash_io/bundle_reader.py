"""Read FFN neuron bundles from a store's ffn.bin with large, aligned, parallel direct reads.

The paper's two levers for flash throughput are request size and parallelism:
random 4 KiB reads reach a fraction of what 64 KiB+ reads do. So a token's
wanted neurons are not read one by one. `plan_reads` sorts them and merges
neighbours into one aligned request whenever the gap between them is cheaper
to read than a separate request (`read_cost.ReadCostModel`: the device's
per-request and per-byte cost), smallest gaps first and only while the read
stays within `max_read_amplification` times the wanted bundles' bytes (by
time alone the break-even gap spans several bundles, and flash traffic is what
the budget is judged by; docs/benchmarks.md has the trade-off measured), up to
`max_request_bytes`. A masked layer's set may instead be dense (a SwiGLU
token's), which the bound would cut into many small requests: its reads keep
the bound only where the cost model says that costs little (`GapMerging`).
Requests are aligned to what the file
says direct I/O needs (`direct_io.DirectFile`: 512 B on most disks), not to
the store's 4 KiB region alignment;
the requests then run into an aligned staging buffer, and as each completes
its wanted rows are copied out to the caller's matrix (e.g. free rows of a
`NeuronCache`, possibly in shared memory).

Two ways to keep many requests in flight: Linux native AIO (one thread
submits a whole round, `linux_aio.AioQueue`; the default on direct files), or
a pool of threads each issuing `os.preadv` (which releases the GIL): the
fallback where AIO is unavailable or the file is read buffered.

Byte picture of one request inside a layer region (bundle_bytes need not be a
multiple of the alignment, so a request may start and end inside a bundle):

    file:    |.....block.....|.....block.....|.....block.....|
    region:        [ id a   ][ id a+1 ][ id a+2 ][ id a+3 ]
    wanted:        [ id a   ]          [ id a+2 ]             (gap a+1 read anyway)
    request: |<-------------- offset_bytes, length_bytes ---->|  first_id=a, last_id=a+2

bfloat16 stores come back as raw uint16 bit patterns (numpy has no bfloat16);
`torch.from_numpy(a).view(torch.bfloat16)` reinterprets them without a copy.

Not thread-safe: one caller at a time per reader (the staging and layer
buffers are reused across calls).
"""
from __future__ import annotations

import enum
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from flashllm.protocol.store_format import ALIGNMENT_BYTES, FfnLayout, StoreError, align_down, align_up
from flashllm.workers.flash_io.direct_io import ALIGNMENT_SOURCES, DirectFile, aligned_buffer
from flashllm.workers.flash_io.integrity import open_checksums, reads_verified
from flashllm.workers.flash_io.linux_aio import DEFAULT_QUEUE_DEPTH, AioQueue, AioUnavailable
from flashllm.workers.flash_io.read_cost import CURVE_REQUEST_SIZES_BYTES, DEFAULT_READ_COST, ReadCostModel, fit_read_cost

logger = logging.getLogger(__name__)

IO_BACKENDS = ("auto", "aio", "threads")

# The bytes a read of neurons may take from the device, as a multiple of the wanted bundles' bytes: gaps
# are merged (smallest first) only within it. Alignment alone may exceed it (a bundle smaller than a block).
DEFAULT_MAX_READ_AMPLIFICATION = 1.2
# Past ~1 MiB a larger request gains nothing and hurts parallelism.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
# A masked layer's set keeps that byte bound while the read cost model says it makes the read at most this
# much slower than merging by the cost alone: a sparse set's bound costs ~1% (the 7B shape's sets: 1.5x the
# needed bytes down to 1.2x), a dense set's (a SwiGLU token's) 2-10x (docs/benchmarks.md, stop 33).
MAX_BOUND_SLOWDOWN = 1.1


class GapMerging(enum.Enum):
    """Which gaps between wanted bundles a neuron read also reads, each read gap saving a request."""

    BOUNDED = "bounded"  # below the read cost's break-even, smallest first, within max_read_amplification
    # as BOUNDED unless that makes the read's modelled time more than MAX_BOUND_SLOWDOWN x merging by the cost
    # alone: a masked layer's set, which may be dense (then read fastest nearly whole)
    BOUNDED_UNLESS_SLOWER = "bounded unless slower"
    TOUCHING = "touching"  # none: only bundles whose aligned blocks touch share a request (planned spans)

# A read of many neurons goes to the device in rounds whose requests take at most
# about this much staging (a round waits for the one before, whose buffer it
# reuses), so a read never stages a whole layer (~270 MB for a 7B float16 model).
DEFAULT_MAX_STAGING_BYTES = 8 * 1024 * 1024

# The dense-read path (prefill, and decode batches whose union does not fit the
# cache) goes through a layer in chunks of about this many bytes of bundles, so
# it holds a few MiB of staging instead of whole layers (~270 MB each for a 7B
# float16 model) and the memory budget goes to the neuron caches instead.
DENSE_CHUNK_BYTES = 4 * 1024 * 1024


def layer_chunks(num_neurons: int, bundle_bytes: int, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) neuron ranges covering a layer in order, each about chunk_bytes (DENSE_CHUNK_BYTES) of
    bundles, at least one."""
    rows = max(1, (chunk_bytes or DENSE_CHUNK_BYTES) // bundle_bytes)
    return [(start, min(start + rows, num_neurons)) for start in range(0, num_neurons, rows)]


def chunk_ids(num_neurons: int, bundle_bytes: int, read_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """The masked path's chunks as neuron ids, in order: the whole layer's (layer_chunks()), or with read_ids
    (sorted unique) only those neurons, in chunks of the same number of rows."""
    if read_ids is None:
        return [np.arange(start, stop) for start, stop in layer_chunks(num_neurons, bundle_bytes)]
    return [read_ids[start:stop] for start, stop in layer_chunks(max(1, len(read_ids)), bundle_bytes)]


def largest_span_bytes(layout: FfnLayout, alignment_bytes: int = ALIGNMENT_BYTES) -> int:
    """Aligned bytes of the largest layer region: what reading a whole layer takes."""
    return max(align_up(r.offset_bytes + r.length_bytes, alignment_bytes) - align_down(r.offset_bytes, alignment_bytes)
               for r in layout.layers)


def neuron_read_staging_bytes(layout: FfnLayout, alignment_bytes: int = ALIGNMENT_BYTES,
                              max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES,
                              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> int:
    """The most staging a read of neurons takes: a round's requests (the last may pass the round's bound by a
    request), and never more than the largest layer."""
    return min(largest_span_bytes(layout, alignment_bytes), max_staging_bytes + max_request_bytes)


def largest_chunk_rows(layout: FfnLayout) -> int:
    """Neurons in the largest chunk of any layer (a layer's first chunk is a largest one)."""
    start, stop = layer_chunks(max(region.num_neurons for region in layout.layers), layout.bundle_bytes)[0]
    return stop - start


# quantized stores' bundles are raw bytes: rows of bundle_bytes uint8 (protocol/quant_format.py decodes them)
_NUMPY_DTYPE_OF_STORE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16,
                         "q8_0": np.uint8, "q4_0": np.uint8, "q4_1": np.uint8}


def numpy_dtype_of_store(dtype_name: str) -> np.dtype:
    """The numpy dtype the reader returns for a store dtype (bfloat16 -> uint16 raw bits; quantized -> uint8 bytes)."""
    try:
        return np.dtype(_NUMPY_DTYPE_OF_STORE[dtype_name])
    except KeyError:
        raise StoreError(
            f"store dtype {dtype_name!r} is not one this reader knows ({sorted(_NUMPY_DTYPE_OF_STORE)}); "
            "re-run `flashllm convert` with a supported dtype"
        ) from None


class ReadRequest(NamedTuple):
    offset_bytes: int  # file offset, aligned
    length_bytes: int  # aligned
    first_id: int  # first wanted neuron id covered
    last_id: int  # last wanted neuron id covered (inclusive)


REQUEST_SIZE_BUCKETS = 40  # request-size histogram buckets: powers of two up to 2**39 bytes


@dataclass
class ReadStats:
    requests: int = 0
    read_bytes: int = 0  # aligned bytes requested from the device
    useful_bytes: int = 0  # bundle bytes the caller wanted
    read_time_s: float = 0.0  # wall time inside read_layer / read_neurons
    # requests by size: bucket b counts those of 2**(b-1) < bytes <= 2**b
    request_size_counts: np.ndarray = field(default_factory=lambda: np.zeros(REQUEST_SIZE_BUCKETS, dtype=np.int64))

    def count_requests(self, lengths_bytes: np.ndarray) -> None:
        buckets = np.ceil(np.log2(np.maximum(np.asarray(lengths_bytes, dtype=np.float64), 1.0))).astype(np.int64)
        self.request_size_counts += np.bincount(np.minimum(buckets, REQUEST_SIZE_BUCKETS - 1),
                                                minlength=REQUEST_SIZE_BUCKETS)

    def since(self, earlier: "ReadStats") -> "ReadStats":
        """What was read after `earlier` (a copy of these stats taken then)."""
        return ReadStats(self.requests - earlier.requests, self.read_bytes - earlier.read_bytes,
                         self.useful_bytes - earlier.useful_bytes, self.read_time_s - earlier.read_time_s,
                         self.request_size_counts - earlier.request_size_counts)

    def copy(self) -> "ReadStats":
        return self.since(ReadStats())

    def request_size_histogram(self) -> dict[int, int]:
        """{largest request bytes of the bucket (a power of two): requests}, for the buckets that have any."""
        return {1 << int(bucket): int(self.request_size_counts[bucket])
                for bucket in np.flatnonzero(self.request_size_counts)}


def _plan_read_arrays(
    sorted_ids: np.ndarray,
    region_offset_bytes: int,
    bundle_bytes: int,
    alignment_bytes: int,
    max_gap_bytes: int,
    max_request_bytes: int,
    max_read_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorized planner over sorted unique ids; returns (offsets, lengths, first_index, end_index).

    first_index/end_index are positions in `sorted_ids` ([first, end) per request).
    Neighbours whose aligned spans touch or overlap always share a request (that
    saves a request and reads no extra byte); a gap of up to max_gap_bytes is read
    to save a request, smallest gaps first while the total stays within
    max_read_bytes (None: no bound).
    """
    ids = sorted_ids.astype(np.int64)  # (k,)
    starts = (region_offset_bytes + ids * bundle_bytes) // alignment_bytes * alignment_bytes  # (k,)
    ends = -(-(region_offset_bytes + (ids + 1) * bundle_bytes) // alignment_bytes) * alignment_bytes  # (k,)
    gaps = starts[1:] - ends[:-1]  # (k-1,) unwanted bytes between neighbours' aligned spans; <= 0: they share blocks
    merge = gaps <= max_gap_bytes  # (k-1,)
    worth_reading = np.flatnonzero((gaps > 0) & merge)  # (m,) gaps that cost less than a request
    if max_read_bytes is not None and worth_reading.size:
        union_bytes = int((ends - starts).sum() + np.minimum(gaps, 0).sum())  # aligned spans, overlaps once
        by_size = worth_reading[np.argsort(gaps[worth_reading], kind="stable")]  # (m,)
        affordable = np.searchsorted(np.cumsum(gaps[by_size]), max_read_bytes - union_bytes, side="right")
        merge[by_size[affordable:]] = False
    # A new request starts where the gap to the previous bundle's aligned end is not merged.
    breaks = np.flatnonzero(~merge) + 1  # (groups-1,)
    group_first = np.concatenate(([0], breaks))  # (groups,)
    group_end = np.concatenate((breaks, [len(ids)]))  # (groups,)
    oversize = ends[group_end - 1] - starts[group_first] > max_request_bytes  # (groups,)
    if not oversize.any():
        offsets = starts[group_first]
        return offsets, ends[group_end - 1] - offsets, group_first, group_end
    # Split oversize groups greedily; the loop runs once per request, not per id.
    firsts: list[int] = []
    end_indices: list[int] = []
    for first, end in zip(group_first.tolist(), group_end.tolist()):
        while first < end:
            # A request always covers at least one bundle, even one larger than max_request_bytes.
            fitting = int(np.searchsorted(ends[first:end], starts[first] + max_request_bytes, side="right"))
            stop = first + max(1, fitting)
            firsts.append(first)
            end_indices.append(stop)
            first = stop
    first_index = np.asarray(firsts, dtype=np.int64)
    end_index = np.asarray(end_indices, dtype=np.int64)
    offsets = starts[first_index]
    return offsets, ends[end_index - 1] - offsets, first_index, end_index


def max_read_bytes_for(num_ids: int, bundle_bytes: int, max_read_amplification: float | None) -> int | None:
    """The read's byte bound: max_read_amplification x the wanted bundles' bytes (None: unbounded)."""
    return None if max_read_amplification is None else int(max_read_amplification * num_ids * bundle_bytes)


def plan_reads(
    neuron_ids: np.ndarray,
    region_offset_bytes: int,
    bundle_bytes: int,
    alignment_bytes: int = 512,
    max_gap_bytes: int = DEFAULT_READ_COST.break_even_gap_bytes,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_read_amplification: float | None = DEFAULT_MAX_READ_AMPLIFICATION,
) -> list[ReadRequest]:
    """Aligned read requests covering the bundles of `neuron_ids` (any order; duplicates merged).

    Neuron i's bundle is bytes [region_offset_bytes + i*bundle_bytes, + bundle_bytes).
    Every request's offset and length are multiples of `alignment_bytes`;
    requests are sorted by offset; together they cover every wanted bundle.
    Gaps up to max_gap_bytes (the read cost's break-even) are read instead of
    starting a new request, smallest first, while the requests' bytes stay within
    max_read_amplification x the wanted bundles' bytes (None: no bound).
    """
    if alignment_bytes <= 0 or max_request_bytes < alignment_bytes or max_gap_bytes < 0:
        raise ValueError(
            f"need alignment_bytes > 0, max_request_bytes >= alignment_bytes and max_gap_bytes >= 0; got "
            f"{alignment_bytes}, {max_request_bytes}, {max_gap_bytes}"
        )
    if max_read_amplification is not None and max_read_amplification < 1:
        raise ValueError(f"max_read_amplification must be >= 1 (or None), got {max_read_amplification}")
    sorted_ids = np.unique(np.asarray(neuron_ids, dtype=np.int64))  # (k,)
    if len(sorted_ids) == 0:
        return []
    offsets, lengths, first_index, end_index = _plan_read_arrays(
        sorted_ids, region_offset_bytes, bundle_bytes, alignment_bytes, max_gap_bytes, max_request_bytes,
        max_read_bytes_for(len(sorted_ids), bundle_bytes, max_read_amplification)
    )
    return [
        ReadRequest(int(offset), int(length), int(sorted_ids[first]), int(sorted_ids[end - 1]))
        for offset, length, first, end in zip(offsets, lengths, first_index, end_index)
    ]


def _run_parallel(pool: ThreadPoolExecutor | None, num_workers: int, num_tasks: int, task: Callable[[int, int], None]) -> None:
    """Run task(task_index, worker_index) for every index on up to num_workers pool threads.

    Workers pull indices from a shared counter (next() on itertools.count is
    atomic under the GIL): one future per worker instead of one per request,
    which matters when a request takes tens of microseconds.
    """
    num_workers = min(num_workers, num_tasks)
    if num_workers <= 1 or pool is None:
        for index in range(num_tasks):
            task(index, 0)
        return
    counter = itertools.count()

    def work(worker_index: int) -> None:
        for index in counter:
            if index >= num_tasks:
                return
            task(index, worker_index)

    futures = [pool.submit(work, worker_index) for worker_index in range(num_workers)]
    # Wait for every worker before raising: none may still write into the buffers after we return.
    wait(futures)
    for future in futures:
        future.result()  # re-raises a worker's exception


class BundleReader:
    """Reads layer regions and neuron bundles of a store's ffn.bin, bypassing the page cache."""

    def __init__(
        self,
        store_dir: str,
        layout: FfnLayout,
        num_threads: int = 4,
        max_gap_bytes: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        io_backend: str = "auto",
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        max_staging_bytes: int = DEFAULT_MAX_STAGING_BYTES,
        verify_reads: bool | None = None,
        read_cost: ReadCostModel = DEFAULT_READ_COST,
        max_read_amplification: float | None = DEFAULT_MAX_READ_AMPLIFICATION,
        alignment_sources: tuple[str, ...] = ALIGNMENT_SOURCES,
    ):
        """verify_reads: check every bundle read against the store's checksums (flash_io/integrity.py);
        None: on unless $FLASHLLM_VERIFY_READS=0 (how --no-verify-reads reaches the worker processes).
        max_gap_bytes: the largest gap read to save a request (default: read_cost's break-even);
        max_read_amplification: a neuron read's bytes bound, as a multiple of the wanted bundles' (None: none);
        alignment_sources: where the direct-I/O alignment is asked (direct_io.ALIGNMENT_SOURCES)."""
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if io_backend not in IO_BACKENDS:
            raise ValueError(f"io_backend must be one of {IO_BACKENDS}, got {io_backend!r}")
        self.layout = layout
        self.dtype = numpy_dtype_of_store(layout.dtype)
        self.bundle_elements = layout.stored_row_width  # items of self.dtype per bundle (bytes if quantized)
        if self.bundle_elements * self.dtype.itemsize != layout.bundle_bytes:
            raise StoreError(
                f"manifest bundle_bytes {layout.bundle_bytes} != {self.bundle_elements} elements x "
                f"{self.dtype.itemsize} bytes ({layout.dtype}); the manifest is corrupt, re-run `flashllm convert`"
            )
        self.path = os.path.join(store_dir, layout.file)
        if not os.path.isfile(self.path):
            raise StoreError(f"{self.path}: missing FFN bundle file; re-run `flashllm convert`")
        file_bytes = os.path.getsize(self.path)
        for index, region in enumerate(layout.layers):
            if region.length_bytes != region.num_neurons * layout.bundle_bytes:
                raise StoreError(
                    f"layer {index}: region length {region.length_bytes} != {region.num_neurons} neurons x "
                    f"{layout.bundle_bytes} bytes; the manifest is corrupt, re-run `flashllm convert`"
                )
            if region.offset_bytes % self.dtype.itemsize:
                raise StoreError(
                    f"layer {index}: region offset {region.offset_bytes} is not a multiple of the "
                    f"{self.dtype.itemsize}-byte element; the manifest is corrupt, re-run `flashllm convert`"
                )
            if region.offset_bytes + region.length_bytes > file_bytes:
                raise StoreError(
                    f"{self.path}: layer {index} region ends at byte {region.offset_bytes + region.length_bytes} "
                    f"but the file has {file_bytes} bytes; it is truncated, re-run `flashllm convert`"
                )
        if max_read_amplification is not None and max_read_amplification < 1:
            raise ValueError(f"max_read_amplification must be >= 1 (or None), got {max_read_amplification}")
        self.checksums = open_checksums(store_dir, layout, reads_verified(verify_reads))
        self._file = DirectFile(self.path, alignment_sources)
        self.alignment_bytes = self._file.alignment_bytes
        # each request lands in staging at a multiple of this, so its buffer address is aligned as well
        self.staging_alignment_bytes = max(self.alignment_bytes, self._file.memory_alignment_bytes)
        self.num_threads = num_threads
        self.read_cost = read_cost
        self.max_gap_bytes = read_cost.break_even_gap_bytes if max_gap_bytes is None else max_gap_bytes
        self.max_read_amplification = max_read_amplification
        # Requests must stay aligned, so round the cap down to whole blocks.
        self.max_request_bytes = max(self.staging_alignment_bytes,
                                     align_down(max_request_bytes, self.staging_alignment_bytes))
        self.max_staging_bytes = max_staging_bytes
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="flash-read")
        self._aio = self._open_aio(io_backend, queue_depth)
        self._staging = np.empty(0, dtype=np.uint8)  # grown on demand, aligned
        # the generator of a start_neuron_read not finished yet: it owns the AIO queue and the staging buffer
        self._pending_read = None
        self._layer_buffer = np.empty(0, dtype=np.uint8)  # allocated at first read_layer, aligned
        self.stats = ReadStats()

    def _open_aio(self, io_backend: str, queue_depth: int) -> AioQueue | None:
        """An AIO queue for direct files unless threads were asked for; None means the thread pool reads."""
        self.io_backend_note = ""
        if io_backend == "threads":
            return None
        reason = "the file is read buffered, where Linux AIO runs synchronously"
        if self._file.direct:
            try:
                return AioQueue(queue_depth)
            except AioUnavailable as exc:
                reason = str(exc)
        if io_backend == "aio":
            self.close()
            raise RuntimeError(f"{self.path}: asynchronous direct reads (AIO) are unavailable: {reason}; "
                               "use io_backend='threads' (or 'auto', which falls back by itself)")
        self.io_backend_note = f"reading on {self.num_threads} threads: {reason}"
        logger.info("%s: %s", self.path, self.io_backend_note)
        return None

    @property
    def io_backend(self) -> str:
        """'aio' (one thread, many reads in flight) or 'threads' (one read in flight per pool thread)."""
        return "threads" if self._aio is None else "aio"

    @property
    def concurrency(self) -> int:
        """Most reads in flight at once: the AIO queue depth, or the number of threads."""
        return self.num_threads if self._aio is None else self._aio.depth

    def _run_requests(self, offsets: list[int], lengths: list[int], staging_starts: list[int],
                      min_bytes: list[int], staging: np.ndarray, after_read: Callable[[int], None],
                      rounds: list[int] | None = None) -> None:
        """Read request i (offsets[i], lengths[i]) into staging[staging_starts[i]:], then after_read(i), for every i.

        A request that comes back short of min_bytes[i] is read again
        synchronously, which resumes it or raises the truncated-file error.
        rounds: first request index of each round (default: one round); a round
        starts once the one before finished, as its staging may overlap.
        """
        for _ in self._requests(offsets, lengths, staging_starts, min_bytes, staging, after_read, rounds):
            pass

    def _requests(self, offsets: list[int], lengths: list[int], staging_starts: list[int],
                  min_bytes: list[int], staging: np.ndarray, after_read: Callable[[int], None],
                  rounds: list[int] | None = None):
        """_run_requests as a generator that yields once the reads are on their way (AIO: the first round's
        first ones submitted; the thread pool starts only when resumed), and finishes them when exhausted."""
        staging_bytes = memoryview(staging)
        bounds = list(zip(rounds or [0], (rounds or [0])[1:] + [len(offsets)]))  # [begin, end) per round

        def read_sync(index: int) -> None:
            start = staging_starts[index]
            self._file.read_into(offsets[index], staging_bytes[start : start + lengths[index]],
                                 min_bytes=min_bytes[index])

        if self._aio is None:
            def read_request(index: int, _worker: int) -> None:
                read_sync(index)
                after_read(index)

            yield
            for begin, end in bounds:
                _run_parallel(self._pool, self.num_threads, end - begin, lambda i, w: read_request(begin + i, w))
            return

        addresses = staging.ctypes.data + np.asarray(staging_starts[: len(offsets)], dtype=np.uint64)  # (requests,)
        for round_index, (begin, end) in enumerate(bounds):
            def on_complete(index: int, got_bytes: int, begin: int = begin) -> None:
                if got_bytes < min_bytes[begin + index]:
                    read_sync(begin + index)
                after_read(begin + index)

            reads = self._aio.reads(self._file.fileno(), offsets[begin:end], lengths[begin:end],
                                    addresses[begin:end], on_complete)
            if round_index:
                for _ in reads:
                    pass
                continue
            next(reads)  # the first round is on its way
            try:
                yield
            except GeneratorExit:
                reads.close()  # waits for the reads in flight: nothing may land in the buffers later
                raise
            for _ in reads:
                pass

    @property
    def direct(self) -> bool:
        """True when reads bypass the page cache (O_DIRECT); False on the buffered fallback."""
        return self._file.direct

    @property
    def num_layers(self) -> int:
        return len(self.layout.layers)

    def reset_stats(self) -> None:
        self.stats = ReadStats()

    def _check_idle(self) -> None:
        if self._pending_read is not None:
            raise RuntimeError("a neuron read is still pending on this reader: call its finish(out) first")

    def _region(self, layer: int):
        if self._file.closed:
            raise ValueError(f"BundleReader for {self.path} is closed")
        if not 0 <= layer < len(self.layout.layers):
            raise IndexError(f"layer {layer} out of range: the store has {len(self.layout.layers)} layers (0..{len(self.layout.layers) - 1})")
        return self.layout.layers[layer]

    def span_ids(self, layer: int, neuron_ids: np.ndarray,
                 merging: GapMerging = GapMerging.BOUNDED_UNLESS_SLOWER) -> np.ndarray:
        """Sorted ids of every neuron inside the requests a read of neuron_ids plans (start_neuron_read with
        `merging`): what the same device bytes deliver when every bundle they cover is kept, not just the asked
        ones. Reading these with GapMerging.TOUCHING makes those same requests."""
        region = self._region(layer)
        ids = np.unique(self._check_neuron_ids(layer, neuron_ids, region.num_neurons))  # (k,)
        if len(ids) == 0:
            return ids
        _, _, first_index, end_index = self._plan(region.offset_bytes, ids, merging)
        firsts, lasts = ids[first_index], ids[end_index - 1]  # (requests,)
        counts = lasts - firsts + 1  # (requests,)
        starts = np.repeat(firsts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)  # (covered,)
        return starts + np.arange(int(counts.sum()))  # (covered,) ascending

    def _plan(self, region_offset_bytes: int, sorted_ids: np.ndarray, merging: GapMerging
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The requests (offsets, lengths, first_index, end_index) that read sorted unique ids under `merging`."""
        def plan(max_gap_bytes: int, max_read_bytes: int | None):
            return _plan_read_arrays(sorted_ids, region_offset_bytes, self.layout.bundle_bytes, self.alignment_bytes,
                                     max_gap_bytes, self.max_request_bytes, max_read_bytes)

        if merging is GapMerging.TOUCHING:
            return plan(0, None)
        max_read_bytes = max_read_bytes_for(len(sorted_ids), self.layout.bundle_bytes, self.max_read_amplification)
        if merging is GapMerging.BOUNDED or max_read_bytes is None:
            return plan(self.max_gap_bytes, max_read_bytes)
        by_cost = plan(self.max_gap_bytes, None)
        if int(by_cost[1].sum()) <= max_read_bytes:  # within the bound already (a prefill's whole chunks)
            return by_cost
        bounded = plan(self.max_gap_bytes, max_read_bytes)
        modelled_s = [float(np.sum(self.read_cost.read_s(lengths))) for _, lengths, _, _ in (bounded, by_cost)]
        return bounded if modelled_s[0] <= MAX_BOUND_SLOWDOWN * modelled_s[1] else by_cost

    def layer_buffer(self) -> np.ndarray:
        """An aligned buffer that holds any layer's read (for read_layer's `buffer`)."""
        return aligned_buffer(self._largest_span_bytes())

    def read_layer(self, layer: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """The whole layer region as a (num_neurons, bundle_elements) array of the store dtype.

        The array is a view of `buffer` (from layer_buffer()) or of a reused buffer of the reader's own:
        valid until that buffer is read into again, or `close()`. Copy it to keep it.
        """
        self._check_idle()
        region = self._region(layer)
        span_start = align_down(region.offset_bytes, self.alignment_bytes)
        span_end = align_up(region.offset_bytes + region.length_bytes, self.alignment_bytes)
        span_bytes = span_end - span_start
        if buffer is None:
            if self._layer_buffer.nbytes < span_bytes:
                self._layer_buffer = np.empty(0, dtype=np.uint8)  # drop the old mapping first
                self._layer_buffer = aligned_buffer(self._largest_span_bytes())
            buffer = self._layer_buffer
        elif buffer.nbytes < span_bytes:
            raise ValueError(f"read_layer: a {buffer.nbytes}-byte buffer cannot hold layer {layer}'s {span_bytes} "
                             "bytes; use layer_buffer()")
        needed_bytes = region.offset_bytes + region.length_bytes - span_start  # the file may end before the span does
        chunk_starts = list(range(0, span_bytes, self.max_request_bytes))
        chunk_lengths = [min(self.max_request_bytes, span_bytes - start) for start in chunk_starts]
        min_bytes = [max(0, min(length, needed_bytes - start)) for start, length in zip(chunk_starts, chunk_lengths)]
        num_chunks = len(chunk_starts)

        started_s = time.perf_counter()
        self._run_requests([span_start + start for start in chunk_starts], chunk_lengths, chunk_starts, min_bytes,
                           buffer, after_read=lambda index: None)
        self.stats.read_time_s += time.perf_counter() - started_s
        self.stats.requests += num_chunks
        self.stats.count_requests(np.asarray(chunk_lengths))
        self.stats.read_bytes += span_bytes
        self.stats.useful_bytes += region.length_bytes
        first_byte = region.offset_bytes - span_start
        rows = np.ndarray(
            (region.num_neurons, self.bundle_elements), dtype=self.dtype, buffer=buffer, offset=first_byte
        )  # (num_neurons, bundle_elements)
        if self.checksums is not None:
            self.checksums.check_layer(layer, rows)
        return rows

    def _rows_arrived(self, layer: int, neuron_ids: np.ndarray, rows: np.ndarray) -> None:
        """Every row this reader delivers passes here: (k,) store positions and their (k, E) bundles."""
        if self.checksums is not None:
            self.checksums.check(layer, neuron_ids, rows)

    def _largest_span_bytes(self) -> int:
        return largest_span_bytes(self.layout, self.alignment_bytes)

    def _check_neuron_ids(self, layer: int, neuron_ids: np.ndarray, num_neurons: int) -> np.ndarray:
        ids = np.asarray(neuron_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"neuron_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size == 0:
            return ids.astype(np.int64)
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= num_neurons:
            bad = lowest if lowest < 0 else highest
            raise IndexError(f"neuron id {bad} out of range for layer {layer}: it has {num_neurons} neurons (0..{num_neurons - 1})")
        return ids.astype(np.int64)

    def _check_out(self, out: np.ndarray, num_ids: int) -> None:
        if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[1] != self.bundle_elements:
            raise ValueError(
                f"out must be a (>= {num_ids}, {self.bundle_elements}) array, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        if out.dtype != self.dtype:
            raise ValueError(f"out has dtype {out.dtype} but the store is {self.layout.dtype}: pass a {self.dtype} array")
        if out.shape[0] < num_ids:
            raise ValueError(f"out has {out.shape[0]} rows but {num_ids} neuron ids were asked for")
        if not out.flags.writeable:
            raise ValueError("out is read-only")

    def read_neurons(self, layer: int, neuron_ids: np.ndarray, out: np.ndarray,
                     merging: GapMerging = GapMerging.BOUNDED) -> None:
        """Write the bundles of `neuron_ids` (store positions, unique, any order) into out[0:len(ids)], in that order.

        out: (>= len(ids), bundle_elements) array of the store dtype. Sorted ids
        are copied out once; other orders go through a temporary (about 2x the copy time).
        """
        finish = self.start_neuron_read(layer, neuron_ids, merging)
        finish(out)

    def start_neuron_read(self, layer: int, neuron_ids: np.ndarray, merging: GapMerging = GapMerging.BOUNDED
                          ) -> Callable[[np.ndarray], None]:
        """read_neurons in two halves: the reads go to the device now, and the returned finish(out) waits for
        them and writes the bundles into out as read_neurons does. merging: which gaps the requests also read
        (GapMerging; a masked layer's reads take BOUNDED_UNLESS_SLOWER).

        With AIO the device reads while the caller works in between (the thread pool
        reads only in finish). Until finish returns, no other read may start on this reader.
        """
        self._check_idle()
        region = self._region(layer)
        ids = self._check_neuron_ids(layer, neuron_ids, region.num_neurons)  # (k,)
        if len(ids) == 0:
            return lambda out: self._check_out(out, 0)
        order = np.argsort(ids, kind="stable")  # (k,) positions in out, by id
        sorted_ids = ids[order]  # (k,)
        duplicate = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if duplicate.size:
            raise ValueError(f"neuron id {int(sorted_ids[duplicate[0]])} appears more than once in neuron_ids; ids must be unique")
        ids_sorted = bool((order == np.arange(len(ids))).all())  # the cache passes sorted ids: the fast copy path
        bundle_bytes = self.layout.bundle_bytes
        offsets, lengths, first_index, end_index = self._plan(region.offset_bytes, sorted_ids, merging)
        slot_lengths = -(-lengths // self.staging_alignment_bytes) * self.staging_alignment_bytes  # (requests,)
        packed = np.concatenate(([0], np.cumsum(slot_lengths)))  # (requests+1,) requests back to back
        # rounds of at most max_staging_bytes (plus the last request), each reusing the staging from its start
        round_of = packed[:-1] // self.max_staging_bytes  # (requests,) non-decreasing
        round_starts = np.flatnonzero(np.diff(round_of, prepend=-1))  # (rounds,) first request of each
        staging_offsets = packed[:-1] - packed[round_starts][np.repeat(np.arange(len(round_starts)),
                                                                      np.diff(round_starts, append=len(lengths)))]
        total_bytes = int(lengths.sum())
        staging_needed = int((staging_offsets + lengths).max())  # the largest round's
        if self._staging.nbytes < staging_needed:
            self._staging = np.empty(0, dtype=np.uint8)
            # a quarter more (fewer regrowths), but never past what any read of neurons can ask for
            rounded = min(align_up(staging_needed + staging_needed // 4, self.alignment_bytes),
                          neuron_read_staging_bytes(self.layout, self.alignment_bytes, self.max_staging_bytes,
                                                    self.max_request_bytes))
            self._staging = aligned_buffer(max(staging_needed, rounded))
        staging = self._staging
        # Everything per request is worked out here, vectorized, as plain Python lists: a request takes
        # tens of microseconds of device time, and per-request numpy scalars and array construction in
        # the reader threads (which hold the GIL for it) cost as much again.
        first_ids = sorted_ids[first_index]  # (requests,)
        last_ids = sorted_ids[end_index - 1]  # (requests,)
        useful_ends = region.offset_bytes + (last_ids + 1) * bundle_bytes  # (requests,) file bytes the request must get
        min_bytes = (np.minimum(useful_ends, self._file.size_bytes) - offsets).tolist()
        # Rows first_id..last_id sit back to back in a request's staging bytes; region offsets and bundle
        # sizes are whole elements, so each request's first row starts on an element boundary.
        first_rows = ((staging_offsets + region.offset_bytes + first_ids * bundle_bytes - offsets)
                      // self.dtype.itemsize).tolist()
        spans = last_ids - first_ids + 1  # (requests,) rows each request covers
        span_rows = spans.tolist()
        local_rows = sorted_ids - np.repeat(first_ids, end_index - first_index)  # (k,) row of each id in its request
        request_offsets, request_lengths = offsets.tolist(), lengths.tolist()
        staging_starts, firsts, ends = staging_offsets.tolist(), first_index.tolist(), end_index.tolist()
        staging_elements = staging.view(self.dtype)  # (staging bytes / itemsize,)
        row_elements, itemsize = self.bundle_elements, self.dtype.itemsize
        all_rows_wanted = (spans == end_index - first_index).tolist()
        staging_bytes = memoryview(staging)
        out = whole = out_bytes = None  # set by finish: the reads' completions copy into out

        def copy_rows(index: int) -> None:
            first_row, span, first, end = first_rows[index], span_rows[index], firsts[index], ends[index]
            if whole and whole[index]:
                start = first_row * itemsize
                out_bytes[first * bundle_bytes : end * bundle_bytes] = \
                    staging_bytes[start : start + span * bundle_bytes]
                return
            rows = staging_elements[first_row : first_row + span * row_elements].reshape(span, row_elements)
            if ids_sorted:
                # One copy straight into out; mode="clip" because mode="raise" buffers through a temporary.
                rows.take(local_rows[first:end], axis=0, out=out[first:end], mode="clip")
            else:
                out[order[first:end]] = rows[local_rows[first:end]]  # caller's order: numpy goes through a temporary

        started_s = time.perf_counter()
        requests = self._requests(request_offsets, request_lengths, staging_starts, min_bytes, staging,
                                  after_read=copy_rows, rounds=round_starts.tolist())
        next(requests)  # raises before any read was submitted, or yields once they are on their way
        self._pending_read = requests
        self.stats.read_time_s += time.perf_counter() - started_s

        def finish(destination: np.ndarray) -> None:
            nonlocal out, whole, out_bytes
            if self._pending_read is not requests:
                raise RuntimeError("this neuron read was already finished")
            finish_started_s = time.perf_counter()
            try:
                self._check_out(destination, len(ids))
                out = destination
                # A request whose every row is wanted (one bundle, or a run of neighbours) lands in out as one
                # byte copy: a memoryview slice assignment costs a fraction of numpy's take + reshape per request
                whole = (ids_sorted and out.flags.c_contiguous and out.dtype == self.dtype) and all_rows_wanted
                out_bytes = memoryview(out).cast("B") if whole else None
                for _ in requests:
                    pass
                self._rows_arrived(layer, ids, destination[: len(ids)])
            finally:
                requests.close()  # after an error: waits for the reads in flight, so none lands later
                self._pending_read = None
                self.stats.read_time_s += time.perf_counter() - finish_started_s
            self.stats.requests += len(offsets)
            self.stats.count_requests(lengths)
            self.stats.read_bytes += total_bytes
            self.stats.useful_bytes += len(ids) * bundle_bytes

        return finish

    def close(self) -> None:
        """Stop the thread pool and AIO queue and close the file; safe to call twice.

        Views from read_layer stay valid memory."""
        if getattr(self, "_aio", None) is not None:
            self._aio.close()
            self._aio = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._file.close()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def measure_direct_read_bandwidth(path: str, request_bytes: int, concurrency: int, total_bytes: int, seed: int = 0,
                                  io_backend: str = "threads") -> float:
    """Raw direct-read throughput of `path` in bytes/s: random aligned requests of
    `request_bytes`, `concurrency` in flight (AIO queue depth or threads, as
    `io_backend` says: the reader's mechanisms), ~total_bytes in all.

    The baseline a BundleReader's throughput is judged against.
    """
    if io_backend not in ("aio", "threads"):
        raise ValueError(f"io_backend must be 'aio' or 'threads', got {io_backend!r}")
    with DirectFile(path) as file:
        alignment = file.alignment_bytes
        if request_bytes % alignment or request_bytes <= 0:
            raise ValueError(f"request_bytes must be a positive multiple of {alignment}, got {request_bytes}")
        if file.size_bytes < request_bytes:
            raise ValueError(f"{path} has {file.size_bytes} bytes, less than one {request_bytes}-byte request")
        num_requests = max(1, total_bytes // request_bytes)
        slots = (file.size_bytes - request_bytes) // alignment + 1
        rng = np.random.default_rng(seed)
        offsets = rng.integers(0, slots, size=num_requests) * alignment  # (num_requests,)
        buffer = aligned_buffer(request_bytes * concurrency)  # one slot per read in flight

        if io_backend == "aio":
            # read i lands in slot i % concurrency; two reads in flight may share a slot, harmless for throwaway bytes
            addresses = buffer.ctypes.data + request_bytes * (np.arange(num_requests, dtype=np.uint64) % concurrency)
            with AioQueue(concurrency) as queue:
                started_s = time.perf_counter()
                queue.read_all(file.fileno(), offsets, np.full(num_requests, request_bytes), addresses,
                               on_complete=lambda index, got_bytes: None)
                elapsed_s = time.perf_counter() - started_s
            return num_requests * request_bytes / elapsed_s

        def read_one(index: int, worker: int) -> None:
            slot = buffer[worker * request_bytes : (worker + 1) * request_bytes]
            file.read_into(int(offsets[index]), slot)

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flash-bench") as pool:
            started_s = time.perf_counter()
            _run_parallel(pool, concurrency, num_requests, read_one)
            elapsed_s = time.perf_counter() - started_s
        return num_requests * request_bytes / elapsed_s


def measure_read_cost(path: str, queue_depth: int, request_sizes_bytes: tuple[int, ...] = CURVE_REQUEST_SIZES_BYTES,
                      repeats: int = 3, requests_per_size: int = 2000, max_bytes_per_size: int = 64 << 20,
                      io_backend: str = "aio") -> tuple[ReadCostModel, list[dict]]:
    """The device's read cost curve: random direct reads of each size (those below the file's alignment
    skipped) with `queue_depth` in flight, the median of `repeats` runs each; returns the fitted model and
    one row per size {request_bytes, seconds_per_request, bytes_per_s, runs_s}."""
    with DirectFile(path) as file:
        alignment_bytes = file.alignment_bytes
    rows = []
    for size in request_sizes_bytes:
        if size % alignment_bytes or size > os.path.getsize(path):
            continue
        total_bytes = min(max(size * requests_per_size, 8 << 20), max_bytes_per_size)
        runs_s = [size / measure_direct_read_bandwidth(path, size, queue_depth, total_bytes, seed=repeat,
                                                       io_backend=io_backend)
                  for repeat in range(repeats)]
        seconds = float(np.median(runs_s))
        rows.append({"request_bytes": size, "seconds_per_request": seconds, "bytes_per_s": size / seconds,
                     "runs_s": runs_s})
    model = fit_read_cost([row["request_bytes"] for row in rows], [row["seconds_per_request"] for row in rows],
                          source=f"measured on {path}: {io_backend}, {queue_depth} reads in flight, "
                                 f"{len(rows)} sizes x {repeats} runs")
    return model, rows
