"""The compute worker: the model (attention, norms, embeddings, KV cache) with its FFN from shared memory.

`ComputeWorker` wraps the same `ModelExecutor` the in-process engine uses; only
the FFN provider differs. `PipelineFfn.forward(layer, h)` does, per layer:

    write h (N, d) into hidden[layer % 2]          shared memory
    FfnInput(step, layer) ──▶ predictor            (which tells the prefetcher)
    wait for LayerReady(step, layer) ◀── prefetch   the only wait: a late read
            (a decode step's uncached layer: its LayerStaged, sent at its Lookahead, may do instead)
    cached: y = FFN over the layer cache's first num_rows rows (CacheView: zero-copy
            on the CPU, a device mirror updated with the changed rows elsewhere)
    masked: y = (act(h · rows) * mask) @ down over the layer's masked read (the whole layer, or a decode
            step's sets: sparse_policy.masked_read_ids), chunk by chunk as each lands in a chunk slot
            (LayerReady per chunk; ChunkDone gives the slot back)
    staged: a decode step's uncached layer whose read-ahead (LayerStaged) holds its whole read: those
            rows, gathered in place in their slot, as the masked path's one chunk; no round trip to
            the prefetcher once the layer's input is known

so while this process runs layer l's FFN and layer l+1's attention, the
predictor has sent layer l+1's lookahead and the prefetcher is reading it.

Buffer safety (why two hidden buffers by layer parity suffice): compute
writes buffer (l+1) % 2 only after LayerReady(l) or LayerStaged(l); the
predictor this process hosts finished with FfnInput(l) before that send
returned (it writes the mask compute reads there too), so it is done with
h_{l-1} (same parity as l+1). Chunk slots are handed back explicitly.

Compute never opens the FFN file: every bundle it multiplies came through the
prefetcher.
"""
from __future__ import annotations

import ctypes
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from flashllm.protocol.messages import (
    PATH_CACHED, ROLE_COMPUTE, ROLE_PREDICTOR, ROLE_PREFETCH, ROLE_SUPERVISOR, ChunkDone, Dispatcher, FfnInput,
    ForwardChunk, ForwardRequest, LayerReady, LayerStaged, LogitsTaken, PredictionStats, Shutdown, StepBegin,
    StepFailed,
)
from flashllm.protocol.shm import SharedSegment, cache_down_tables, cache_kernel_arrays, cache_layer_arrays
from flashllm.protocol.store_format import FfnLayout
from flashllm.workers.ffn_providers import FfnStats, masked_chunk_rows, uncached_reads_multiply_bundles
from flashllm.workers.flash_io.bundle_reader import chunk_ids
from flashllm.workers.flash_io.kernel_rows import KernelRowsView
from flashllm.workers.flash_io.neuron_ids import staged_positions
from flashllm.workers.interfaces import FfnProvider
from flashllm.workers.models.ffn import BundleColumns, masked_ffn_over_chunks
from flashllm.workers.process_entry import WorkerConfig, run_worker
from flashllm.workers.sparse_ffn import CacheView, ffn_over_cached_rows
from flashllm.workers.sparse_policy import masked_read_ids, sums_per_token
from flashllm.workers.store_reader import layer_table


@dataclass
class PipelineStats(FfnStats):
    """FfnStats of one forward in the worker runtime, plus where the compute process's time went.

    io_s: the prefetcher's flash time for this forward (overlapped: not on the critical path);
    compute_s: FFN math; busy_s: everything the compute process did (attention, FFN, IPC);
    wait_s: compute blocked on a layer not yet ready; predict_s: predictor time."""

    wait_s: float = 0.0
    critical_io_s: float = 0.0  # prefetch time between a layer's Prediction and its LayerReady (not overlapped)
    busy_s: float = 0.0
    predict_s: float = 0.0
    forward_s: float = 0.0  # compute-side wall time of the forward

    def add(self, other: dict) -> None:
        for name in self.__dataclass_fields__:
            if name in other:
                setattr(self, name, getattr(self, name) + type(getattr(self, name))(other[name]))

    def compute_busy_s(self, forward_s: float) -> float:
        """The compute process measured it (busy_s): io_s ran in the prefetcher, overlapped, and
        forward_s (the engine's wall time) also holds the IPC to and from the engine."""
        return self.busy_s

    def wait_time_s(self) -> float:
        return self.wait_s


class PipelineStepError(RuntimeError):
    """A worker failed its part of the current step (its message names it)."""

    def __init__(self, role: str, error: str):
        super().__init__(f"{role} worker: {error}")
        self.role, self.error = role, error


