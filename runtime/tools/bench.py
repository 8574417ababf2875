"""`flashllm bench`: the speed, traffic and quality of each FFN mode, measured honestly.

- Flash bytes come from `read_bytes` in /proc/<pid>/io of the process that
  reads the FFN (this one, or the prefetch worker under --runtimes workers):
  what reached the device, not the reader's own counters; reads bypass the
  page cache (O_DIRECT).
- io, compute and wait ms are each measured where they happen (compute: the
  computing thread's or compute worker's busy time), not derived from others.
  Reads overlap compute in both runtimes (in-process, a layer's lookahead
  reads go to the device before the layer before it computes), so io counts
  from a read's start to its end and io + compute may exceed ms/token.
- Decode is measured token by token. With --text, the text is fed through the
  real decode path (teacher forcing: predictor, window and cache as in
  generation), which gives perplexity and top-1 agreement with dense as well.
- Baselines in the same run: dense in memory and naive flash (every FFN byte
  of every layer read for every token), plus raw direct reads of the device.
- Per sparse run, the device bytes per token against the bytes of the neurons
  it needed (neurons read x bundle bytes), and the reader's decode requests:
  alignment, size histogram, achieved vs raw bandwidth at those sizes (raw
  from the read cost curve, 512 B..1 MiB, which is measured, fitted and printed:
  the two numbers the planner's gap merging runs on).

Prints tables and writes one JSON file; with --plots, PNG figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from dataclasses import replace

from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.engine_config import EngineConfig, SparseOptions
from flashllm.workers.memory_plan import MemoryPlanError
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.workers.activation_trace import TraceSpec
from flashllm.workers.engine_config import SPARSE_FLAGS

BENCH_PROMPT = "The history of the printing press begins"
NAIVE_MAX_TOKENS = 24  # naive reads the whole FFN per token: a few tokens measure it
REQUEST_SIZES_BYTES = [4096, 16384, 65536, 262144, 1048576]
TRADEOFF_KEYS = ("flash_read_bytes_per_token", "ms_per_token", "perplexity", "cache_hit_rate")  # per keep fraction


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _summarize(stats: list[dict], ffn_bytes: int, bundle_bytes: int) -> dict:
    """Per-token accounting (Engine.token_stats entries) → the bench's figures.

    needed_bytes_per_token: the bundles of the neurons a token read (neurons read x bundle_bytes), which the
    device bytes (/proc/<pid>/io) are set against."""
    ms = [s["ms"] for s in stats]
    read = [s["flash_read_bytes"] for s in stats]
    io_ms = [s["io_ms"] for s in stats]
    predicted = sum(s["neurons_predicted"] for s in stats)
    hits = sum(s["cache_hits"] for s in stats)
    needed = hits + sum(s["neurons_read"] for s in stats)  # neurons asked of the caches, as the daemon counts them
    io_s_total = sum(io_ms) / 1e3
    median_ms = _median(ms)
    return {
        "tokens": len(stats),
        "ms_per_token": median_ms,
        "tokens_per_s": 1e3 / median_ms if median_ms else math.nan,
        "flash_read_bytes_per_token": float(np.mean(read)) if read else 0.0,
        "flash_read_mib_per_token": float(np.mean(read)) / 2**20 if read else 0.0,
        "flash_read_fraction_of_ffn": float(np.mean(read)) / ffn_bytes if read else 0.0,
        "ffn_bytes": ffn_bytes,
        "cache_hit_rate": hits / needed if needed else None,
        "read_bandwidth_bytes_per_s": sum(read) / io_s_total if io_s_total > 0 else None,
        "io_ms": _median(io_ms),
        "compute_ms": _median([s["compute_ms"] for s in stats]),
        "wait_ms": _median([s.get("wait_ms", 0.0) for s in stats]),
        "neurons_predicted_per_token": predicted / len(stats) if stats else 0.0,
        "neurons_read_per_token": float(np.mean([s["neurons_read"] for s in stats])) if stats else 0.0,
        "neurons_computed_per_token": float(np.mean([s["neurons_computed"] for s in stats])) if stats else 0.0,
        **_device_vs_needed(read, [s["neurons_read"] * bundle_bytes for s in stats]),
    }


def _device_vs_needed(device_bytes: list[int], needed_bytes: list[int]) -> dict:
    needed = float(np.mean(needed_bytes)) if needed_bytes else 0.0
    device = float(np.mean(device_bytes)) if device_bytes else 0.0
    return {"device_bytes_per_token": device, "needed_bytes_per_token": needed,
            "device_bytes_per_needed_byte": device / needed if needed else None}


def save_read_sets(path: str, read_sets: list[tuple[int, np.ndarray]], steps: list[int], bundle_bytes: int) -> None:
    """(layer, ids) of each read as flat arrays: layers (reads,), steps (reads,) the decode step of each,
    lengths (reads,), ids (sum of lengths,)."""
    np.savez_compressed(path, layers=np.array([layer for layer, _ in read_sets], dtype=np.int32),
                        steps=np.array(steps, dtype=np.int32),
                        lengths=np.array([len(ids) for _, ids in read_sets], dtype=np.int64),
                        ids=np.concatenate([ids for _, ids in read_sets]).astype(np.int32),
                        bundle_bytes=np.int64(bundle_bytes))


def load_read_sets(path: str, max_steps: int | None = None) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The recorded reads (of the first max_steps decode steps that read) and the number of steps they came from."""
    data = np.load(path)
    bounds = np.concatenate(([0], np.cumsum(data["lengths"])))
    steps = np.unique(data["steps"])[:max_steps]  # (steps,)
    reads = [(int(layer), data["ids"][start:end])
             for layer, step, start, end in zip(data["layers"], data["steps"], bounds[:-1], bounds[1:])
             if step <= steps[-1]]
    return reads, len(steps)


