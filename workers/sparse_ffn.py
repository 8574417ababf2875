"""The sparse FFN from flash, in one process: predictor + prefetcher + compute over the cache.

What each layer does is decided by workers/sparse_policy.py (the worker runtime
carries out the same decisions in three processes, so both give the same
tokens). Per decode step and layer l:

    ahead  = predictor.lookahead[l](h_{l-1})     predicted while layer l-1 ran; its reads start
                                                 then (AIO) and overlap layer l-1's FFN and l's attention
    prefetcher.prepare(l, ahead)                 window advance, evict, finish reading the increment
    same   = predictor.same[l](h_l)              policy "read": the late check on layer l's own input,
    prefetcher.prepare(l, same, new_token=False) and fetch what the lookahead missed, in rows of older
                                                 tokens' neurons, then of the lookahead's unconfirmed ones
    y = FFN over the cached rows of layer l      each sequence over its own computed set (sparse_policy),
                                                 summed alone in neuron-id order

Policy "skip" runs neither late step: the layer is ready once the lookahead's
reads are, so the worker runtime hands it over before compute gets there and
no read waits on the layer's own input (fewer bytes; some quality, see bench).

In a batch the cache holds the union of the sequences' sets. Each sequence
computes its own set (its predictions, its window, the pinned), gathered from
the cache in neuron-id order and multiplied alone (models/ffn.OwnNeuronSums),
so its tokens do not depend on what runs beside it; the gather costs a copy of
each token's down rows. SparseOptions.batch_invariant=False computes every
cached row for every sequence in one product instead (the bench's comparison).

Prompt prefill (many tokens of one sequence) and decode batches whose union of
lookahead predictions does not fit the cache take the dense-read path instead:
the layer is read whole with large sequential reads, a chunk of a few MiB at a
time (the next chunk on the device while this one computes), and each token
keeps only its own predicted neurons (a per-token mask), so the result is what
token-by-token sparse decoding without the window would compute.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from flashllm.protocol.store_format import FfnLayout, Manifest
from flashllm.workers.engine_config import SparseOptions
from flashllm.workers.ffn_providers import FfnStats, masked_chunk_rows, uncached_reads_multiply_bundles
from flashllm.workers.flash_io.bundle_reader import numpy_dtype_of_store
from flashllm.workers.flash_io.kernel_layout import load_compiled_loops
from flashllm.workers.flash_io.kernel_rows import holds_kernel_rows, kernel_rows_for
from flashllm.workers.flash_io.neuron_cache import GrowingRows
from flashllm.workers.interfaces import FfnProvider
from flashllm.workers.models.ffn import (BundleColumns, HalfRows, OwnNeuronSums, ffn_from_rows,
                                         masked_ffn_from_rows, masked_ffn_over_chunks)
from flashllm.workers.models.quant_ffn import QuantNeuronMatrix, QuantRows
from flashllm.workers.store_reader import bundle_rows_as_float, layer_table, load_down_group_scales
from flashllm.workers.predictor import load_predictor
from flashllm.workers.prefetch import Prefetcher, neuron_cache_dtype
from flashllm.workers.sparse_policy import CachedLayer, MaskedLayer, SparseStepPlanner


class CacheView:
    """Turns a layer's neuron cache rows into the compute tensor, applying only rows that changed.

    On the CPU in the cache's own dtype this is a zero-copy view; otherwise a
    mirror (e.g. on the GPU) is kept and only rows whose id changed are copied,
    gathered into one pinned host buffer so the host→device copy is a single
    asynchronous DMA instead of a pageable, synchronous one.

    A quantized store's cache on the CPU holds its neurons in the kernels'
    layouts already (flash_io/kernel_rows.py, written by the prefetcher): the
    view multiplies those arrays in place (QuantNeuronMatrix.over_kernel_rows).
    On a GPU a quantized store's cache rows are its bundles' bytes, dequantized
    on the host as changed rows go to the float mirror.
    """

    def __init__(self, caches, dtype: torch.dtype, device: str, layout: FfnLayout | None = None,
                 down_scales: list[np.ndarray] | None = None, widen_in_place: bool = True):
        """widen_in_place: on the CPU, multiply a half-precision cache as held (HalfRows) rather than keep a
        compute-dtype mirror of it (the mirror is what a GPU keeps)."""
        self.caches, self.dtype, self.device = caches, dtype, device
        self.down_scales = down_scales
        self.layout = layout if layout is not None and layout.is_quantized else None
        on_cpu = torch.device(device).type == "cpu"
        self.rows_copied = 0
        self.matrices = None
        self.half_rows = False
        if self.layout is not None and holds_kernel_rows(self.layout, device):  # the caches hold kernel rows
            self.zero_copy = False
            load_compiled_loops()  # the down sums: now, not in the first decode step
            self.matrices = [QuantNeuronMatrix.over_kernel_rows(self.layout, c.kernel_rows.arrays, down_scales[layer])
                             if c.capacity_rows else None  # an uncached layer's tokens take the masked path
                             for layer, c in enumerate(caches)]
            return
        sample = caches[0].rows
        self.zero_copy = on_cpu and self.layout is None and torch.from_numpy(sample[:0]).dtype == dtype
        # a half-precision cache on the CPU is multiplied as held, widened a chunk at a time (HalfRows)
        self.half_rows = widen_in_place and on_cpu and self.layout is None and not self.zero_copy
        if self.half_rows:
            self.mirrors, self.mirror_ids = [], []
            return
        width = self.layout.bundle_elements if self.layout is not None else sample.shape[1]
        self.mirrors = [] if self.zero_copy else [
            torch.zeros((c.capacity_rows, width), dtype=dtype, device=device) for c in caches]  # (capacity, E) each
        self.mirror_ids = [] if self.zero_copy else [np.full(c.capacity_rows, -1, np.int64) for c in caches]
        on_cuda = torch.device(device).type == "cuda"
        max_rows = max(c.capacity_rows for c in caches)
        # (max capacity, E) in the cache's dtype: changed rows are gathered here, then copied in one go
        self.staging = None if self.zero_copy else torch.empty(
            (max_rows, sample.shape[1]), dtype=torch.from_numpy(sample[:0]).dtype, pin_memory=on_cuda)
        # the staging buffer is reused by the next layer only after its last copy has left it
        self.staging_free = torch.cuda.Event() if on_cuda else None

    @property
    def held_bytes(self) -> int:
        """Bytes of the compute side's copies of the caches (none when it reads the caches in place)."""
        return sum(m.nbytes for m in self.mirrors) if self.matrices is None else 0

    def rows(self, layer: int) -> torch.Tensor | QuantRows:
        cache = self.caches[layer]
        n = cache.num_rows
        if self.zero_copy:
            return torch.from_numpy(cache.rows[:n])  # (n, E)
        if self.half_rows:
            return HalfRows(cache.rows[:n], self.dtype)  # (n, E) as held
        if self.matrices is not None:
            return QuantRows(self.matrices[layer], cache.kernel_rows.used)
        ids = cache.slot_ids[:n]
        changed = np.flatnonzero(self.mirror_ids[layer][:n] != ids)
        if changed.size:
            if self.staging_free is not None:
                self.staging_free.synchronize()
            staging = self.staging[:changed.size]  # (k, E)
            changed_host = torch.from_numpy(changed)
            torch.index_select(torch.from_numpy(cache.rows), 0, changed_host, out=staging)
            if self.layout is not None:  # bytes → float rows on the host, then one copy
                staging = torch.from_numpy(bundle_rows_as_float(
                    self.layout, staging.numpy(), layer_table(self.down_scales, layer), ids[changed]))  # (k, E)
            src = staging.to(device=self.device, non_blocking=True).to(self.dtype)  # (k, E)
            if self.staging_free is not None:
                self.staging_free.record()
            self.mirrors[layer].index_copy_(0, changed_host.to(self.device, non_blocking=True), src)
            self.mirror_ids[layer][:n] = ids
            self.rows_copied += changed.size
        return self.mirrors[layer][:n]

    def row_ids(self, layer: int) -> np.ndarray:
        """(n,) the neuron id of each row rows(layer) gave (-1 where a quantized cache's slot is a hole)."""
        if self.matrices is not None:
            return self.caches[layer].kernel_rows.held_ids()
        cache = self.caches[layer]
        return cache.slot_ids[: cache.num_rows]