class SharedCacheLayer:
    """One layer's neuron cache as the compute side sees it (what CacheView reads)."""

    def __init__(self, rows: np.ndarray | None, slot_ids: np.ndarray, header: np.ndarray,
                 kernel_arrays: dict[str, np.ndarray] | None = None):
        """rows None: the layer's neurons are kernel_arrays (flash_io/kernel_rows.py), which the prefetcher writes."""
        self.rows, self.slot_ids, self.header = rows, slot_ids, header  # (capacity, E), (capacity,), (2,)
        self.kernel_rows = None if kernel_arrays is None else KernelRowsView(kernel_arrays)
        self.capacity_rows = slot_ids.shape[0]

    @property
    def num_rows(self) -> int:
        return int(self.header[0])

    @property
    def version(self) -> int:
        return int(self.header[1])


class PipelineFfn(FfnProvider):
    """The FFN provider of the compute worker's ModelExecutor (see the module docstring)."""

    mode = "sparse"

    def __init__(self, layer_neurons: list[int], ffn_layout: FfnLayout, dtype: torch.dtype, device: str,
                 cache: SharedSegment, exchange: SharedSegment, channel, down_scales: list[np.ndarray] | None = None,
                 batch_invariant: bool = True):
        """down_scales: a quantized store's down scale tables (store_reader.load_down_group_scales).
        batch_invariant: the cached path masks each sequence to the neurons the predictor computed for it."""
        self.layer_neurons = layer_neurons
        self.down_scales = down_scales
        self.ffn_layout = ffn_layout
        self.cols = BundleColumns.from_layout(ffn_layout.part_slices())
        self.dtype, self.device, self.channel = dtype, device, channel
        self.layers = [SharedCacheLayer(*cache_layer_arrays(cache, layer), cache_kernel_arrays(cache, layer))
                       for layer in range(len(layer_neurons))]
        self.view = CacheView(self.layers, dtype, device, ffn_layout, down_scales)
        arrays = exchange.arrays
        self.hidden = arrays["hidden"]  # (2, max_tokens, d)
        self.mask = arrays["mask"]  # (max_tokens, n_ff)
        self.batch_invariant = batch_invariant
        self.computed = arrays["computed"] if batch_invariant else None  # (2, max_tokens, n_ff)
        self._per_token = False  # this step's masked layers sum each token alone (sparse_policy.sums_per_token)
        self._steps = 1  # new tokens per sequence in this step: a decode step's masked layers read their sets
        self.staging = arrays["chunk_staging"]  # (slots, chunk_rows, E) store dtype
        self._held_chunk = None  # the last chunk in the compute form (a quantized store's is rewritten in place)
        self.bundle_bytes = self.staging.shape[2] * self.staging.itemsize
        self.stats = PipelineStats()
        self.step = -1
        self._waiting = Dispatcher({LayerReady: self._on_layer_ready, LayerStaged: self._on_layer_staged,
                                    StepFailed: self._on_step_failed, Shutdown: self._on_shutdown,
                                    LogitsTaken: self._on_logits_taken, PredictionStats: self._on_prediction_stats},
                                   owner="the compute worker")
        self._awaited: tuple[type, int] = (LayerReady, -1)
        self._layers_predicted = 0  # PredictionStats received this step
        self._staged: dict[int, LayerStaged] = {}  # this step's LayerStaged not yet taken, by layer

    def start_step(self, step: int) -> None:
        self.step = step
        self._layers_predicted = 0
        self._staged = {}

    def finish_step(self) -> None:
        """Collect the predictor's counters of every layer (they travel beside the critical path)."""
        if self._layers_predicted < len(self.layers):
            self.wait_for(PredictionStats, len(self.layers), timed=False)

    def begin_step(self, batch: int, steps: int, slots: np.ndarray | None = None,
                   starts: np.ndarray | None = None) -> None:
        self._per_token = sums_per_token(self.batch_invariant, steps, slots)
        self._steps = steps
        self.channel.send(ROLE_PREDICTOR, StepBegin(
            step=self.step, batch=batch, steps=steps,
            slots=np.asarray(slots if slots is not None else [], dtype=np.int64),
            starts=np.asarray(starts if starts is not None else [], dtype=np.uint8)))

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (N, d) → (N, d)."""
        num_tokens = h.shape[0]
        if num_tokens > self.hidden.shape[1]:
            raise ValueError(f"{num_tokens} tokens in one forward but the exchange buffer holds "
                             f"{self.hidden.shape[1]}; raise the worker runtime's max_tokens")
        buffer = layer % 2
        torch.from_numpy(self.hidden[buffer, :num_tokens]).copy_(h)  # (N, d), to the predictor
        self.channel.send(ROLE_PREDICTOR, FfnInput(step=self.step, layer=layer, num_tokens=num_tokens, buffer=buffer))
        ready = self.wait_for(LayerReady, layer, or_staged=True)
        if type(ready) is LayerStaged:
            y = self._forward_staged(h, ready)
            if y is not None:
                return y
            ready = self.wait_for(LayerReady, layer)  # the prefetcher reads the rest and sends the layer's chunks
        self._count_ready(ready)
        start, waited_before = time.perf_counter(), self.stats.wait_s
        if ready.path == PATH_CACHED:
            cache = self.layers[layer]
            if cache.num_rows != ready.num_rows or cache.version != ready.version:
                raise RuntimeError(f"layer {layer}: the cache header says {cache.num_rows} rows at version "
                                   f"{cache.version} but LayerReady says {ready.num_rows} at {ready.version}")
            rows = self.view.rows(layer)  # (n, E)
            computed = torch.from_numpy(self.computed[layer % 2, :num_tokens]) if self.computed is not None \
                else None  # (B, n_ff) bool, written by the predictor before this LayerReady
            y = ffn_over_cached_rows(h, rows, self.cols, computed, self.view.row_ids(layer))
        else:
            host_mask = torch.from_numpy(self.mask[:num_tokens])  # (N, n_ff) bool, written by the predictor
            read_ids = masked_read_ids(host_mask, self._steps)
            y = masked_ffn_over_chunks(h, self._masked_chunks(layer, ready, read_ids), self.cols,
                                       host_mask.to(self.device), self._per_token)  # (N, d)
        self.stats.compute_s += time.perf_counter() - start - (self.stats.wait_s - waited_before)
        if ready.path == PATH_CACHED:
            self.stats.neurons_computed += ready.num_rows
        else:
            self.stats.neurons_computed += self.layer_neurons[layer] if read_ids is None else len(read_ids)
        return y

    def _forward_staged(self, h: torch.Tensor, staged: LayerStaged) -> torch.Tensor | None:
        """h (N, d) → (N, d): a decode step's uncached layer over the rows its LayerStaged names, as the masked
        path computes its one chunk, when they hold every neuron of the layer's read (staged_positions, by which
        the prefetcher decides alike); None when they do not, or the read is empty (then its LayerReady comes)."""
        self.stats.add({"read_bytes": staged.read_bytes, "io_s": staged.io_s})
        host_mask = torch.from_numpy(self.mask[: h.shape[0]])  # (N, n_ff) bool, written by the predictor
        read_ids = masked_read_ids(host_mask, self._steps)  # (k,) sorted
        positions = staged_positions(staged.ids, read_ids) if len(read_ids) else None  # (k,)
        if positions is None:
            return None
        start = time.perf_counter()
        rows = self.staging[staged.staging]  # (chunk_rows, E) store dtype, rows [0, len(staged.ids)) read
        gather_rows_in_place(rows, positions)  # rows[:k] = the read's rows, in id order
        self._held_chunk = masked_chunk_rows(rows[: len(read_ids)], self.ffn_layout, self.dtype, self.device,
                                             layer_table(self.down_scales, staged.layer), read_ids, self._per_token,
                                             self._direct(staged.layer, read_ids), reuse=self._held_chunk)
        y = masked_ffn_over_chunks(h, [(read_ids, self._held_chunk)], self.cols, host_mask.to(self.device),
                                   self._per_token)  # (N, d)
        self.channel.send(ROLE_PREFETCH, ChunkDone(step=self.step, staging=staged.staging))
        self.stats.compute_s += time.perf_counter() - start
        self.stats.neurons_read += len(read_ids)
        self.stats.neurons_computed += len(read_ids)
        return y

    def _masked_chunks(self, layer: int, ready: LayerReady, read_ids: np.ndarray | None):
        """(ids (k,), rows (k, E)) of each chunk of the layer's masked read (chunk_ids()) as the prefetcher hands
        it over in a chunk slot (the first came with `ready`); a slot goes back (ChunkDone) once its part is
        computed."""
        chunks = chunk_ids(self.layer_neurons[layer], self.bundle_bytes, read_ids)
        for chunk, ids in enumerate(chunks):
            if chunk:
                ready = self.wait_for(LayerReady, (layer, chunk))
                self._count_ready(ready)
            if (ready.chunk, ready.num_chunks, ready.num_rows) != (chunk, len(chunks), len(ids)):
                raise RuntimeError(f"layer {layer}: chunk {ready.chunk} of {ready.num_chunks} ({ready.num_rows} rows) "
                                   f"came where chunk {chunk} of {len(chunks)} ({len(ids)} rows) was due; the "
                                   "prefetcher and compute disagree on the chunks (a flashllm bug)")
            self._held_chunk = masked_chunk_rows(self.staging[ready.staging, : len(ids)], self.ffn_layout, self.dtype,
                                                 self.device, layer_table(self.down_scales, layer), ids,
                                                 self._per_token, self._direct(layer, read_ids),
                                                 reuse=self._held_chunk)
            yield ids, self._held_chunk
            self.channel.send(ROLE_PREFETCH, ChunkDone(step=self.step, staging=ready.staging))

    def _direct(self, layer: int, read_ids: np.ndarray | None) -> bool:
        """A masked read of `layer` multiplied from its bundles as read (ffn_providers decides, as in-process)."""
        return uncached_reads_multiply_bundles(self.ffn_layout, self.device, self.layers[layer].capacity_rows, read_ids)

    def _count_ready(self, ready: LayerReady) -> None:
        self.stats.add({"cache_hits": ready.hits, "neurons_read": ready.read_neurons, "read_bytes": ready.read_bytes,
                        "io_s": ready.io_s, "critical_io_s": ready.critical_io_s})

    # -- waiting on the inbox --------------------------------------------------

    def wait_for(self, kind: type, key: int, timed: bool = True, or_staged: bool = False):
        """Block until the awaited message of this step arrives (LayerReady of layer `key`, LogitsTaken);
        or_staged: the layer's LayerStaged will do too. timed: count the time as wait_s (a late layer)."""
        self._awaited = (kind, key)
        start = time.perf_counter()
        try:
            while True:
                if or_staged and key in self._staged:
                    return self._staged.pop(key)
                found = self._waiting.dispatch(self.channel.recv())
                if found is not None:
                    return found
        finally:
            if timed:
                self.stats.wait_s += time.perf_counter() - start

    def _on_layer_ready(self, msg: LayerReady):
        if msg.step != self.step:
            return None  # left over from a failed step
        key = msg.layer if msg.chunk <= 0 else (msg.layer, msg.chunk)  # a layer's first LayerReady, or a chunk's
        if self._awaited != (LayerReady, key):
            raise RuntimeError(f"LayerReady for layer {msg.layer} (chunk {msg.chunk}) while waiting for "
                               f"{self._awaited[0].__name__} {self._awaited[1]}; the pipeline lost its order "
                               "(a flashllm bug)")
        return msg

    def _on_layer_staged(self, msg: LayerStaged):
        if msg.step == self.step:  # kept until its layer is computed (it may come while an earlier layer's chunks do)
            self._staged[msg.layer] = msg
        return None

    def _on_prediction_stats(self, msg: PredictionStats):
        if msg.step != self.step:
            return None
        self.stats.add({"neurons_predicted": msg.predicted, "predict_s": msg.predict_s})
        self._layers_predicted += 1
        done = self._awaited[0] is PredictionStats and self._layers_predicted >= self._awaited[1]
        return msg if done else None

    def _on_logits_taken(self, msg: LogitsTaken):
        return msg if msg.step == self.step and self._awaited[0] is LogitsTaken else None

    def _on_step_failed(self, msg: StepFailed):
        if msg.step == self.step:
            raise PipelineStepError(msg.role, msg.error)
        return None

    def _on_shutdown(self, msg: Shutdown):
        raise SystemExit(0)

    def close(self) -> None:
        self.layers, self.view = [], None
        self._held_chunk, self._staged = None, {}  # a chunk's rows may be views of a shared-memory slot