class DecodeReadWatch:
    """The in-process reader's requests during the measured decode steps (the first step, and the prompt's
    whole-layer chunks before it, left out as token_stats[1:] leaves them out): the engine resets the FFN
    stats at the start of every decode step; on the second such reset the reader's stats are copied."""

    def __init__(self, engine: Engine, record_sets: bool = False):
        ffn = getattr(engine.executor, "ffn", None)
        self.reader = getattr(getattr(ffn, "prefetcher", None), "reader", None)
        self.start = None
        self.read_sets: list[tuple[int, np.ndarray]] = []  # (layer, store positions) of each measured neuron read
        self.read_steps: list[int] = []  # the decode step of each
        self.resets = [0]
        if self.reader is None:
            return
        if record_sets:
            original_start = self.reader.start_neuron_read

            def start_and_record(layer: int, neuron_ids: np.ndarray, bounded: bool = True):
                if self.start is not None:
                    self.read_sets.append((layer, np.array(neuron_ids, dtype=np.int32)))
                    self.read_steps.append(self.resets[0])
                return original_start(layer, neuron_ids, bounded)

            self.reader.start_neuron_read = start_and_record
        stats = ffn.stats
        original_reset, resets = stats.reset, self.resets

        def reset_and_mark() -> None:
            resets[0] += 1
            if resets[0] == 2:
                self.start = self.reader.stats.copy()
            original_reset()

        stats.reset = reset_and_mark

    def summary(self, tokens: int) -> dict | None:
        if self.reader is None or self.start is None or tokens <= 0:
            return None
        stats = self.reader.stats.since(self.start)
        return {"alignment_bytes": self.reader.alignment_bytes,
                "alignment_source": self.reader._file.alignment.source,
                "max_gap_bytes": self.reader.max_gap_bytes, "max_read_amplification": self.reader.max_read_amplification,
                "read_cost": {"request_s": self.reader.read_cost.request_s, "byte_s": self.reader.read_cost.byte_s,
                              "source": self.reader.read_cost.source},
                "requests_per_token": stats.requests / tokens,
                "planned_bytes_per_token": stats.read_bytes / tokens,
                "wanted_bytes_per_token": stats.useful_bytes / tokens,
                "mean_request_bytes": stats.read_bytes / stats.requests if stats.requests else None,
                "request_size_histogram": {str(size): count for size, count in stats.request_size_histogram().items()},
                "request_size_counts": stats.request_size_counts.tolist(),
                # wall time from a read's start to its finish: it overlaps compute, so this is a lower bound
                "achieved_bytes_per_s": stats.read_bytes / stats.read_time_s if stats.read_time_s else None}


def bench_engine_config(mode: str, runtime: str = "inproc", memory_bytes: int | None = None,
                        sparse: SparseOptions | None = None, resident_dtype: str | None = None,
                        threads: int | None = None) -> EngineConfig:
    """The EngineConfig of one bench run: one sequence at a time, the sparse settings only where they apply."""
    return EngineConfig(mode=mode, runtime=runtime, memory_budget_bytes=memory_bytes, max_batch=1,
                        resident_dtype=resident_dtype, threads=threads, sparse=sparse if mode == "sparse" else None)


def run_mode(store: str, config: EngineConfig, text_ids: list[int] | None, decode_tokens: int,
             record_sets: bool = False, record_reads: str | None = None) -> tuple[dict, list]:
    """record_reads: a .npz path where the neuron reads of the measured decode steps go (layer, ids per read),
    for `python -m flashllm.runtime.tools.read_plan_sim`."""
    mode, runtime = config.mode, config.runtime
    with Engine(store, config=config) as engine:
        ffn = getattr(engine.executor, "ffn", None)  # the worker runtime's FFN lives in another process
        if record_sets and hasattr(ffn, "recorded_sets"):
            ffn.recorded_sets = []
        result: dict = {"mode": mode, "runtime": runtime, "device": engine.executor.device,
                        "torch_threads": engine.threads, "head_precision": engine.config.head_precision}
        if engine.memory_plan is not None:
            result["memory_plan"] = engine.memory_plan.as_record()
            print(engine.memory_plan.describe(), file=sys.stderr)
        argmax: list[int] = []
        watch = DecodeReadWatch(engine, record_sets=record_reads is not None)
        if text_ids is not None and mode != "naive":
            nll, count, argmax = engine.teacher_forced(text_ids)
            result["perplexity"] = math.exp(nll / count)
            result["eval_tokens"] = count
        else:
            engine.generate([BENCH_PROMPT], SamplingParams(max_tokens=decode_tokens, ignore_eos=True))
        result.update(_summarize(engine.token_stats[1:], engine.manifest.ffn.total_bundle_bytes,
                                 engine.manifest.ffn.bundle_bytes))
        reads = watch.summary(len(engine.token_stats) - 1)
        if reads is not None:
            result["decode_reads"] = reads
        if record_reads is not None and watch.read_sets:
            save_read_sets(record_reads, watch.read_sets, watch.read_steps, engine.manifest.ffn.bundle_bytes)
            result["recorded_reads"] = record_reads
        sets = getattr(ffn, "recorded_sets", None) or []
    return result, (argmax, sets)