def ffn_over_cached_rows(h: torch.Tensor, rows, cols: BundleColumns, computed: torch.Tensor | None,
                         cached_ids: np.ndarray) -> torch.Tensor:
    """h (N, d), rows (n, E) a layer's cached rows whose neuron ids are cached_ids (n,; -1 where a row holds
    no neuron, CacheView.row_ids) → (N, d). computed (N, n_ff) bool: the neurons each row of h computes (the
    rest are exact zeros in its sum); None: every row computes every cached neuron. Both runtimes compute the
    cached path here. With computed, each row's sum is OwnNeuronSums' (the same bits whatever else the cache
    holds), except on a GPU, where a masked product is the best there is (its products are not
    batch-invariant either)."""
    if computed is None:
        return ffn_from_rows(h, rows, cols)
    ids = torch.from_numpy(cached_ids.astype(np.int64))  # (n,)
    row_mask = computed[:, ids.clamp(min=0)] & (ids >= 0)  # (N, n) bool
    if h.device.type != "cpu":
        return masked_ffn_from_rows(h, rows, cols, row_mask.to(h.device))
    sums = OwnNeuronSums(h, cols)
    sums.add(rows, ids, row_mask)
    return sums.result()


class SparseFlashFfn(FfnProvider):
    mode = "sparse"

    def __init__(self, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str,
                 options: SparseOptions = SparseOptions()):
        arch = manifest.arch
        self.num_layers = arch.num_hidden_layers
        self.num_neurons = arch.intermediate_size
        self.cols = BundleColumns.from_layout(manifest.ffn.part_slices())
        self.dtype, self.device = dtype, device
        self.missing_policy = options.missing_policy
        self.predictor = load_predictor(store_dir, manifest, options)
        capacity_rows = list(options.capacity_rows or [self.num_neurons] * self.num_layers)
        self.layout = manifest.ffn
        self.down_scales = load_down_group_scales(store_dir, manifest)
        kernel_rows = kernel_rows_for(self.layout, capacity_rows) \
            if holds_kernel_rows(self.layout, device) else None
        self.prefetcher = Prefetcher(store_dir, manifest, capacity_rows, options.window_tokens,
                                     hot_ids=self.predictor.hot_ids if options.pin_hot else None,
                                     cache_dtype=neuron_cache_dtype(manifest.ffn.dtype, device),
                                     num_threads=options.reader_threads, kernel_rows=kernel_rows)
        self.view = CacheView(self.prefetcher.caches, dtype, device, manifest.ffn, self.down_scales)
        caches = self.prefetcher.caches
        self.planner = SparseStepPlanner(self.predictor, [c.capacity_rows for c in caches], [c.pinned for c in caches],
                                         options.missing_policy, options.window_tokens, options.batch_invariant,
                                         options.compute_set)
        self._carry_out = {CachedLayer: self._forward_cached, MaskedLayer: self._forward_masked}
        # the masked path's chunk of bundles as read (store dtype; grown to one chunk on first use)
        self._chunk_rows = GrowingRows(manifest.ffn.stored_row_width, numpy_dtype_of_store(manifest.ffn.dtype))
        self._held_chunk = None  # the last chunk in the compute form (a quantized store's is rewritten in place)
        self.stats = FfnStats()
        self.recorded_sets: list[tuple[int, np.ndarray]] | None = None  # (layer, predicted ids) per decode step, for bench

    def begin_step(self, batch: int, steps: int, slots: np.ndarray | None = None,
                   starts: np.ndarray | None = None) -> None:
        """Called by the executor before a forward pass: B sequences × T new tokens each, in KV slots `slots`."""
        self.planner.begin_step(steps, slots, starts)
        self.prefetcher.drop_in_flight()  # a step that failed midway may have left reads on their way
        self.prefetcher.discard_staged()  # a staged layer's rows serve its own step only (as StepBegin's in workers)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (N, d) → (N, d)."""
        decision = self.planner.plan_layer(layer, h)
        return self._carry_out[type(decision)](decision, h)

    # -- decode: through the neuron cache --------------------------------------

    def _forward_cached(self, decision: CachedLayer, h: torch.Tensor) -> torch.Tensor:
        layer, prefetcher = decision.layer, self.prefetcher
        self._count(prefetcher.prepare(layer, decision.first, new_token=True))
        if decision.late.size or decision.resident.size:
            self._count(prefetcher.prepare(layer, decision.late, new_token=False, resident_ids=decision.resident))
        self.stats.neurons_predicted += decision.num_predicted
        if self.recorded_sets is not None:
            self.recorded_sets.append((layer, decision.predicted))
        ahead = decision.lookahead
        if ahead is not None:  # read while this layer computes (AIO); a set that does not fit is staged
            prefetcher.start_stage(ahead.layer, ahead.ids, masked=not ahead.fits)
        start = time.perf_counter()
        rows = self.view.rows(layer)  # (n, E)
        y = ffn_over_cached_rows(h, rows, self.cols, decision.computed, self.view.row_ids(layer))
        self.stats.compute_s += time.perf_counter() - start
        self.stats.neurons_computed += rows.shape[0]
        return y

    def _count(self, update) -> None:
        self.stats.cache_hits += update.hits
        self.stats.neurons_read += update.read_neurons
        self.stats.read_bytes += update.read_bytes
        self.stats.io_s += update.io_s
        self.stats.io_blocked_s += update.blocked_s

    # -- prefill, dense batches and uncached layers: read in chunks, per-token masks --

    def _forward_masked(self, decision: MaskedLayer, h: torch.Tensor) -> torch.Tensor:
        layer = decision.layer
        if decision.committed_first is not None:  # as the worker runtime did at the Lookahead
            self._count(self.prefetcher.prepare(layer, decision.committed_first, new_token=True))
        start = time.perf_counter()
        mask = decision.mask.to(self.device)  # (N, n_ff)
        self.stats.neurons_predicted += decision.num_predicted
        reader_stats = self.prefetcher.reader.stats
        before = reader_stats.read_bytes
        read_started = time.perf_counter()
        waited_s = 0.0
        ahead = decision.lookahead
        start_ahead = (lambda: self.prefetcher.start_stage(ahead.layer, ahead.ids, masked=not ahead.fits)) \
            if ahead is not None else None
        reads = self.prefetcher.read_layer_chunks(layer, self._chunk_rows, decision.read_ids, on_reads_done=start_ahead)
        direct = uncached_reads_multiply_bundles(self.layout, self.device, self.prefetcher.caches[layer].capacity_rows,
                                                 decision.read_ids)

        def chunk_rows():  # (ids (k,), rows (k, E)) in the compute form, each as its reads land
            nonlocal waited_s
            for ids, waited in reads:
                waited_s += waited
                self._held_chunk = masked_chunk_rows(self._chunk_rows(len(ids)), self.layout, self.dtype,
                                                     self.device, layer_table(self.down_scales, layer), ids,
                                                     decision.per_token, direct, reuse=self._held_chunk)
                yield ids, self._held_chunk

        try:
            y = masked_ffn_over_chunks(h, chunk_rows(), self.cols, mask, decision.per_token)  # (N, d)
        finally:
            reads.close()  # after an error midway: waits for the next chunk's reads, so the reader is free
        done = time.perf_counter()
        self.stats.io_s += done - read_started
        self.stats.io_blocked_s += waited_s
        self.stats.read_bytes += reader_stats.read_bytes - before
        read_neurons = self.num_neurons if decision.read_ids is None else len(decision.read_ids)
        self.stats.neurons_read += read_neurons
        self.stats.neurons_computed += read_neurons
        self.stats.compute_s += done - start - waited_s
        return y

    def close(self) -> None:
        self.prefetcher.close()
