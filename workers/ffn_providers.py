"""Where a layer's FFN neurons come from when the compute side runs it.

    DenseFfn       every layer's bundles held in memory (the upper bound)
    NaiveFlashFfn  every layer re-read whole from flash for every forward call,
                   page cache bypassed (the paper's baseline)

The sparse path (predictor + sliding-window neuron cache) lives in
workers/sparse_ffn.py. All share `forward(layer, h) -> y` and `stats`.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from flashllm.protocol.store_format import FfnLayout, Manifest
from flashllm.workers.flash_io.bundle_products import (
    NeuronBundleRows, RawBundleRows, direct_products_apply, direct_products_pay, load_compiled_products,
)
from flashllm.workers.flash_io.bundle_reader import BundleReader
from flashllm.workers.interfaces import FfnProvider
from flashllm.workers.models.ffn import BundleColumns, HalfRows, ffn_from_rows
from flashllm.workers.models.quant_ffn import QuantNeuronMatrix, QuantRows, down_kernel_scales_of, quant_rows_of
from flashllm.workers.models.resident import HALF_STORE_DTYPES
from flashllm.workers.store_reader import (
    bundle_rows_as_float, each_down_group_scales, layer_table, load_down_group_scales,
)


NAIVE_LAYERS_IN_FLIGHT = 2  # --mode naive holds this many layers read and (converting ahead) as many converted


def naive_multiplies_bundles(layout: FfnLayout, device: str) -> bool:
    """Whether naive's decode steps multiply a streamed layer's bundles as read (flash_io/bundle_products): a
    quantized SwiGLU store on a CPU."""
    return layout.is_quantized and torch.device(device).type == "cpu" and direct_products_apply(layout)


def uncached_reads_multiply_bundles(layout: FfnLayout, device: str, capacity_rows: int,
                                    read_ids: np.ndarray | None) -> bool:
    """Whether a masked layer's read (read_ids: a decode step's; None: a prompt's whole layer) is multiplied
    from its bundles as read (flash_io/bundle_products.DirectSums) instead of converted into the kernels'
    layout: a decode step's read of a layer without a neuron cache (it takes the masked path alone or in any
    batch, so its sums need only agree with themselves), as naive's decode does. A layer with a cache falls
    back to the masked path only in some batches and must then give the cached path's bits: it converts.
    Both runtimes decide here, whatever the batch size, so a sequence's tokens stay the same in any batch."""
    return read_ids is not None and capacity_rows == 0 and naive_multiplies_bundles(layout, device)


def masked_chunk_rows(bundles: np.ndarray, layout: FfnLayout, dtype: torch.dtype, device: str,
                      down_scales: np.ndarray | None, neuron_ids: np.ndarray, down_by_slot: bool, direct: bool,
                      reuse=None):
    """A masked read's chunk of bundles as read (k, bundle_bytes) of neurons neuron_ids (k,) → what
    masked_ffn_over_chunks multiplies: the bundles themselves where `direct` (uncached_reads_multiply_bundles),
    else held_rows' form (reuse: the previous chunk's, rewritten in place where it fits)."""
    if direct:
        load_compiled_products()
        return NeuronBundleRows(layout, bundles, down_scales, neuron_ids)
    return held_rows(bundles, layout, dtype, device, down_scales=down_scales, neuron_ids=neuron_ids,
                     down_by_slot=down_by_slot, reuse=reuse)


def naive_converted_layers(layout: FfnLayout, device: str) -> int:
    """Whole-layer matrices naive's pipeline converts streamed layers into: one where a decode step multiplies
    the bundles as read (a prompt converts in the computing thread), else NAIVE_LAYERS_IN_FLIGHT (converted
    one layer ahead)."""
    return 1 if naive_multiplies_bundles(layout, device) else NAIVE_LAYERS_IN_FLIGHT