def paired_speed(store: str, runs: dict[str, EngineConfig], rounds: int, decode_tokens: int,
                 threads: int | None = None) -> dict:
    """ms/token of several engines measured in turns, so that they share the device's moods.

    This device's throughput drifts by tens of percent over minutes, so modes
    measured one after the other can differ by the drift alone. Here every
    engine is open at once and each round decodes the same prompt on each in
    turn; per round the median ms/token of every run, and the speed-up of each
    run over the first (the baseline), whose median is reported.
    runs: name → the EngineConfig of each engine (threads, when given, overrides theirs).
    """
    from contextlib import ExitStack

    names = list(runs)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        engines = {}
        for name, config in runs.items():
            config = config if threads is None else replace(config, threads=threads)
            engines[name] = stack.enter_context(Engine(store, config=config))
        for _ in range(rounds):
            for name, engine in engines.items():
                tokens = min(decode_tokens, NAIVE_MAX_TOKENS) if runs[name].mode == "naive" else decode_tokens
                first = len(engine.token_stats)
                engine.generate([BENCH_PROMPT], SamplingParams(max_tokens=tokens, ignore_eos=True))
                per_round[name].append(_median([st["ms"] for st in engine.token_stats[first + 1:]]))
    baseline = names[0]
    speedups = {name: [b / ms for b, ms in zip(per_round[baseline], per_round[name])] for name in names[1:]}
    return {"baseline": baseline, "rounds": rounds, "ms_per_token_per_round": per_round,
            "ms_per_token": {name: _median(values) for name, values in per_round.items()},
            f"speedup_over_{baseline}_per_round": speedups,
            f"speedup_over_{baseline}": {name: _median(values) for name, values in speedups.items()}}


def window_curve(recorded_sets: list[tuple[int, np.ndarray]], num_neurons: int, max_window: int = 10) -> list[dict]:
    """The paper's Fig. 4a from the predicted sets: per window k, the neurons held (aggregated usage)
    and the neurons a token must newly load (incremental transfer), as fractions of the FFN."""
    by_layer: dict[int, list[np.ndarray]] = {}
    for layer, ids in recorded_sets:
        by_layer.setdefault(layer, []).append(ids)
    curve = []
    for k in range(1, max_window + 1):
        usage, increment = [], []
        for sets in by_layer.values():
            for t in range(k, len(sets)):
                window = np.unique(np.concatenate(sets[t - k:t]))
                usage.append(np.union1d(window, sets[t]).size / num_neurons)
                increment.append(np.setdiff1d(sets[t], window, assume_unique=True).size / num_neurons)
        curve.append({"window": k, "aggregated_usage": float(np.mean(usage)) if usage else None,
                      "incremental_transfer": float(np.mean(increment)) if increment else None})
    return curve


