"""Where a layer's FFN neurons come from when the compute side runs it.

    DenseFfn       every layer's bundles held in memory (the upper bound)
    NaiveFlashFfn  every layer re-read whole from flash for every forward call,
                   page cache bypassed (the paper's baseline)

The sparse path (predictor + sliding-window neuron cache) lives in
workers/sparse_ffn.py. All share `forward(layer, h) -> y` and `stats`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flashllm.protocol.store_format import FfnLayout, Manifest
from flashllm.workers.flash_io.bundle_reader import BundleReader
from flashllm.workers.models.ffn import BundleColumns, ffn_from_rows
from flashllm.workers.models.quant_ffn import QuantRows, quant_rows_of
from flashllm.workers.store_reader import bundle_rows_as_float, layer_table, load_down_group_scales


@dataclass
class FfnStats:
    """Per-token accounting, summed over layers since the last reset."""

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
              down_scales: np.ndarray | None = None, neuron_ids: np.ndarray | None = None) -> torch.Tensor | QuantRows:
    """Bundle rows as read → what ffn_from_rows multiplies. A float store's rows become a compute tensor; a
    quantized store's stay quantized on the CPU, in the integer kernels' layouts (never a float copy of
    them), and are dequantized to the compute dtype for a GPU. A quantized store's down columns also take
    their layer's scale table (d, n_ff/32, c) and the rows' neuron ids (k,)."""
    if not layout.is_quantized:  # (a bfloat16 store's rows are uint16 bits: decoded first)
        return rows_to_tensor(bundle_rows_as_float(layout, rows), dtype, device, copy)
    if torch.device(device).type == "cpu":
        return quant_rows_of(layout, rows, down_scales, neuron_ids)
    return torch.from_numpy(bundle_rows_as_float(layout, rows, down_scales, neuron_ids)).to(device=device, dtype=dtype)


class DenseFfn:
    mode = "dense"

    def __init__(self, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str):
        self.cols = BundleColumns.from_layout(manifest.ffn.part_slices())
        self.stats = FfnStats()
        down_scales = load_down_group_scales(store_dir, manifest)
        with BundleReader(store_dir, manifest.ffn) as reader:
            self.layers = [held_rows(reader.read_layer(layer), manifest.ffn, dtype, device, copy=True,  # (n_ff, E)
                                     down_scales=layer_table(down_scales, layer),
                                     neuron_ids=np.arange(region.num_neurons))
                           for layer, region in enumerate(manifest.ffn.layers)]

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        rows = self.layers[layer]
        self.stats.neurons_computed += rows.shape[0]
        return ffn_from_rows(h, rows, self.cols)

    def close(self) -> None:
        self.layers = []


class NaiveFlashFfn:
    mode = "naive"

    def __init__(self, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str, num_threads: int = 4):
        self.cols = BundleColumns.from_layout(manifest.ffn.part_slices())
        self.reader = BundleReader(store_dir, manifest.ffn, num_threads=num_threads)
        self.layout = manifest.ffn
        self.down_scales = load_down_group_scales(store_dir, manifest)
        self.dtype, self.device = dtype, device
        self.stats = FfnStats()

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        before = self.reader.stats.read_bytes
        raw = self.reader.read_layer(layer)  # (n_ff, E), valid until the next read
        rows = held_rows(raw, self.layout, self.dtype, self.device, down_scales=layer_table(self.down_scales, layer),
                         neuron_ids=np.arange(raw.shape[0]))
        read_done = time.perf_counter()
        self.stats.io_s += read_done - start
        self.stats.io_blocked_s += read_done - start
        self.stats.read_bytes += self.reader.stats.read_bytes - before
        self.stats.neurons_read += rows.shape[0]
        self.stats.neurons_computed += rows.shape[0]
        y = ffn_from_rows(h, rows, self.cols)
        self.stats.compute_s += time.perf_counter() - read_done
        return y

    def close(self) -> None:
        self.reader.close()