@dataclass
class FfnStats:
    """Per-token accounting, summed over layers since the last reset."""

    # rows multiplied: a cached layer's cache rows in use (its gate/up kernel runs over every slot, though each
    # token sums only its computed set), a masked layer's rows read (a decode step's sets, or the whole layer)
    neurons_computed: int = 0
    neurons_predicted: int = 0
    cache_hits: int = 0
    neurons_read: int = 0
    read_bytes: int = 0  # bytes the reader asked the device for (the honest figure is /proc/self/io)
    io_s: float = 0.0  # from each read's start to its end, overlapped with compute or not
    io_blocked_s: float = 0.0  # of which the computing thread waited (all of it, unless reads started ahead)
    compute_s: float = 0.0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())

    def compute_busy_s(self, forward_s: float) -> float:
        """Seconds of a forward (forward_s long, wall) the computing thread spent working: in one
        process only the reads it waits for block it, so all of it but io_blocked_s."""
        return forward_s - self.io_blocked_s

    def wait_time_s(self) -> float:
        """Seconds the computing thread waited on the FFN's reads."""
        return self.io_blocked_s


def rows_to_tensor(rows: np.ndarray, dtype: torch.dtype, device: str, copy: bool = False) -> torch.Tensor:
    """Bundle rows from numpy (store dtype) to a compute tensor; copy=True never shares the reader's buffer."""
    return torch.from_numpy(rows).to(device=device, dtype=dtype, copy=copy)


def held_rows(rows: np.ndarray, layout: FfnLayout, dtype: torch.dtype, device: str, copy: bool = False,
              down_scales: np.ndarray | None = None, neuron_ids: np.ndarray | None = None,
              down_by_slot: bool = False, reuse: torch.Tensor | QuantRows | HalfRows | None = None
              ) -> torch.Tensor | QuantRows | HalfRows:
    """Bundle rows as read → what ffn_from_rows multiplies. A float16/bfloat16 store's rows stay half on the
    CPU (HalfRows, widened a chunk at a time as they are multiplied), other float rows become a compute
    tensor; a quantized store's stay quantized on the CPU, in the integer kernels' layouts (never a float copy of
    them), and are dequantized to the compute dtype for a GPU. A quantized store's down columns also take
    their layer's scale table (d, n_ff/32, c) and the rows' neuron ids (k,); down_by_slot: held by slot, as
    stored, even for a whole layer; reuse: what this gave for the previous chunk, done with: a quantized
    store's rows are rewritten in place where they fit (quant_rows_of), anything else is ignored."""
    if not layout.is_quantized and layout.dtype in HALF_STORE_DTYPES and torch.device(device).type == "cpu" \
            and dtype == torch.float32:  # kept half, widened a chunk at a time as they are multiplied
        return HalfRows(rows.copy() if copy else rows, dtype)
    if not layout.is_quantized:  # (a bfloat16 store's rows are uint16 bits: decoded first)
        return rows_to_tensor(bundle_rows_as_float(layout, rows), dtype, device, copy)
    if torch.device(device).type == "cpu":
        return quant_rows_of(layout, rows, down_scales, neuron_ids, down_by_slot,
                             reuse if isinstance(reuse, QuantRows) else None)
    return torch.from_numpy(bundle_rows_as_float(layout, rows, down_scales, neuron_ids)).to(device=device, dtype=dtype)


class DenseFfn(FfnProvider):
    mode = "dense"

    def __init__(self, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str):
        self.cols = BundleColumns.from_layout(manifest.ffn.part_slices())
        self.stats = FfnStats()
        # one layer's down table at a time: a held layer keeps it only where it needs it to compute
        tables = each_down_group_scales(store_dir, manifest)
        with BundleReader(store_dir, manifest.ffn) as reader:
            self.layers = [held_rows(reader.read_layer(layer), manifest.ffn, dtype, device, copy=True,  # (n_ff, E)
                                     down_scales=table, neuron_ids=np.arange(region.num_neurons))
                           for (layer, region), table in zip(enumerate(manifest.ffn.layers), tables)]

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        rows = self.layers[layer]
        self.stats.neurons_computed += rows.shape[0]
        return ffn_from_rows(h, rows, self.cols)

    def close(self) -> None:
        self.layers = []