def read_size_baseline(store: str, threads: int = 4, total_bytes: int = 16 << 20, repeats: int = 5) -> list[dict]:
    """Raw direct reads vs the bundle reader at the same request size and concurrency.

    For each target size the reader reads runs of neighbouring neurons about
    that long, spaced so that the planner cannot merge them; raw reads then use
    the reader's mean request size (aligned up) and as many reads in flight as
    the reader had (its threads; with AIO, its mean requests per call up to the
    queue depth), so both sides issue the same requests. The two alternate
    `repeats` times and each reports its median: this device's throughput
    drifts by tens of percent over seconds, and one back-to-back pair would
    measure the drift as much as the reader.
    """
    from flashllm.protocol.store_format import align_up, read_manifest
    from flashllm.workers.flash_io.bundle_reader import BundleReader, measure_direct_read_bandwidth, numpy_dtype_of_store

    manifest = read_manifest(store)
    layout = manifest.ffn
    path = os.path.join(store, layout.file)
    rows = []
    largest_region = max(region.length_bytes for region in layout.layers)
    total_bytes = min(total_bytes, layout.file_bytes)
    with BundleReader(store, layout, num_threads=threads) as reader:
        # a hole that stays wider than the merge gap after both ends are aligned outwards
        hole_neurons = -(-(reader.max_gap_bytes + 2 * reader.alignment_bytes) // layout.bundle_bytes) + 1

        # the bundles land in one preallocated matrix, as in a neuron cache, its pages touched before the
        # timing (a fresh array per call would add its page faults to the reader's time)
        largest_layer = max(region.num_neurons for region in layout.layers)
        out = np.empty((largest_layer, layout.stored_row_width), dtype=numpy_dtype_of_store(layout.dtype))
        out.fill(0)

        def reader_run(size: int, seed: int) -> tuple[float, float, int]:
            """(bytes/s, mean request bytes, reads in flight) of the reader at about `size` per request"""
            run = max(1, size // layout.bundle_bytes)
            reader.reset_stats()
            rng = np.random.default_rng(seed)
            calls = 0
            started = time.perf_counter()
            while reader.stats.read_bytes < total_bytes:
                calls += 1
                layer = int(rng.integers(len(layout.layers)))
                n = layout.layers[layer].num_neurons
                starts = np.arange(int(rng.integers(run + hole_neurons)), n - run, run + hole_neurons)
                ids = (starts[:, None] + np.arange(run)[None, :]).ravel()  # (k,)
                reader.read_neurons(layer, ids, out)
            elapsed = time.perf_counter() - started
            in_flight = reader.num_threads if reader.io_backend == "threads" else \
                max(1, min(reader.concurrency, round(reader.stats.requests / calls)))
            return reader.stats.read_bytes / elapsed, reader.stats.read_bytes / max(1, reader.stats.requests), in_flight

        for size in REQUEST_SIZES_BYTES:
            if size * 4 > largest_region:
                break  # a layer too small to hold several such requests: nothing to compare
            raw_runs, reader_runs = [], []
            for repeat in range(repeats):
                bandwidth, mean_request, in_flight = reader_run(size, seed=size + repeat)
                reader_runs.append(bandwidth)
                raw_size = align_up(round(mean_request), reader.alignment_bytes)
                raw_runs.append(measure_direct_read_bandwidth(path, raw_size, in_flight, total_bytes, seed=repeat,
                                                              io_backend=reader.io_backend))
            raw, reader_bw = _median(raw_runs), _median(reader_runs)
            rows.append({"request_bytes": raw_size, "reader_mean_request_bytes": mean_request,
                         "io_backend": reader.io_backend, "reads_in_flight": in_flight, "repeats": repeats,
                         "raw_bytes_per_s": raw, "reader_bytes_per_s": reader_bw,
                         "raw_runs_bytes_per_s": raw_runs, "reader_runs_bytes_per_s": reader_runs,
                         "reader_fraction_of_raw": reader_bw / raw})
    return rows


def _print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{header:>{len(header) + 2}}" for header, _, _ in columns))
    for row in rows:
        cells = []
        for header, key, fmt in columns:
            value = row.get(key)
            cells.append(f"{(format(value, fmt) if isinstance(value, (int, float)) else str(value)):>{len(header) + 2}}")
        print("  ".join(cells))


def _plots(report: dict, plots_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plots_dir, exist_ok=True)
    written = []
    curve = report.get("window_curve") or []
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [c["window"] for c in curve]
        ax.plot(ks, [100 * c["aggregated_usage"] for c in curve], "o-", label="aggregated usage (held in DRAM)")
        ax.plot(ks, [100 * c["incremental_transfer"] for c in curve], "s-", label="incremental transfer (per token)")
        ax.set_xlabel("window size k (tokens)")
        ax.set_ylabel("% of FFN neurons")
        ax.set_title("Sliding window (paper Fig. 4a)")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(plots_dir, "window_size.png"))
        fig.savefig(written[-1], dpi=120)
    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(modes)
    # side by side, not stacked: reads overlap compute, so io + compute + wait may exceed the token's time
    parts = [("token", "ms_per_token"), ("compute", "compute_ms"), ("flash I/O", "io_ms"), ("wait on I/O", "wait_ms")]
    positions = np.arange(len(names))
    width = 0.8 / len(parts)
    for index, (label, key) in enumerate(parts):
        ax.bar(positions + (index - (len(parts) - 1) / 2) * width, [modes[n][key] for n in names], width, label=label)
    ax.set_xticks(positions, names)
    ax.set_ylabel("ms per token (median)")
    ax.set_title("Latency split per mode")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(plots_dir, "latency_split.png"))
    fig.savefig(written[-1], dpi=120)
    baseline = report.get("direct_read_baseline") or []
    if baseline:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        sizes = [b["request_bytes"] / 1024 for b in baseline]
        ax.plot(sizes, [b["raw_bytes_per_s"] / 1e6 for b in baseline], "o-", label="raw direct reads")
        ax.plot(sizes, [b["reader_bytes_per_s"] / 1e6 for b in baseline], "s-", label="bundle reader")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request size (KiB)")
        ax.set_ylabel("MB/s")
        ax.set_title("Read size vs bandwidth")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(plots_dir, "read_bandwidth.png"))
        fig.savefig(written[-1], dpi=120)
    tradeoff = report.get("sparsity_tradeoff") or []
    if tradeoff:
        fig, ax1 = plt.subplots(figsize=(5, 3.5))
        xs = [100 * t["sparsity"] for t in tradeoff]
        ax1.plot(xs, [t["flash_read_bytes_per_token"] / 2**20 for t in tradeoff], "o-", color="tab:blue")
        ax1.set_xlabel("sparsity (% of neurons not predicted)")
        ax1.set_ylabel("MiB read per token", color="tab:blue")
        if all(t.get("perplexity") for t in tradeoff):
            ax2 = ax1.twinx()
            ax2.plot(xs, [t["perplexity"] for t in tradeoff], "s--", color="tab:red")
            ax2.set_ylabel("perplexity", color="tab:red")
        ax1.set_title("Sparsity trade-off")
        fig.tight_layout()
        written.append(os.path.join(plots_dir, "sparsity_tradeoff.png"))
        fig.savefig(written[-1], dpi=120)
    plt.close("all")
    return written


def peak_memory_runs(store: str, memory_bytes: int, runtimes: list[str], resident_dtype: str | None,
                     sparse_options: dict) -> dict:
    """The sparse mode's peak memory per runtime, all its processes together, as a memory cgroup counts it
    (runtime/tools/memory_cgroup.py): a real `flashllm generate` in a child process at the bench's budget,
    beside the bound (budget + one baseline per process + KV cache) x 1.1."""
    from flashllm.runtime.tools.memory_cgroup import measure_baselines, measure_generate, store_has_compiled_loops

    print("bench: peak memory (baselines, then a `flashllm generate` per runtime) ...", file=sys.stderr)
    baselines = measure_baselines(compiled_loops=store_has_compiled_loops(store))
    runs = {}
    extra = ["--resident-dtype", resident_dtype] if resident_dtype else []
    for option, value in sparse_options.items():  # the same sparse settings as the bench's own runs
        extra += [SPARSE_FLAGS[option], str(value)]
    for runtime in runtimes:
        try:
            runs[runtime] = measure_generate(store, "sparse", runtime, memory_bytes, extra_args=extra,
                                             baselines=baselines)
        except RuntimeError as exc:
            runs[runtime] = {"runtime": runtime, "error": str(exc)}
    return {"method": baselines.method, "baseline_torch_process_bytes": baselines.torch_process_bytes,
            "baseline_light_process_bytes": baselines.light_process_bytes, "runs": runs}


