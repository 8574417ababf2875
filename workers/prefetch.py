"""Flash prefetching: the only reader of FFN bytes, and the only writer of the neuron caches.

`Prefetcher` is the core: per layer a `NeuronCache` (the paper's preallocated
matrix, possibly over shared memory) fed by one `BundleReader`. For each token
and layer it is told the predicted neuron ids; it advances that layer's
sliding window, evicts what no recent token used, and reads only the missing
bundles (the increment) with aligned direct reads. Hot neurons are pinned once.

Read-ahead without touching the cache: `stage(layer, ids)` reads the bundles
that `prepare(layer, ids, new_token=True)` is going to need into a private
staging matrix (or rows it is given: a chunk slot that the worker runtime
hands to compute as it is); the later `prepare` copies them from there
instead of from flash. The worker runtime stages layer l+1 from the lookahead prediction while
compute still runs layer l, and commits (`prepare`) only once the same-layer
check has decided the layer's path, so the cache goes through exactly the
states SparseFlashFfn gives it.

`PrefetchWorker` is the prefetch process's core (messages in, cache writes and
LayerReady out), `run_prefetch()` its process entry.
"""
from __future__ import annotations

import collections
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from flashllm.protocol.messages import (
    PATH_CACHED, PATH_MASKED, ROLE_COMPUTE, ROLE_PREFETCH, ChunkDone, Dispatcher, LayerReady, LayerStaged, Lookahead,
    Prediction, StepBegin, StepFailed,
)
from flashllm.protocol.shm import SharedSegment, cache_down_tables, cache_kernel_arrays, cache_layer_arrays
from flashllm.protocol.store_format import Manifest, StoreError, calibrate_hint, read_manifest
from flashllm.workers.flash_io.bundle_reader import (BundleReader, GapMerging, chunk_ids, largest_chunk_rows,
                                                     numpy_dtype_of_store)
from flashllm.workers.flash_io.kernel_layout import load_compiled_loops
from flashllm.workers.flash_io.kernel_rows import KernelRows, kernel_rows_for
from flashllm.workers.flash_io.neuron_cache import NeuronCache, GrowingRows
from flashllm.workers.flash_io.neuron_ids import find_sorted, staged_positions, union_ids
from flashllm.workers.process_entry import WorkerConfig, run_worker
from flashllm.workers.store_reader import (
    bundle_rows_as_float, each_down_group_scales, layer_table, load_down_group_scales,
)

# how a masked layer's reads merge gaps: its set may be dense (a SwiGLU token's, a batch's union), read fastest
# nearly whole, or sparse (a ReLU model's), kept within the byte bound, which costs such a set little device time
MASKED_GAP_MERGING = GapMerging.BOUNDED_UNLESS_SLOWER


@dataclass
class LayerUpdate:
    """What one prepare step did to a layer's cache (a 'layer ready' message carries this)."""

    layer: int
    version: int
    num_rows: int
    predicted: int
    hits: int
    read_neurons: int
    evicted: int
    read_bytes: int
    io_s: float  # from the first read's start (start_stage's, if it took those over) to the last one's end
    blocked_s: float  # the time prepare itself took: what its caller waited


@dataclass
class FlashWork:
    """Flash reads done outside prepare(): read-ahead (stage) or whole layers."""

    neurons: int
    read_bytes: int
    io_s: float


def neuron_cache_dtype(store_dtype_name: str, device: str) -> np.dtype:
    """The dtype of the neuron caches' rows: the store's, everywhere. A quantized store's bundles stay its
    bytes (uint8): on the CPU they go into the kernels' layouts as they arrive (flash_io/kernel_rows.py), on a
    GPU they are dequantized into its mirror. A float16/bfloat16 store's rows stay half precision (bfloat16 as its uint16 bits): the CPU
    widens them a chunk at a time as it multiplies them (models.ffn.HalfRows), the GPU in its mirror."""
    return numpy_dtype_of_store(store_dtype_name)