class NaiveFlashFfn(FfnProvider):
    """Every layer the memory plan does not hold (what is left of --memory after the minimum holds whole
    layers, spread evenly) is read whole from flash at every forward call, pipelined over threads beside the
    computing one. A reader thread reads streamed layer i + 2 (AIO: it waits, it does not compute) while
    layer i computes. A layer then costs about max(read, compute) instead of their sum.

    - A quantized SwiGLU store on a CPU (naive_multiplies_bundles): a decode step (at most DIRECT_MAX_TOKENS
      tokens) multiplies layer i's bundles as read (flash_io/bundle_products, half of the neurons on the
      helper thread), and the read of layer i + 2 starts in that buffer once the product is done with it; in a
      prompt or a larger batch the converter thread turns the next streamed layer into the kernels' layout,
      into the one matrix such a store keeps, as soon as layer i's product is done with it (meanwhile the
      layers between compute), and the read starts as the conversion ends.
    - Other stores and devices: a converter thread turns layer i + 1 into the kernels' layout meanwhile, and a
      read starts as soon as the conversion two layers back frees its buffer.

    Two layers are held read and one or two converted (memory_plan.naive_staging_bytes counts them)."""

    mode = "naive"
    DEPTH = NAIVE_LAYERS_IN_FLIGHT

    def __init__(self, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str, num_threads: int = 4,
                 capacity_rows: list[int] | None = None):
        """capacity_rows: the memory plan's rows per layer; a layer given its whole row count is held in memory
        (read once, here) and only the others are streamed (none held without a plan)."""
        self.cols = BundleColumns.from_layout(manifest.ffn.part_slices())
        self.reader = BundleReader(store_dir, manifest.ffn, num_threads=num_threads)
        self.layout = manifest.ffn
        self.num_layers = len(manifest.ffn.layers)
        self.dtype, self.device = dtype, device
        self.stats = FfnStats()
        held = {layer for layer, rows in enumerate(capacity_rows or [])
                if rows and rows >= manifest.ffn.layers[layer].num_neurons}
        self._streamed = [layer for layer in range(self.num_layers) if layer not in held]
        on_cpu_quantized = self.layout.is_quantized and torch.device(device).type == "cpu"
        # 4-bit down blocks on a CPU: a streamed layer keeps one form of its table (below), a held one none
        # (memory_plan.whole_layer_tables_bytes); else every layer keeps its float16 table
        own_scales = on_cpu_quantized and QuantNeuronMatrix.holds_own_down_scales(self.layout)
        # a decode step multiplies a streamed layer's bundles as read (flash_io/bundle_products), not converted
        self._direct = naive_multiplies_bundles(self.layout, device)
        if self._direct:
            load_compiled_products()  # now, not in the first decode step
        self.down_scales: list | None = None if own_scales else load_down_group_scales(store_dir, manifest)
        # streamed layer → its 4-bit down table: as stored where bundles are multiplied directly (a prompt's
        # conversion derives the kernel's form), else in the kernel's form only
        self._streamed_tables: dict[int, np.ndarray] = {}
        self._down_kernel_scales: dict[int, torch.Tensor] = {}
        self._raw_buffers = [self.reader.layer_buffer() for _ in range(self.DEPTH)]
        self._held = {}
        tables = each_down_group_scales(store_dir, manifest) if own_scales else \
            (layer_table(self.down_scales, layer) for layer in range(self.num_layers))
        for layer, table in zip(range(self.num_layers), tables):
            if layer in held:  # read through a raw buffer: read_layer without one keeps a buffer of its own
                self._held[layer] = held_rows(self.reader.read_layer(layer, self._raw_buffers[0]), self.layout,
                                              dtype, device, copy=True, down_scales=table,
                                              neuron_ids=np.arange(manifest.ffn.layers[layer].num_neurons))
            elif own_scales and self._direct:
                self._streamed_tables[layer] = table
            elif own_scales:
                self._down_kernel_scales[layer] = down_kernel_scales_of(table)
        self._matrices = None  # a quantized store on a CPU: whole-layer matrices, rewritten in turn
        if on_cpu_quantized and self._streamed:
            largest = max(region.num_neurons for region in self.layout.layers)
            first = self._streamed[0]
            self._matrices = [QuantNeuronMatrix(self.layout, largest, self._table_of(first), whole_layer=True,
                                                down_kernel_scales=self._down_kernel_scales.get(first))
                              for _ in range(naive_converted_layers(self.layout, device))]
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="flashllm-naive-read")
        # one torch thread there: OpenMP gives a new thread all cores, whose spinning slows both threads
        self._convert_thread = ThreadPoolExecutor(1, thread_name_prefix="flashllm-naive-convert",
                                                  initializer=torch.set_num_threads, initargs=(1,))
        # converts a layer's up rows and down columns while the converter does its gate rows: the computing
        # thread mostly waits, so a layer's conversion is the pipeline's longest stage; split, it takes the idle
        # core (the compiled writes hold no GIL)
        self._convert_helper = ThreadPoolExecutor(1, thread_name_prefix="flashllm-naive-convert-helper",
                                                  initializer=torch.set_num_threads, initargs=(1,))
        self._sequence = 0  # forward calls since the pipeline (re)started: picks the buffers in turn
        self._reads: dict[int, Future] = {}  # sequence → read future
        self._converts: dict[int, Future] = {}  # sequence → convert future
        self._next_layer: int | None = None  # the layer the pipeline expects next

    def _table_of(self, layer: int) -> np.ndarray | None:
        """A streamed layer's down scale table as stored (None: the store has none, or only its kernel form)."""
        return self._streamed_tables[layer] if layer in self._streamed_tables else layer_table(self.down_scales, layer)

    def _layer_at(self, sequence: int) -> int:
        return self._streamed[(self._first_index + sequence) % len(self._streamed)]

    def _read(self, sequence: int) -> tuple[np.ndarray, float, int]:
        """Reader thread: the layer at `sequence` into its raw buffer → (rows, seconds, bytes read)."""
        start = time.perf_counter()
        before = self.reader.stats.read_bytes
        raw = self.reader.read_layer(self._layer_at(sequence), self._raw_buffers[sequence % self.DEPTH])
        return raw, time.perf_counter() - start, self.reader.stats.read_bytes - before

    def _converted(self, raw: np.ndarray, sequence: int) -> torch.Tensor | QuantRows:
        """A streamed layer's rows as read → what the kernels multiply; then the read two layers on takes the raw
        buffer at once, not when compute gets here (a read then waited on compute, and the device sat idle)."""
        layer = self._layer_at(sequence)
        if self._matrices is not None:
            matrix = self._matrices[sequence % len(self._matrices)]  # not one the computing thread holds
            matrix.load_whole_layer(raw, self._table_of(layer), self._down_kernel_scales.get(layer),
                                    helper=self._convert_helper)
            rows = QuantRows(matrix, raw.shape[0])
        else:
            rows = held_rows(raw, self.layout, self.dtype, self.device, copy=True,
                             down_scales=layer_table(self.down_scales, layer), neuron_ids=np.arange(raw.shape[0]))
        self._reads[sequence + self.DEPTH] = self._read_thread.submit(self._read, sequence + self.DEPTH)
        return rows

    def _convert(self, sequence: int) -> tuple[torch.Tensor | QuantRows, float, float, int]:
        """Converter thread: the layer's rows as read → what compute multiplies (rows, read s, convert s, bytes)."""
        raw, read_s, read_bytes = self._reads.pop(sequence).result()
        start = time.perf_counter()
        rows = self._converted(raw, sequence)
        return rows, read_s, time.perf_counter() - start, read_bytes

    def _drain(self) -> None:
        """Wait out the reads and conversions in flight and forget them. Their errors are dropped: each belonged
        to a step that already failed on its own layer (a corrupt bundle), and the next step reads again."""
        for future in list(self._converts.values()):  # first: a conversion submits a read as it ends
            future.exception()
        for future in list(self._reads.values()):
            future.exception()
        self._converts.clear()
        self._reads.clear()

    def _restart(self, layer: int) -> None:
        """A call out of the expected order (the first, or after another user of the store): start over."""
        self._drain()
        self._first_index, self._sequence = self._streamed.index(layer), 0
        for sequence in range(self.DEPTH):
            self._reads[sequence] = self._read_thread.submit(self._read, sequence)
        if not self._direct:
            self._converts[0] = self._convert_thread.submit(self._convert, 0)

    def _rows_of(self, layer: int, num_tokens: int) -> tuple[QuantRows | RawBundleRows | torch.Tensor, int | None,
                                                             int | None]:
        """The streamed layer's rows for a forward call of num_tokens tokens → (rows, the sequence whose read
        waits for this product to end, as the rows are its raw buffer, and the sequence whose conversion does,
        as the rows are the one matrix; None when neither waits)."""
        if layer != self._next_layer:
            self._restart(layer)
        self._next_layer = None  # until this layer arrives: a failed read restarts the pipeline next time
        sequence = self._sequence
        wait_start = time.perf_counter()
        reads_after = converts_after = None
        if self._direct:
            direct = direct_products_pay(num_tokens)
            if not direct:  # a prompt or a large batch: the next layer converts into the one matrix once free
                converts_after = sequence + 1
            if sequence in self._converts:  # converted while the layers before it computed (a prompt's step)
                rows, read_s, convert_s, read_bytes = self._converts.pop(sequence).result()
                self.stats.io_blocked_s += time.perf_counter() - wait_start
            else:
                raw, read_s, read_bytes = self._reads.pop(sequence).result()
                self.stats.io_blocked_s += time.perf_counter() - wait_start
                convert_start = time.perf_counter()
                if direct:
                    rows, reads_after = RawBundleRows(self.layout, raw, self._table_of(layer),
                                                      self._convert_helper), sequence + self.DEPTH
                else:  # the first streamed layer of a prompt after decode steps: converted here
                    rows = self._converted(raw, sequence)
                convert_s = time.perf_counter() - convert_start
        else:  # the layer computed before this one is done: its converted buffers take the next
            self._converts[sequence + 1] = self._convert_thread.submit(self._convert, sequence + 1)
            rows, read_s, convert_s, read_bytes = self._converts.pop(sequence).result()
            self.stats.io_blocked_s += time.perf_counter() - wait_start
        self.stats.io_s += read_s + convert_s
        self.stats.read_bytes += read_bytes
        self._sequence = sequence + 1
        self._next_layer = self._layer_at(sequence + 1)
        return rows, reads_after, converts_after

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        rows, reads_after, converts_after = (self._held[layer], None, None) if layer in self._held else \
            self._rows_of(layer, h.shape[0])
        compute_start = time.perf_counter()
        try:
            self.stats.neurons_read += rows.shape[0]
            self.stats.neurons_computed += rows.shape[0]
            y = ffn_from_rows(h, rows, self.cols)
            self.stats.compute_s += time.perf_counter() - compute_start
            return y
        finally:
            if reads_after is not None:  # the product is done with the raw buffer: the read two layers on takes it
                self._reads[reads_after] = self._read_thread.submit(self._read, reads_after)
            if converts_after is not None:  # done with the one matrix: the next streamed layer converts into it
                self._converts[converts_after] = self._convert_thread.submit(self._convert, converts_after)

    def close(self) -> None:
        self._drain()
        self._read_thread.shutdown(wait=True)
        self._convert_thread.shutdown(wait=True)
        self._convert_helper.shutdown(wait=True)
        self.reader.close()