class ComputeWorker:
    """The compute process's core: ForwardRequest in, logits (shared memory) + ForwardChunk out."""

    def __init__(self, config: WorkerConfig, channel):
        from flashllm.workers.executor import ModelExecutor, check_fits_on_device, compute_dtype
        from flashllm.workers.store_reader import load_down_group_scales, open_store

        self.channel = channel
        self.device = config.device
        if config.compute_threads:
            torch.set_num_threads(config.compute_threads)
        manifest = open_store(config.store_dir)
        check_fits_on_device(config.store_dir, manifest, "sparse", config.num_slots, config.max_context, config.device,
                             config.resident_dtype, config.capacity_rows)
        self.cache = SharedSegment.attach(config.instance, config.cache_layout)
        self.exchange = SharedSegment.attach(config.instance, config.exchange_layout)
        self.logits = self.exchange.arrays["logits"]  # (R, V)
        dtype = compute_dtype(config.device)
        self.ffn = PipelineFfn([region.num_neurons for region in manifest.ffn.layers], manifest.ffn,
                               dtype, config.device, self.cache, self.exchange, channel,
                               # (d, n_ff/32, c) views of the tables the prefetch process put in shared memory
                               [table.transpose(2, 0, 1) for table in cache_down_tables(self.cache)]
                               or load_down_group_scales(config.store_dir, manifest),
                               config.sparse.batch_invariant)
        self.executor = ModelExecutor(config.store_dir, manifest, "sparse", config.num_slots, config.max_context,
                                      device=config.device, verify=config.verify, ffn=self.ffn,
                                      resident_dtype=config.resident_dtype, head_precision=config.head_precision)
        self.dispatcher = Dispatcher({ForwardRequest: self.on_forward}, owner="the compute worker")

    def info(self) -> dict:
        return {"device": self.device, "torch_threads": torch.get_num_threads()}

    def on_forward(self, msg: ForwardRequest) -> None:
        self.ffn.start_step(msg.step)
        self.ffn.stats.reset()
        start = time.perf_counter()
        try:
            token_ids = torch.from_numpy(np.array(msg.token_ids, dtype=np.int64).reshape(msg.batch, msg.steps))
            positions = torch.from_numpy(np.array(msg.positions, dtype=np.int64).reshape(msg.batch, msg.steps))
            slots = torch.from_numpy(np.array(msg.slots, dtype=np.int64))
            logit_steps = torch.from_numpy(np.array(msg.logit_steps, dtype=np.int64)) if len(msg.logit_steps) else None
            logits = self.executor.forward(token_ids, slots, positions, logit_steps)  # (B, T, V) or (B, V)
            self.ffn.finish_step()
            stats = self.ffn.stats
            stats.forward_s = time.perf_counter() - start
            stats.busy_s = stats.forward_s - stats.wait_s
            self._send_logits(msg.step, logits.reshape(-1, logits.shape[-1]))
        except PipelineStepError as exc:
            self.channel.send(ROLE_SUPERVISOR, StepFailed(step=msg.step, role=exc.role, error=exc.error))
        except Exception as exc:  # the step fails, the worker stays up
            self.channel.send(ROLE_SUPERVISOR, StepFailed(step=msg.step, role=ROLE_COMPUTE,
                                                          error=f"{type(exc).__name__}: {exc}"))

    def _send_logits(self, step: int, logits: torch.Tensor) -> None:
        """logits (N, V) through the logits buffer, a chunk of R rows at a time."""
        total_rows, vocab = logits.shape
        chunk_rows = self.logits.shape[0]
        for first in range(0, total_rows, chunk_rows):
            count = min(chunk_rows, total_rows - first)
            torch.from_numpy(self.logits[:count]).copy_(logits[first:first + count])
            last = first + count == total_rows
            stats = dataclasses.asdict(self.ffn.stats) if last else {}
            self.channel.send(ROLE_SUPERVISOR, ForwardChunk(step=step, first_row=first, num_rows=count,
                                                            total_rows=total_rows, vocab=vocab, stats=stats))
            if not last:
                self.ffn.wait_for(LogitsTaken, first, timed=False)

    def close(self) -> None:
        self.executor = None
        self.ffn.close()
        self.logits = None
        self.cache.close()
        self.exchange.close()


def gather_rows_in_place(rows: np.ndarray, positions: np.ndarray) -> None:
    """rows[:k] = rows[positions] for ascending positions (k,) with positions[i] >= i, in place: each run of
    consecutive positions moves as one memmove, front to back, so no row is overwritten before it moves (numpy
    would copy overlapping rows through a temporary of their size)."""
    if not rows.flags.c_contiguous:
        raise ValueError("gather_rows_in_place needs C-contiguous rows")
    row_bytes = rows.strides[0]
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # where a run of consecutive positions ends
    base = rows.ctypes.data
    for first, stop in zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [len(positions)])).tolist()):
        source = int(positions[first])
        if source != first:
            ctypes.memmove(base + first * row_bytes, base + source * row_bytes, (stop - first) * row_bytes)


def run_compute(config: WorkerConfig) -> None:
    """Process entry of the compute worker, which hosts the predictor: predicting a layer's neurons is a few
    small products that compute waits for anyway, and a process of its own cost a second torch import
    (docs/benchmarks.md) and two socket hops per layer."""
    from flashllm.workers.predictor import PredictorWorker

    run_worker(ROLE_COMPUTE, config, ComputeWorker, co_hosted=((ROLE_PREDICTOR, PredictorWorker.from_config),))
