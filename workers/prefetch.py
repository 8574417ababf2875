"""Flash prefetching: the only reader of FFN bytes, and the only writer of the neuron caches.

`Prefetcher` is the core: per layer a `NeuronCache` (the paper's preallocated
matrix, possibly over shared memory) fed by one `BundleReader`. For each token
and layer it is told the predicted neuron ids; it advances that layer's
sliding window, evicts what no recent token used, and reads only the missing
bundles (the increment) with aligned direct reads. Hot neurons are pinned once.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from protocol.store_format import Manifest
from workers.flash_io.bundle_reader import BundleReader, numpy_dtype_of_store
from workers.flash_io.neuron_cache import NeuronCache


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
    io_s: float


class Prefetcher:
    def __init__(self, store_dir: str, manifest: Manifest, capacity_rows: list[int], window_tokens: int,
                 hot_ids: list[np.ndarray] | None = None, cache_rows: list[np.ndarray] | None = None,
                 cache_dtype=None, num_threads: int = 4):
        """cache_dtype: dtype of the cache rows when it differs from the store's (CPU compute in float32
        converts once on insert instead of on every use); cache_rows: preallocated matrices (shared memory)."""
        layout = manifest.ffn
        self.reader = BundleReader(store_dir, layout, num_threads=num_threads)
        store_dtype = numpy_dtype_of_store(layout.dtype)
        dtype = np.dtype(cache_dtype) if cache_dtype is not None else store_dtype
        self._convert = dtype != store_dtype
        self._scratch = np.empty((0, layout.bundle_elements), dtype=store_dtype)
        self.caches = [
            NeuronCache(region.num_neurons, layout.bundle_elements, capacity_rows[layer], dtype, window_tokens,
                        rows=None if cache_rows is None else cache_rows[layer])
            for layer, region in enumerate(layout.layers)
        ]
        if hot_ids is not None:
            for layer, ids in enumerate(hot_ids):
                if len(ids):
                    self.caches[layer].pin(np.sort(ids), self._filler(layer))

    def _filler(self, layer: int):
        """rows_filler(ids, out) for the cache: read bundles, converting dtype when the cache's differs."""
        if not self._convert:
            return functools.partial(self.reader.read_neurons, layer)

        def read_converted(ids: np.ndarray, out: np.ndarray) -> None:
            if self._scratch.shape[0] < len(ids):
                self._scratch = np.empty((len(ids), out.shape[1]), dtype=self._scratch.dtype)
            self.reader.read_neurons(layer, ids, self._scratch)
            out[: len(ids)] = self._scratch[: len(ids)]

        return read_converted

    def prepare(self, layer: int, predicted_ids: np.ndarray, new_token: bool = True) -> LayerUpdate:
        """Make every predicted neuron of `layer` resident.

        new_token: this is the token's first set for the layer (advance the window);
        False for a late addition (the same-layer check) to the current token.
        """
        cache = self.caches[layer]
        start = time.perf_counter()
        before_bytes = self.reader.stats.read_bytes
        evicted = 0
        if new_token:
            cache.advance_window(predicted_ids)
            evicted = len(cache.evict_outside_window())
        else:
            cache.extend_current_token(predicted_ids)
        missing = cache.plan_token(predicted_ids)
        if len(missing):
            cache.insert(missing, self._filler(layer))
        return LayerUpdate(layer=layer, version=cache.version, num_rows=cache.num_rows,
                           predicted=len(predicted_ids), hits=len(predicted_ids) - len(missing),
                           read_neurons=len(missing), evicted=evicted,
                           read_bytes=self.reader.stats.read_bytes - before_bytes,
                           io_s=time.perf_counter() - start)

    def close(self) -> None:
        self.reader.close()