class Prefetcher:
    def __init__(self, store_dir: str, manifest: Manifest, capacity_rows: list[int], window_tokens: int,
                 hot_ids: list[np.ndarray] | None = None, cache_rows: list[np.ndarray] | None = None,
                 cache_dtype=None, num_threads: int = 4, kernel_rows: list[KernelRows] | None = None):
        """cache_dtype: dtype of the cache rows when it differs from the store's (CPU compute in float32
        converts once on insert instead of on every use); cache_rows: preallocated matrices (shared memory);
        kernel_rows: a quantized store's caches for CPU compute, held in the kernels' layouts instead of rows
        (flash_io/kernel_rows.kernel_rows_for builds them)."""
        layout = manifest.ffn
        self.reader = BundleReader(store_dir, layout, num_threads=num_threads)
        store_dtype = numpy_dtype_of_store(layout.dtype)
        dtype = np.dtype(cache_dtype) if cache_dtype is not None else store_dtype
        self._convert = dtype != store_dtype
        # a quantized store's down scale tables: decoding bundles into a float cache needs them
        self.down_scales = load_down_group_scales(store_dir, manifest) if self._convert else None
        self._scratch_rows = GrowingRows(layout.stored_row_width, store_dtype)  # bundles on their way elsewhere
        self._arrival_rows = GrowingRows(layout.stored_row_width, store_dtype)  # kernel rows' inserts, as read
        # read-ahead of one layer: sorted ids and their rows (cache dtype), in _staged_rows or in the rows stage()
        # was given (_staged_in: a chunk slot the worker runtime hands to compute as it is)
        self._staged_layer = -1
        self._staged_ids = np.zeros(0, np.int64)
        self._staged_rows = np.empty((0, layout.stored_row_width), dtype=dtype)
        self._staged_in: np.ndarray | None = None
        # read-ahead still on the device (start_stage): the next prepare of its layer finishes it
        self._in_flight: _EarlyRead | None = None
        if kernel_rows is not None:
            load_compiled_loops()
        self.caches = [
            NeuronCache(region.num_neurons, layout.stored_row_width, capacity_rows[layer], dtype, window_tokens,
                        rows=None if cache_rows is None else cache_rows[layer],
                        kernel_rows=None if kernel_rows is None else kernel_rows[layer],
                        arrival_rows=self._arrival_rows)
            for layer, region in enumerate(layout.layers)
        ]
        if hot_ids is not None:
            for layer, ids in enumerate(hot_ids):
                if len(ids) and capacity_rows[layer]:  # an uncached layer (capacity 0) reads them with its sets
                    self.caches[layer].pin(np.sort(ids), self._filler(layer))

    def _filler(self, layer: int):
        """rows_filler(ids, out) for the cache: staged rows where read ahead, the rest from flash."""
        read = self._read_filler(layer)
        if layer != self._staged_layer or not len(self._staged_ids):
            return read
        staged_ids, staged_rows = self._staged_ids, self._staged_rows_now()

        def fill_from_staging(ids: np.ndarray, out: np.ndarray) -> None:
            positions, found = find_sorted(staged_ids, ids)  # (k,) each
            if found.all():
                np.take(staged_rows, positions, axis=0, out=out[: len(ids)], mode="clip")
                return
            out[: len(ids)][found] = staged_rows[positions[found]]
            rest = np.empty((int((~found).sum()), out.shape[1]), dtype=out.dtype)
            read(ids[~found], rest)
            out[: len(ids)][~found] = rest

        return fill_from_staging

    def _read_filler(self, layer: int):
        """rows_filler(ids, out) reading bundles from flash, converting dtype when the cache's differs."""
        if not self._convert:
            return functools.partial(self.reader.read_neurons, layer)

        def read_converted(ids: np.ndarray, out: np.ndarray) -> None:
            scratch = self._scratch_rows(len(ids))
            self.reader.read_neurons(layer, ids, scratch)
            out[: len(ids)] = bundle_rows_as_float(self.reader.layout, scratch, layer_table(self.down_scales, layer),
                                                   ids)

        return read_converted

    def prepare(self, layer: int, predicted_ids: np.ndarray, new_token: bool = True,
                resident_ids: np.ndarray | None = None) -> LayerUpdate:
        """Make every predicted neuron of `layer` resident.

        new_token: this is the token's first set for the layer (advance the window);
        False for the same-layer check's set of the current token (policy "read"),
        whose uncached neurons take rows from older tokens' and then from the
        lookahead's unconfirmed picks, never from the pinned or from the set itself
        (NeuronCache.plan_late). resident_ids (with new_token False): neurons compute
        also needs resident, which are not the token's own (its window's).
        """
        cache = self.caches[layer]
        start = time.perf_counter()
        before_bytes, before_hits = self.reader.stats.read_bytes, cache.hits
        early = self._start_reads(layer, predicted_ids if new_token else cache.late_misses(predicted_ids, resident_ids))
        try:
            evicted = 0
            if new_token:
                cache.advance_window(predicted_ids)
                evicted = len(cache.evict_outside_window())
                missing = cache.plan_token(predicted_ids)
            else:
                missing = cache.plan_late(predicted_ids, resident_ids)
            if len(missing):
                cache.insert(missing, early.fill if early is not None else self._filler(layer))
        finally:
            if early is not None:
                early.finish_unused()
        if layer == self._staged_layer:
            self.discard_staged()  # the cache moved on: staged rows are only valid for this commit
        # reads that start_stage put on their way count from then: the device's time, overlapped or not
        io_started = min(start, early.started_s) if early is not None else start
        done = time.perf_counter()
        return LayerUpdate(layer=layer, version=cache.version, num_rows=cache.num_rows,
                           predicted=len(predicted_ids), hits=cache.hits - before_hits,
                           read_neurons=len(missing), evicted=evicted,
                           read_bytes=self.reader.stats.read_bytes - before_bytes,
                           io_s=done - io_started, blocked_s=done - start)

    def _start_reads(self, layer: int, predicted_ids: np.ndarray) -> "_EarlyRead | None":
        """Put the reads of the predicted neurons not cached now to the device, before prepare makes room.

        The window advance and evictions that come first never drop a predicted
        neuron, so these are the ones insert will want; the device reads while the
        bookkeeping is worked out. None when nothing is missing or they were read ahead (stage). Reads
        that start_stage put on their way are taken over when they are these."""
        in_flight, self._in_flight = self._in_flight, None
        if layer == self._staged_layer and len(self._staged_ids):
            if in_flight is not None:
                in_flight.finish_unused()
            return None
        missing = self._uncached(layer, predicted_ids)  # (m,) sorted
        if in_flight is not None:
            if in_flight.layer == layer and np.array_equal(in_flight.ids, missing):
                return in_flight
            in_flight.finish_unused()
        return _EarlyRead(self, layer, missing) if len(missing) else None

    def start_stage(self, layer: int, predicted_ids: np.ndarray, masked: bool = False) -> None:
        """The in-process engine's pipelining: layer l+1's lookahead reads go to the device before it computes
        layer l (with AIO the device reads while the caller computes; the thread pool reads only when they are
        taken). Those of what prepare(layer, predicted_ids, new_token=True) will insert, which that prepare
        finishes; masked (the layer will take the masked path): stage()'s, which its masked read takes. Any
        other read on this prefetcher first waits for them."""
        self.drop_in_flight()
        if masked:
            staged = self._masked_stage_ids(layer, predicted_ids)
            if staged is not None:
                self._in_flight = _EarlyRead(self, layer, *staged)
            return
        missing = self._uncached(layer, predicted_ids)  # (m,) sorted
        if len(missing):
            self._in_flight = _EarlyRead(self, layer, missing)

    def drop_in_flight(self) -> None:
        """Wait for start_stage's reads and drop them (the layer took another path)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.finish_unused()

    def _uncached(self, layer: int, predicted_ids: np.ndarray) -> np.ndarray:
        """Sorted unique predicted ids not in the layer's cache now: what prepare will insert, since the
        window advance and evictions it does first never drop a predicted neuron."""
        cache = self.caches[layer]
        ids = union_ids(cache.num_neurons, np.asarray(predicted_ids, dtype=np.int64))  # (k,) sorted
        return ids[cache.slot_of[ids] < 0]  # (m,) sorted

    def stage(self, layer: int, predicted_ids: np.ndarray, into: np.ndarray | None = None) -> FlashWork:
        """Read ahead for a layer that will take the masked path (its lookahead set did not fit its cache, or
        it has none), leaving the cache as it is: the predicted neurons and the spans around them
        (_masked_stage_ids), gaps merged by the read cost alone as the masked read's are; that read takes them
        (read_layer_chunks, read_chunk) and reads only the rest. Replaces any earlier staging. into: rows
        (store dtype) to read them into instead of the prefetcher's own staging, where they fit (staged_in()
        says); staged_ids() then says which neurons they hold, in order."""
        self.drop_in_flight()
        self.discard_staged()
        staged = self._masked_stage_ids(layer, predicted_ids)
        if staged is None:
            return FlashWork(neurons=0, read_bytes=0, io_s=0.0)
        ids, merging = staged
        if into is not None and len(ids) > len(into):  # (the chunks of a worker runtime made with smaller ones)
            into = None
        start = time.perf_counter()
        before_bytes = self.reader.stats.read_bytes
        self.reader.read_neurons(layer, ids, self._staging_for(len(ids)) if into is None else into[: len(ids)],
                                 merging)
        self._staged_layer, self._staged_ids, self._staged_in = layer, ids, into
        return FlashWork(neurons=len(ids), read_bytes=self.reader.stats.read_bytes - before_bytes,
                         io_s=time.perf_counter() - start)

    def staged_ids(self, layer: int) -> np.ndarray:
        """(k,) sorted: the neurons of `layer` read ahead by stage() (none when another layer's are)."""
        return self._staged_ids if layer == self._staged_layer else np.zeros(0, np.int64)

    def staged_in(self, rows: np.ndarray) -> bool:
        """The rows stage() read now are in `rows` (what it was given as `into`)."""
        return self._staged_in is rows

    def keep_staged_apart(self) -> None:
        """Copy rows that stage() read into a caller's buffer into the prefetcher's own staging, so the caller
        may reuse that buffer while a masked read still takes them."""
        if self._staged_in is not None:
            count = len(self._staged_ids)
            self._staging_for(count)[:] = self._staged_in[:count]
            self._staged_in = None

    def _staged_rows_now(self) -> np.ndarray:
        return self._staged_rows if self._staged_in is None else self._staged_in

    def _masked_stage_ids(self, layer: int, predicted_ids: np.ndarray) -> tuple[np.ndarray, GapMerging] | None:
        """What stage() reads for a masked layer, and how: the predicted ids, cached or not (the masked read does
        not look in the cache), as the masked read merges gaps; for an uncached layer, every neuron such a read of
        them covers (BundleReader.span_ids), in the same requests, while those fit a masked chunk's rows (the
        plan's read-ahead reserve). None when nothing is to be staged (no ids, or rows converted on arrival,
        which a masked chunk cannot take). The spans cost no more device time and hold most of what the
        same-layer check adds to a lookahead set that is dense in the layer (docs/benchmarks.md, stop 31, has
        the three ways measured)."""
        if self._convert or not len(predicted_ids):
            return None
        ids = union_ids(self.caches[layer].num_neurons, np.asarray(predicted_ids, dtype=np.int64))  # (k,) sorted
        if self.caches[layer].capacity_rows:  # a cached layer's batch that did not fit: its set alone
            return ids, MASKED_GAP_MERGING
        covered = self.reader.span_ids(layer, ids, MASKED_GAP_MERGING)  # (c,) sorted, ⊇ ids
        if len(covered) <= largest_chunk_rows(self.reader.layout):
            return covered, GapMerging.TOUCHING
        return ids, MASKED_GAP_MERGING

    def discard_staged(self) -> None:
        self._staged_layer, self._staged_ids, self._staged_in = -1, np.zeros(0, np.int64), None

    def read_layer_chunks(self, layer: int, out_rows: Callable[[int], np.ndarray],
                          read_ids: np.ndarray | None = None,
                          on_reads_done: Callable[[], None] | None = None) -> Iterator[tuple[np.ndarray, float]]:
        """The layer's masked-path chunks (chunk_ids(): the whole layer, or only read_ids): yields (ids,
        waited_s) once out_rows(len(ids)) holds those bundles (store dtype), waited_s being how long it waited
        for them. on_reads_done(): called once the last chunk's reads are done, before it is yielded (the
        in-process engine starts the next layer's read-ahead there, to overlap this layer's last compute).

        The next chunk's reads are already on the device while the caller works on
        this one (AIO), and the reader stages one chunk at a time, not the layer. A chunk's gaps are merged as
        MASKED_GAP_MERGING says: a decode step's masked set may be dense (a SwiGLU token's set, or a batch's
        union), read fastest in a few large requests, or sparse, read within the byte bound. A decode step's read
        takes the rows the layer's lookahead read ahead (start_stage, stage) and reads only the rest.
        A caller that stops early (closes the generator) waits for the reads in flight."""
        layout = self.reader.layout
        chunks = chunk_ids(layout.layers[layer].num_neurons, layout.bundle_bytes, read_ids)
        staged = self._take_staged(layer) if read_ids is not None else None
        if staged is not None:
            for index, ids in enumerate(chunks):
                waited_since = time.perf_counter()
                self._fill_from(staged, layer, ids, out_rows(len(ids)))
                waited_s = time.perf_counter() - waited_since
                if index + 1 == len(chunks) and on_reads_done is not None:
                    on_reads_done()
                yield ids, waited_s
            return
        self.drop_in_flight()
        pending = None
        try:
            for index, ids in enumerate(chunks):
                out = out_rows(len(ids))
                waited_since = time.perf_counter()
                if pending is None:
                    pending = self.reader.start_neuron_read(layer, ids, MASKED_GAP_MERGING)
                finish, pending = pending, None
                finish(out)  # releases the reader even when it raises
                waited_s = time.perf_counter() - waited_since
                if index + 1 < len(chunks):
                    pending = self.reader.start_neuron_read(layer, chunks[index + 1], MASKED_GAP_MERGING)
                elif on_reads_done is not None:
                    on_reads_done()
                yield ids, waited_s
        finally:
            if pending is not None:
                pending(self._scratch_rows(len(chunks[index + 1])))

    def read_chunk(self, layer: int, ids: np.ndarray, out: np.ndarray, reads_subset: bool = False) -> FlashWork:
        """One masked-path chunk (chunk_ids()) into out[:len(ids)], store dtype (e.g. a slot of shared memory),
        straight from the reader's staging; its gaps merged by the read cost alone, as read_layer_chunks'.
        reads_subset (a decode step's read of its sets): the rows the layer's lookahead staged are taken, the
        rest read."""
        started = time.perf_counter()
        before_bytes = self.reader.stats.read_bytes
        staged = self._take_staged(layer) if reads_subset else None
        if staged is not None:
            self._fill_from(staged, layer, ids, out)
        else:
            self.drop_in_flight()
            self.reader.read_neurons(layer, ids, out[: len(ids)], MASKED_GAP_MERGING)
        return FlashWork(neurons=len(ids), read_bytes=self.reader.stats.read_bytes - before_bytes,
                         io_s=time.perf_counter() - started)

    def _take_staged(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(sorted ids, their rows as read) the lookahead of `layer` put ahead, finishing reads still in flight
        (start_stage) into the staging; None when nothing of the layer's is there, or the rows were converted
        on arrival (a cache in another dtype than the store's: masked chunks take them as read)."""
        in_flight = self._in_flight
        if in_flight is not None and in_flight.layer == layer and not self._convert:
            self._in_flight = None
            rows = self._staging_for(len(in_flight.ids))
            in_flight.fill(in_flight.ids, rows)
            self._staged_layer, self._staged_ids, self._staged_in = layer, in_flight.ids, None
        if layer != self._staged_layer or not len(self._staged_ids) or self._convert:
            return None
        return self._staged_ids, self._staged_rows_now()

    def _fill_from(self, staged: tuple[np.ndarray, np.ndarray], layer: int, ids: np.ndarray, out: np.ndarray) -> None:
        """out[:len(ids)] = the rows of sorted `ids`: staged where they are, the rest read now."""
        staged_ids, staged_rows = staged
        positions, found = find_sorted(staged_ids, ids)  # (k,) each
        if found.all():  # positions are in range: "clip" writes out directly ("raise" copies through a temporary)
            np.take(staged_rows, positions, axis=0, out=out[: len(ids)], mode="clip")
            return
        self.drop_in_flight()
        missing = ids[~found]  # (m,)
        rest = self._scratch_rows(len(missing))
        self.reader.read_neurons(layer, missing, rest, MASKED_GAP_MERGING)
        out[: len(ids)][found] = staged_rows[positions[found]]
        out[: len(ids)][~found] = rest

    def _staging_for(self, count: int) -> np.ndarray:
        """The first `count` rows of the read-ahead buffer, grown to hold them."""
        if self._staged_rows.shape[0] < count:
            self._staged_rows = np.empty((count, self._staged_rows.shape[1]), dtype=self._staged_rows.dtype)
        return self._staged_rows[:count]

    def close(self) -> None:
        try:
            self.drop_in_flight()
        finally:
            self.reader.close()



class _EarlyRead:
    """Reads on their way (Prefetcher._start_reads, start_stage): `fill` is the rows_filler that finishes them,
    into the cache or (a masked layer's read-ahead) into the staging."""

    def __init__(self, prefetcher: Prefetcher, layer: int, ids: np.ndarray,
                 merging: GapMerging = GapMerging.BOUNDED):
        self.prefetcher, self.layer, self.ids = prefetcher, layer, ids
        self.started_s = time.perf_counter()
        self._finish = prefetcher.reader.start_neuron_read(layer, ids, merging)

    def fill(self, ids: np.ndarray, out: np.ndarray) -> None:
        if self._finish is None or not np.array_equal(ids, self.ids):
            self.finish_unused()  # not what was started (cannot happen while the invariant holds): read afresh
            self.prefetcher._read_filler(self.layer)(ids, out)
            return
        finish, self._finish = self._finish, None
        prefetcher = self.prefetcher
        if not prefetcher._convert:
            finish(out)
            return
        scratch = prefetcher._scratch_rows(len(ids))
        finish(scratch)
        out[: len(ids)] = bundle_rows_as_float(prefetcher.reader.layout, scratch,
                                               layer_table(prefetcher.down_scales, self.layer), ids)

    def finish_unused(self) -> None:
        """Complete reads nobody took (an error on the way): the reader takes its next read only after."""
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish(self.prefetcher._scratch_rows(len(self.ids)))


def load_hot_ids(store_dir: str, manifest: Manifest) -> list[np.ndarray]:
    """Per layer, the hot neurons `calibrate` chose (int64), read without torch; nothing else is loaded."""
    from safetensors import safe_open

    if manifest.sparsity is None:
        raise StoreError(calibrate_hint(store_dir))
    path = os.path.join(store_dir, manifest.sparsity.file)
    if not os.path.isfile(path):
        raise StoreError(f"{path}: missing; re-run `flashllm calibrate`")
    with safe_open(path, framework="numpy") as f:
        names = set(f.keys())
        return [f.get_tensor(f"layers.{layer}.hot_ids").astype(np.int64) if f"layers.{layer}.hot_ids" in names
                else np.zeros(0, np.int64) for layer in range(manifest.arch.num_hidden_layers)]


@dataclass
class _LayerWork:
    """A layer's share of the step's flash work, reported in its LayerReady."""

    hits: int = 0
    read_neurons: int = 0
    read_bytes: int = 0
    io_s: float = 0.0

    def add_flash(self, work: FlashWork) -> None:
        self.read_bytes += work.read_bytes
        self.io_s += work.io_s

    def add_update(self, update: LayerUpdate) -> None:
        self.hits += update.hits
        self.read_neurons += update.read_neurons
        self.read_bytes += update.read_bytes
        self.io_s += update.io_s


@dataclass
class _ChunkRead:
    """A chunk of a layer's masked read (chunk_ids()) read into a chunk-staging slot for compute's masked path."""

    layer: int
    chunk: int
    num_chunks: int  # of this layer's masked read
    slot: int
    work: FlashWork
    critical: bool  # read after its layer's Prediction came: compute may have waited for it


class PrefetchWorker:
    """The prefetch process's core: the only reader of FFN bytes and the only writer of the neuron caches.

    StepBegin         masked step (T > 1): start reading the chunk stream into the free slots
    Lookahead(l)      commit: prepare(l, ids, new_token=True) now (compute is outside layer l);
                      else stage layer l's predicted bundles (read ahead; the cache is untouched); a
                      decode step's uncached layer into a free chunk slot, → LayerStaged(l) to compute
                      (ready: LayerReady right away; no Prediction(l) follows)
    Prediction(l)     cached: prepare(l, first, new_token=True) unless committed, then prepare(l, same,
                      new_token=False) when there is one — SparseFlashFfn's order —, publish
                      num_rows/version/slot ids
                      → LayerReady(l) to compute, with this layer's counters;
                      masked: hand over layer l's chunks as they are read (a decode step's masked layer
                      starts reading them now: only its `read_ids`) → one LayerReady(l, chunk) per chunk,
                      in order; nothing when its LayerStaged rows hold every one of read_ids (compute
                      took them)
    ChunkDone(slot)   compute is done with a chunk slot: read the next chunk into it

    It decides no path itself: the predictor's planner (workers/sparse_policy.py) did, in the messages.

    The masked path streams layers through the chunk slots (chunk_ids()), never holding a layer: in
    a masked step (T > 1) every layer's chunks, in order from StepBegin on, each read into whichever slot
    compute gave back, so the next chunks (of this layer or the next) are read while compute multiplies one.
    """

    def __init__(self, prefetcher: Prefetcher, slot_ids: list[np.ndarray], headers: list[np.ndarray],
                 chunk_staging: np.ndarray, channel):
        self.prefetcher = prefetcher
        self.slot_ids, self.headers = slot_ids, headers  # shared memory, per layer
        self.chunk_staging = chunk_staging  # (slots, chunk_rows, E) store dtype
        self.channel = channel
        self.num_layers = len(prefetcher.caches)
        layout = prefetcher.reader.layout
        self.layer_neurons = [region.num_neurons for region in layout.layers]
        self.bundle_bytes = layout.bundle_bytes
        self.step = -1
        self.masked_step = False
        self._work: dict[int, _LayerWork] = {}
        self._ready_early: set[int] = set()  # layers handed over at their Lookahead (skip policy)
        # the masked path's chunk stream: chunks to read (in compute's order), free slots, chunks read but not
        # yet handed over (their layer's Prediction has not come), and the layers whose Prediction(masked) came
        # layer, chunk, of how many, its ids, whether they are a decode step's subset
        self._to_read: collections.deque[tuple[int, int, int, np.ndarray, bool]] = collections.deque()
        self._free_slots: list[int] = list(range(chunk_staging.shape[0]))
        self._read: collections.deque[_ChunkRead] = collections.deque()
        self._masked_layers: set[int] = set()
        self._handed_staged: dict[int, tuple[int, np.ndarray]] = {}  # layer → (slot, ids) sent in LayerStaged
        for layer in range(self.num_layers):
            self.publish(layer)
        self.dispatcher = Dispatcher({
            StepBegin: self._guard(self.on_step_begin), Lookahead: self._guard(self.on_lookahead),
            Prediction: self._guard(self.on_prediction), ChunkDone: self._guard(self.on_chunk_done)},
            owner="the prefetch worker")

    @staticmethod
    def from_config(config: WorkerConfig, channel) -> "PrefetchWorker":
        manifest = read_manifest(config.store_dir)  # the engine checked the store; this process stays torch-free
        cache = SharedSegment.attach(config.instance, config.cache_layout)
        exchange = SharedSegment.attach(config.instance, config.exchange_layout)
        num_layers = manifest.arch.num_hidden_layers
        layers = [cache_layer_arrays(cache, layer) for layer in range(num_layers)]
        kernel_arrays = [cache_kernel_arrays(cache, layer) for layer in range(num_layers)]
        kernel_rows = None
        if kernel_arrays[0] is not None:  # the down tables are this process's to fill; compute reads them
            shared = cache_down_tables(cache)  # (n_ff/32, c, d) each
            for table, into in zip(each_down_group_scales(config.store_dir, manifest), shared):
                into[:] = table.transpose(1, 2, 0)
            kernel_rows = kernel_rows_for(manifest.ffn, config.capacity_rows, kernel_arrays)
        # a trace pins nothing (its predictor has no hot neurons)
        hot_ids = load_hot_ids(config.store_dir, manifest) if config.sparse.pin_hot and config.sparse.trace is None \
            else None
        prefetcher = Prefetcher(config.store_dir, manifest, config.capacity_rows, config.sparse.window_tokens,
                                hot_ids=hot_ids, cache_rows=None if kernel_rows else [rows for rows, _, _ in layers],
                                cache_dtype=np.dtype(config.cache_dtype), num_threads=config.sparse.reader_threads,
                                kernel_rows=kernel_rows)
        worker = PrefetchWorker(prefetcher, [ids for _, ids, _ in layers], [header for _, _, header in layers],
                                exchange.arrays["chunk_staging"], channel)
        worker._segments = (cache, exchange)
        return worker

    def info(self) -> dict:
        return {"direct_reads": self.prefetcher.reader.direct, "io_backend": self.prefetcher.reader.io_backend}

    def _guard(self, handler):
        """A handler's error fails the step (compute is told), not the process."""

        def guarded(msg):
            try:
                handler(msg)
            except Exception as exc:
                self.channel.send(ROLE_COMPUTE, StepFailed(step=msg.step, role=ROLE_PREFETCH,
                                                           error=f"{type(exc).__name__}: {exc}"))
        return guarded

    def publish(self, layer: int) -> None:
        """Copy a layer's bookkeeping to shared memory: slot ids of rows [0, num_rows), then the header."""
        cache = self.prefetcher.caches[layer]
        self.slot_ids[layer][: cache.num_rows] = cache.slot_ids[: cache.num_rows]
        self.headers[layer][:] = (cache.num_rows, cache.version)

    def _layer_work(self, layer: int) -> _LayerWork:
        return self._work.setdefault(layer, _LayerWork())

    def on_step_begin(self, msg: StepBegin) -> None:
        self.step = msg.step
        self.masked_step = msg.steps > 1
        self._work = {}
        self._ready_early = set()
        self.prefetcher.discard_staged()
        # compute sent this step after it left the last one: every chunk slot is free
        self._to_read.clear()
        self._read.clear()
        self._free_slots = list(range(self.chunk_staging.shape[0]))
        self._masked_layers = set()
        self._handed_staged = {}
        if self.masked_step:  # every layer takes the masked path: stream them all, reading ahead into free slots
            for layer in range(self.num_layers):
                self._queue_chunks(layer, None)
            self._read_into_free_slots()

    def on_lookahead(self, msg: Lookahead) -> None:
        if msg.step != self.step:
            return
        if msg.commit:  # the layer surely takes the cached path: its first prepare can happen now
            work = self._layer_work(msg.layer)
            work.add_update(self.prefetcher.prepare(msg.layer, msg.ids, new_token=True))
            if len(msg.resident):
                work.add_update(self.prefetcher.prepare(msg.layer, msg.ids[:0], new_token=False,
                                                        resident_ids=msg.resident))
            if msg.ready:  # and nothing else will change it this step
                self._send_ready(msg.step, msg.layer, critical_io_s=0.0)
                self._ready_early.add(msg.layer)
        else:  # it may still fall back to the whole layer: read ahead, commit on Prediction
            self._stage(msg.layer, msg.ids)

    def _stage(self, layer: int, ids: np.ndarray) -> None:
        """Read layer `layer`'s lookahead set ahead. A decode step's uncached layer surely takes the masked path
        (sparse_policy: _plan_uncached), so its rows go into a free chunk slot and to compute at once
        (LayerStaged): when they hold the whole read its Prediction asks for, compute needs nothing more from
        this process for the layer, and does not wait for a message round trip after its own input is known."""
        if self.masked_step or self.prefetcher.caches[layer].capacity_rows or not self._free_slots:
            self._layer_work(layer).add_flash(self.prefetcher.stage(layer, ids))
            return
        slot = self._free_slots.pop(0)
        into = self.chunk_staging[slot]
        work = self.prefetcher.stage(layer, ids, into=into)
        staged = self.prefetcher.staged_ids(layer)
        if not len(staged) or not self.prefetcher.staged_in(into):  # nothing staged, or more than a chunk's rows
            self._free_slots.insert(0, slot)
            self._layer_work(layer).add_flash(work)
            return
        self._handed_staged[layer] = (slot, staged)
        self.channel.send(ROLE_COMPUTE, LayerStaged(step=self.step, layer=layer, staging=slot, ids=staged,
                                                    read_bytes=work.read_bytes, io_s=work.io_s))

    def on_prediction(self, msg: Prediction) -> None:
        if msg.step != self.step or msg.layer in self._ready_early:
            return  # handed over at its Lookahead: nothing may change the layer now
        received = time.perf_counter()
        layer = msg.layer
        work = self._layer_work(layer)
        if msg.path == PATH_CACHED:
            if not msg.first_committed:
                work.add_update(self.prefetcher.prepare(layer, msg.first, new_token=True))
            if len(msg.same) or len(msg.resident):
                work.add_update(self.prefetcher.prepare(layer, msg.same, new_token=False, resident_ids=msg.resident))
            self._send_ready(msg.step, layer, critical_io_s=time.perf_counter() - received)
            return
        handed = self._handed_staged.pop(layer, None)
        if handed is not None:
            slot, staged = handed
            if staged_positions(staged, msg.read_ids) is not None:
                return  # compute multiplies the slot's rows and gives the slot back (ChunkDone)
            # compute waits for the layer's chunks: they take the staged rows from a copy, and the slot is free
            if np.array_equal(self.prefetcher.staged_ids(layer), staged):
                self.prefetcher.keep_staged_apart()
            self._free_slots.append(slot)
        self._masked_layers.add(layer)
        if not self.masked_step:  # a decode step's masked layer: stream the neurons it needs
            self._queue_chunks(layer, msg.read_ids)
            self._read_into_free_slots()
        self._hand_over()

    def on_chunk_done(self, msg: ChunkDone) -> None:
        if msg.step != self.step:
            return  # a failed step's: StepBegin freed every slot
        self._free_slots.append(msg.staging)
        self._read_into_free_slots()
        self._hand_over()

    def _queue_chunks(self, layer: int, read_ids: np.ndarray | None) -> None:
        """Layer `layer`'s masked read (read_ids: only those neurons; None: the whole layer) joins the stream."""
        chunks = chunk_ids(self.layer_neurons[layer], self.bundle_bytes, read_ids)
        self._to_read.extend((layer, chunk, len(chunks), ids, read_ids is not None) for chunk, ids in enumerate(chunks))

    def _read_into_free_slots(self) -> None:
        while self._free_slots and self._to_read:
            layer, chunk, num_chunks, ids, reads_subset = self._to_read.popleft()
            slot = self._free_slots.pop(0)
            work = self.prefetcher.read_chunk(layer, ids, self.chunk_staging[slot], reads_subset)
            # compute may be waiting for it when its layer was already asked for
            self._read.append(_ChunkRead(layer, chunk, num_chunks, slot, work,
                                         critical=layer in self._masked_layers))

    def _hand_over(self) -> None:
        """LayerReady, in order, for every chunk read whose layer's Prediction(masked) came."""
        while self._read and self._read[0].layer in self._masked_layers:
            read = self._read.popleft()
            work = (self._work.pop(read.layer, None) if read.chunk == 0 else None) or _LayerWork()
            work.add_flash(read.work)
            work.read_neurons += read.work.neurons
            self.channel.send(ROLE_COMPUTE, LayerReady(
                step=self.step, layer=read.layer, path=PATH_MASKED, num_rows=read.work.neurons, staging=read.slot,
                chunk=read.chunk, num_chunks=read.num_chunks, hits=work.hits,
                read_neurons=work.read_neurons, read_bytes=work.read_bytes, io_s=work.io_s,
                critical_io_s=read.work.io_s if read.critical else 0.0))

    def _send_ready(self, step: int, layer: int, critical_io_s: float = 0.0) -> None:
        """Hand the layer's cache to compute, its bookkeeping published first, with the layer's counters."""
        work = self._work.pop(layer, None) or _LayerWork()
        self.publish(layer)
        cache = self.prefetcher.caches[layer]
        self.channel.send(ROLE_COMPUTE, LayerReady(
            step=step, layer=layer, path=PATH_CACHED, version=cache.version, num_rows=cache.num_rows,
            hits=work.hits, read_neurons=work.read_neurons, read_bytes=work.read_bytes, io_s=work.io_s,
            critical_io_s=critical_io_s))

    def close(self) -> None:
        self.prefetcher.close()
        self.slot_ids, self.headers, self.chunk_staging = [], [], None
        for segment in getattr(self, "_segments", ()):
            segment.close()


def run_prefetch(config: WorkerConfig) -> None:
    """Process entry of the prefetch worker."""
    run_worker(ROLE_PREFETCH, config, PrefetchWorker.from_config)