def _reader_io_backend(store: str) -> str:
    """How this machine's bundle reader keeps reads in flight for the store: 'aio' or 'threads'."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.bundle_reader import BundleReader

    with BundleReader(store, read_manifest(store).ffn) as reader:
        return reader.io_backend


def run_bench(store: str, modes: list[str], memory_bytes: int | None, decode_tokens: int, text: str | None,
              eval_tokens: int, keep_fractions: list[float], runtimes: list[str], read_baseline: bool = True,
              keep_fraction: float | None = None, resident_dtype: str | None = None, threads: int | None = None,
              paired_rounds: int = 0, window_tokens: int | None = None, missing_policy: str | None = None,
              compute_set: str | None = None,
              record_reads: str | None = None, peak_memory: bool = True, trace: TraceSpec | None = None,
              record_trace: str | None = None) -> dict:
    """resident_dtype, keep_fraction, window_tokens, missing_policy, compute_set and trace apply to the sparse
    runs (the ones the budget bounds; the trade-off varies keep_fraction); dense stays the exact reference.
    record_trace: a .npz path where the in-process sparse run's predicted sets go (`--trace recorded:FILE`)."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.runtime.core.tokenizer import Tokenizer

    manifest = read_manifest(store)
    # the options given, as the report names them
    sparse_options = {name: value for name, value in (
        ("keep_fraction", keep_fraction), ("window_tokens", window_tokens), ("missing_policy", missing_policy),
        ("compute_set", compute_set), ("trace", trace)) if value is not None}
    sparse = SparseOptions(**sparse_options) if sparse_options else None
    text_ids = None
    if text is not None:
        tokenizer = Tokenizer.from_store(store, manifest.tokenizer, manifest.arch.eos_token_ids)
        text_ids = tokenizer.encode(text)[: eval_tokens + 1]
    report: dict = {"store": os.path.abspath(store), "machine": platform.node(), "cpu_count": os.cpu_count(),
                    "memory_budget_bytes": memory_bytes, "ffn_bytes": manifest.ffn.total_bundle_bytes,
                    "store_bytes": sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)),
                    "reader_io_backend": _reader_io_backend(store), "sparse_resident_dtype": resident_dtype,
                    "decode_tokens": decode_tokens, "eval_tokens": len(text_ids) - 1 if text_ids else 0,
                    "sparse_options": {name: str(value) if name == "trace" else value
                                       for name, value in sparse_options.items()},
                    "dense_layers": manifest.sparsity.dense_layers if manifest.sparsity else [], "modes": {}}
    dense_argmax = None
    sets: list = []
    for mode in modes:
        for runtime in (runtimes if mode == "sparse" else ["inproc"]):
            key = mode if runtime == "inproc" else f"{mode}-{runtime}"
            print(f"bench: {key} ...", file=sys.stderr)
            budget = memory_bytes if mode == "sparse" else None
            tokens = min(decode_tokens, NAIVE_MAX_TOKENS) if mode == "naive" else decode_tokens
            config = bench_engine_config(mode, runtime, budget, sparse,
                                         resident_dtype if mode == "sparse" else None, threads)
            result, (argmax, recorded) = run_mode(store, config, text_ids, tokens,
                                                  record_sets=(mode == "sparse" and runtime == "inproc"),
                                                  record_reads=record_reads if (mode, runtime) == ("sparse", "inproc")
                                                  else None)
            if mode == "dense":
                dense_argmax = argmax
            elif argmax and dense_argmax:
                result["top1_agreement_with_dense"] = float(np.mean(np.array(argmax) == np.array(dense_argmax)))
            if recorded:
                sets = recorded
            report["modes"][key] = result
    if "sparse" in modes and keep_fractions:
        tradeoff = []
        main_run = report["modes"].get("sparse")
        main_keep = sparse_options.get("keep_fraction", 1.0 - manifest.sparsity.target_sparsity)
        if main_run is not None and main_keep not in keep_fractions:
            # the main in-process run is one more point of the curve, measured already
            tradeoff.append({"keep_fraction": main_keep, "sparsity": 1 - main_keep,
                             **{k: main_run.get(k) for k in (*TRADEOFF_KEYS, "top1_agreement_with_dense")}})
        for keep in keep_fractions:
            print(f"bench: sparse keep_fraction={keep} ...", file=sys.stderr)
            try:
                config = bench_engine_config("sparse", "inproc", memory_bytes,
                                             replace(sparse or SparseOptions(), keep_fraction=keep), resident_dtype,
                                             threads)
                result, (argmax, _) = run_mode(store, config, text_ids, decode_tokens)
            except MemoryPlanError as exc:
                tradeoff.append({"keep_fraction": keep, "sparsity": 1 - keep, "error": str(exc)})
                continue
            row = {"keep_fraction": keep, "sparsity": 1 - keep, **{k: result.get(k) for k in TRADEOFF_KEYS}}
            if argmax and dense_argmax:
                row["top1_agreement_with_dense"] = float(np.mean(np.array(argmax) == np.array(dense_argmax)))
            tradeoff.append(row)
        report["sparsity_tradeoff"] = sorted(tradeoff, key=lambda row: row["keep_fraction"])
    if sets:
        report["window_curve"] = window_curve(sets, manifest.arch.intermediate_size)
    if record_trace is not None:
        report["recorded_trace"] = _save_trace(record_trace, sets, manifest.arch.num_hidden_layers,
                                               manifest.arch.intermediate_size)
    if trace is not None:
        report["trace"] = trace_summary(trace, manifest, sparse or SparseOptions())
        new_bytes = report["trace"].get("new_bytes_per_token")
        for key, result in report["modes"].items():
            if new_bytes and key.startswith("sparse") and result.get("device_bytes_per_token") is not None:
                result["device_bytes_per_trace_new_byte"] = result["device_bytes_per_token"] / new_bytes
    if paired_rounds and "naive" in modes and "sparse" in modes:
        print(f"bench: naive and sparse in turns, {paired_rounds} rounds ...", file=sys.stderr)
        paired_runs = {"naive": bench_engine_config("naive")}
        for runtime in runtimes:
            paired_runs["sparse" if runtime == "inproc" else f"sparse-{runtime}"] = bench_engine_config(
                "sparse", runtime, memory_bytes, sparse, resident_dtype)
        report["paired_speed"] = paired_speed(store, paired_runs, paired_rounds, decode_tokens, threads=threads)
    if peak_memory and memory_bytes is not None and "sparse" in modes:
        report["peak_memory"] = peak_memory_runs(store, memory_bytes, runtimes, resident_dtype, sparse_options)
    if read_baseline:
        print("bench: read cost curve ...", file=sys.stderr)
        report["read_cost"] = read_cost_curve(store)
        for result in report["modes"].values():
            _compare_with_raw(result.get("decode_reads"), report["read_cost"])
        print("bench: direct-read baseline ...", file=sys.stderr)
        report["direct_read_baseline"] = read_size_baseline(store)
    return report


def _save_trace(path: str, sets: list[tuple[int, np.ndarray]], num_layers: int, num_neurons: int) -> str:
    """The sparse run's decode sets as a trace file: the steps whose every layer took the cached path."""
    from flashllm.workers.activation_trace import save_recorded_trace

    steps, step = [], []
    for layer, ids in sets:
        if layer == 0:
            step = []
        step.append(ids)
        if layer == num_layers - 1 and len(step) == num_layers:
            steps.append(step)
    if not steps:
        raise ValueError("--record-trace: the sparse run decoded no token through the neuron caches; give a "
                         "--memory the caches fit and --modes with sparse")
    save_recorded_trace(path, steps, num_neurons)
    return path


def trace_summary(trace: TraceSpec, manifest, options: SparseOptions) -> dict:
    """The trace the sparse runs replayed; for the paper's, the bytes of the neurons new per token (what a
    window of options.window_tokens tokens leaves to read) that the device bytes are set against."""
    summary: dict = {"spec": str(trace), "window_tokens": options.window_tokens}
    if trace.source == "paper":
        arch = manifest.arch
        new_neurons = round(trace.new_fraction * arch.intermediate_size) * arch.num_hidden_layers
        summary.update(active_fraction=trace.active_fraction, new_fraction=trace.new_fraction,
                       new_neurons_per_token=new_neurons,
                       new_bytes_per_token=new_neurons * manifest.ffn.bundle_bytes)
    return summary


def read_cost_curve(store: str) -> dict:
    """The device's direct-read cost per request size (raw AIO reads of the store's ffn.bin, 512 B..1 MiB) and
    its fit t = request_s + bytes * byte_s: the two numbers the planner's gap merging runs on (pass them as
    BundleReader(read_cost=...) where they differ from the default)."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.bundle_reader import measure_read_cost
    from flashllm.workers.flash_io.linux_aio import AioQueue, AioUnavailable
    from flashllm.workers.flash_io.read_cost import CURVE_QUEUE_DEPTH, DEFAULT_READ_COST

    path = os.path.join(store, read_manifest(store).ffn.file)
    try:
        AioQueue(1).close()
        backend = "aio"
    except AioUnavailable:
        backend = "threads"
    depth = CURVE_QUEUE_DEPTH if backend == "aio" else 4
    model, rows = measure_read_cost(path, depth, io_backend=backend)
    return {"io_backend": backend, "reads_in_flight": depth, "rows": rows,
            "fit": {"request_s": model.request_s, "byte_s": model.byte_s,
                    "break_even_gap_bytes": model.break_even_gap_bytes, "source": model.source},
            "default": {"request_s": DEFAULT_READ_COST.request_s, "byte_s": DEFAULT_READ_COST.byte_s,
                        "break_even_gap_bytes": DEFAULT_READ_COST.break_even_gap_bytes}}


def _compare_with_raw(decode_reads: dict | None, read_cost: dict) -> None:
    """Adds what raw direct reads of the same requests would take by the measured curve."""
    if not decode_reads or not decode_reads.get("requests_per_token"):
        return
    fit = read_cost["fit"]
    raw_s = decode_reads["requests_per_token"] * fit["request_s"] + decode_reads["planned_bytes_per_token"] * fit["byte_s"]
    decode_reads["raw_ms_per_token_at_these_sizes"] = raw_s * 1e3
    decode_reads["raw_bytes_per_s_at_these_sizes"] = decode_reads["planned_bytes_per_token"] / raw_s
    achieved = decode_reads.get("achieved_bytes_per_s")
    decode_reads["achieved_fraction_of_raw"] = achieved / decode_reads["raw_bytes_per_s_at_these_sizes"] \
        if achieved else None


def cmd_bench(args) -> int:
    from flashllm.runtime.core.engine_config import parse_memory

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("dense", "naive", "sparse"):
            raise ValueError(f"--modes: unknown mode {mode!r}; use dense, naive, sparse")
    text = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    keep_fractions = [float(x) for x in args.keep_fractions.split(",")] if args.keep_fractions else []
    if args.trace is not None and keep_fractions:
        raise ValueError("--keep-fractions does not apply with --trace: the trace's sets are the neurons each token "
                         "uses; vary --trace paper:active=A instead")
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    report = run_bench(args.store, modes, parse_memory(args.memory, args.store) if args.memory else None, args.tokens, text,
                       args.eval_tokens, keep_fractions, runtimes, read_baseline=not args.no_read_baseline,
                       keep_fraction=args.keep_fraction, resident_dtype=args.resident_dtype, threads=args.threads,
                       paired_rounds=args.paired_rounds, window_tokens=args.neuron_window,
                       missing_policy=args.missing_policy, compute_set=args.compute_set,
                       record_reads=args.record_reads,
                       peak_memory=not args.no_peak_memory, trace=args.trace, record_trace=args.record_trace)
    _print_table("modes", [dict(name=k, **v) for k, v in report["modes"].items()], [
        ("mode", "name", ""), ("ms/token", "ms_per_token", ".1f"), ("tok/s", "tokens_per_s", ".2f"),
        ("MiB read/token", "flash_read_mib_per_token", ".2f"), ("hit rate", "cache_hit_rate", ".3f"),
        ("io ms", "io_ms", ".1f"), ("compute ms", "compute_ms", ".1f"), ("wait ms", "wait_ms", ".1f"),
        ("ppl", "perplexity", ".3f"), ("top1 vs dense", "top1_agreement_with_dense", ".3f")])
    if report.get("sparsity_tradeoff"):
        _print_table("sparsity trade-off", report["sparsity_tradeoff"], [
            ("sparsity", "sparsity", ".2f"), ("bytes/token", "flash_read_bytes_per_token", ".0f"),
            ("ms/token", "ms_per_token", ".1f"), ("ppl", "perplexity", ".3f"),
            ("top1 vs dense", "top1_agreement_with_dense", ".3f")])
    if args.batch_invariance:
        report["batch_invariance"] = _batch_invariance_runs(args, runtimes)
    paired = report.get("paired_speed")
    if paired:
        baseline = paired["baseline"]
        speedups = paired[f"speedup_over_{baseline}"]
        _print_table(f"in turns, {paired['rounds']} rounds (medians)", [
            {"name": name, "ms": ms, "speedup": speedups.get(name, 1.0),
             "per_round": " ".join(f"{v:.0f}" for v in paired["ms_per_token_per_round"][name])}
            for name, ms in paired["ms_per_token"].items()], [
            ("run", "name", ""), ("ms/token", "ms", ".1f"), (f"x {baseline}", "speedup", ".2f"),
            ("ms/token per round", "per_round", "")])
    sparse_reads = [dict(name=k, **v, **(v.get("decode_reads") or {})) for k, v in report["modes"].items()
                     if v.get("needed_bytes_per_token")]
    if sparse_reads:
        _print_table("device bytes vs the needed neurons' bytes (decode)", sparse_reads, [
            ("mode", "name", ""), ("device B/token", "device_bytes_per_token", ".0f"),
            ("needed B/token", "needed_bytes_per_token", ".0f"), ("device/needed", "device_bytes_per_needed_byte", ".3f"),
            ("requests/token", "requests_per_token", ".1f"), ("mean request B", "mean_request_bytes", ".0f"),
            ("achieved MB/s", "achieved_bytes_per_s", ".3e"), ("raw MB/s same sizes", "raw_bytes_per_s_at_these_sizes", ".3e")])
        trace = report.get("trace")
        if trace and trace.get("new_bytes_per_token"):
            print(f"  trace {trace['spec']}: {trace['new_bytes_per_token']:.0f} B/token of new neurons (window "
                  f"{trace['window_tokens']}); device/new: "
                  + ", ".join(f"{row['name']} {row['device_bytes_per_trace_new_byte']:.3f}" for row in sparse_reads
                              if row.get("device_bytes_per_trace_new_byte") is not None))
        for row in sparse_reads:
            if row.get("request_size_histogram"):
                print(f"  {row['name']} requests by size (<= bytes: count): "
                      + ", ".join(f"{size}: {count}" for size, count in row["request_size_histogram"].items()))
    if report.get("read_cost"):
        cost = report["read_cost"]
        _print_table(f"read cost curve ({cost['io_backend']}, {cost['reads_in_flight']} in flight)", cost["rows"], [
            ("request bytes", "request_bytes", "d"), ("s/request", "seconds_per_request", ".2e"),
            ("MB/s", "bytes_per_s", ".3e")])
        fit = cost["fit"]
        print(f"  fit: {fit['request_s'] * 1e6:.1f} us/request + {fit['byte_s'] * 1e9:.3f} ns/byte: merging a gap "
              f"pays below {fit['break_even_gap_bytes']} bytes (default model: "
              f"{cost['default']['break_even_gap_bytes']})")
    peak = report.get("peak_memory")
    if peak:
        mib = 2**20
        print(f"\nbaseline per process before the store is loaded ({peak['method']}): "
              f"{peak['baseline_torch_process_bytes'] / mib:.1f} MiB with torch, "
              f"{peak['baseline_light_process_bytes'] / mib:.1f} MiB without")
        _print_table("peak memory, all processes (sparse, `flashllm generate`)", [
            {"name": name, **{k: (v / mib if k.endswith("_bytes") and isinstance(v, (int, float)) else v)
                              for k, v in run.items()}} for name, run in peak["runs"].items()], [
            ("runtime", "name", ""), ("--memory MiB", "memory_budget_bytes", ".1f"), ("peak MiB", "peak_bytes", ".1f"),
            ("KV MiB", "kv_cache_bytes", ".1f"), ("bound MiB", "bound_bytes", ".1f"),
            ("within", "within_bound", ""), ("error", "error", "")])
    if report.get("direct_read_baseline"):
        _print_table("direct reads: raw vs reader", report["direct_read_baseline"], [
            ("request bytes", "request_bytes", "d"), ("in flight", "reads_in_flight", "d"),
            ("raw MB/s", "raw_bytes_per_s", ".3e"),
            ("reader MB/s", "reader_bytes_per_s", ".3e"), ("reader/raw", "reader_fraction_of_raw", ".2f")])
    if args.plots:
        report["plots"] = _plots(report, args.plots)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


def _batch_invariance_runs(args, runtimes: list[str]) -> list[dict]:
    """--batch-invariance B: per runtime, ms/token of a batch of B with each sequence computing its own
    neurons against the batch's union (runtime/tools/batch_invariance_bench.py); prints the table."""
    from flashllm.runtime.core.engine_config import parse_size
    from flashllm.runtime.tools.batch_invariance_bench import batch_invariance_cost

    sparse = SparseOptions(**{name: value for name, value in (
        ("keep_fraction", args.keep_fraction), ("window_tokens", args.neuron_window),
        ("missing_policy", args.missing_policy), ("compute_set", args.compute_set)) if value is not None})
    memory_bytes = parse_size(args.memory) if args.memory else None
    runs = [batch_invariance_cost(args.store, bench_engine_config("sparse", runtime, memory_bytes, sparse,
                                                                  args.resident_dtype, args.threads),
                                  args.batch_invariance, args.tokens, max(1, args.paired_rounds))
            for runtime in runtimes]
    rows = [{"runtime": run["runtime"] if name != "dense" else "inproc", "run": name,
             "step_ms": run["step_ms"].get(name), "ms_per_token": run["ms_per_token"].get(name),
             "identical": f"{run['identical_to_single_runs'][name]}/{run['batch']}",
             "prefix": run["mean_tokens_before_a_difference"][name]}
            for run in runs for name in run["identical_to_single_runs"]]
    _print_table(f"batch of {args.batch_invariance}: own neurons (invariant) vs the batch's union (medians of "
                 f"{max(1, args.paired_rounds)} rounds in turns)", rows, [
        ("runtime", "runtime", ""), ("run", "run", ""), ("ms/step", "step_ms", ".1f"),
        ("ms/token", "ms_per_token", ".2f"), ("same tokens as alone", "identical", ""),
        ("tokens before a difference", "prefix", ".1f")])
    return runs


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register_cli(sub) -> None:
    from flashllm.runtime.clients.cli import add_sparse_policy_args, add_threads_arg

    p = sub.add_parser("bench", help="measure dense, naive and sparse modes (JSON + tables + plots)")
    p.add_argument("--store", required=True)
    p.add_argument("--modes", default="dense,naive,sparse")
    p.add_argument("--memory", help="memory budget for the sparse mode: a size (330MiB) or a share of the model's "
                   "bytes in the store (60%%)")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per mode without --text")
    p.add_argument("--text", help="evaluation text: perplexity and top-1 agreement through the decode path")
    p.add_argument("--eval-tokens", type=int, default=512, help="tokens of --text to feed")
    p.add_argument("--keep-fraction", type=float, help="sparse mode: fraction of neurons predicted per token "
                   "(default: 1 - the calibrated sparsity)")
    p.add_argument("--keep-fractions", default="", help="sparsity trade-off: comma-separated keep fractions")
    p.add_argument("--resident-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="sparse mode: hold resident matrices in this dtype (float16 halves them); dense stays exact")
    add_sparse_policy_args(p)
    p.add_argument("--runtimes", default="inproc", help="inproc,workers: runtimes to measure the sparse mode with")
    add_threads_arg(p)
    p.add_argument("--paired-rounds", type=_non_negative_int, default=3,
                   help="with naive and sparse: decode on every engine in turn this many rounds, so the speed-up "
                        "over naive is measured under the same device conditions (0: off)")
    p.add_argument("--no-read-baseline", action="store_true", help="skip the raw direct-read measurements "
                   "(the read cost curve and the raw-vs-reader table)")
    p.add_argument("--record-reads", help="write the in-process sparse run's decode neuron reads to this .npz "
                   "(replay them with python -m flashllm.runtime.tools.read_plan_sim)")
    p.add_argument("--record-trace", metavar="FILE.npz",
                   help="write the in-process sparse run's predicted sets as an activation trace, to replay on "
                        "another store (e.g. a `flashllm synth` one) with --trace recorded:FILE.npz")
    p.add_argument("--no-peak-memory", action="store_true",
                   help="skip measuring the sparse runs' peak memory in a memory cgroup (a `flashllm generate` "
                        "per runtime in a child process)")
    p.add_argument("--batch-invariance", type=_non_negative_int, default=0, metavar="B",
                   help="sparse mode: also decode a batch of B prompts with each sequence computing only its own "
                        "neurons (the default) and with the batch's union, in turns (--paired-rounds rounds of "
                        "--tokens tokens): ms/token of each, and how many sequences keep their single run's "
                        "tokens (0: off)")
    p.add_argument("--json", required=True, help="output JSON path")
    p.add_argument("--plots", help="directory for PNG plots")
    p.set_defaults(func=cmd_bench)
