"""Replay recorded neuron reads through the read planner under other layouts and policies.

`flashllm bench --record-reads R.npz` records which neurons each decode step
read (store positions, per layer). The ids do not depend on how a bundle is
stored, so the same reads tell what a float16 (3,456 B), quantized (1,008 B unpadded)
or float32 (6,912 B) store would cost the device under:

- alignment: 4096 (the old request alignment) or 512 (what this disk's
  statx reports);
- layout: bundles packed back to back, or each padded to a multiple of 512
  (a bundle then never straddles more blocks than its size needs);
- gap merging: none, the cost model's break-even gap with no byte bound, or
  with the planner's default byte bound.

Prints, per case, device bytes / needed bytes (needed = neurons x the
bundle's own bytes), requests per token, and the read time per token the cost
model predicts; `--measure STORE` also times the real reader on the recorded
reads of a store whose bundles have that size (packed only: it is the store's
layout). Writes JSON with --json.

    python -m flashllm.runtime.tools.read_plan_sim --reads R.npz [--measure STORE] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from flashllm.protocol.store_format import align_up
from flashllm.workers.flash_io.bundle_reader import DEFAULT_MAX_READ_AMPLIFICATION, _plan_read_arrays, max_read_bytes_for
from flashllm.workers.flash_io.read_cost import DEFAULT_READ_COST, ReadCostModel

# bundle bytes of the demo model (d=576): float16, q4_1 gate + q4_1 up + 4-bit down values (unpadded), float32
BUNDLE_SIZES_BYTES = {"float16": 3456, "quantized": 1008, "float32": 6912}
REGION_ALIGNMENT_BYTES = 4096  # every layer region starts on a 4 KiB boundary (store_format)


def simulate(read_sets: list[tuple[int, np.ndarray]], tokens: int, bundle_bytes: int, slot_bytes: int,
             alignment_bytes: int, max_gap_bytes: int, max_read_amplification: float | None,
             read_cost: ReadCostModel, num_neurons: int) -> dict:
    """Plan every recorded read with bundles `slot_bytes` apart (slot_bytes > bundle_bytes: padded) and sum."""
    region_bytes = align_up(num_neurons * slot_bytes, REGION_ALIGNMENT_BYTES)
    requests = read_bytes = needed_bytes = 0
    for layer, ids in read_sets:
        sorted_ids = np.unique(ids)
        offsets, lengths, _, _ = _plan_read_arrays(
            sorted_ids, layer * region_bytes, slot_bytes, alignment_bytes, max_gap_bytes, 1 << 20,
            max_read_bytes_for(len(sorted_ids), bundle_bytes, max_read_amplification))
        requests += len(offsets)
        read_bytes += int(lengths.sum())
        needed_bytes += len(sorted_ids) * bundle_bytes
    return {"bundle_bytes": bundle_bytes, "slot_bytes": slot_bytes, "alignment_bytes": alignment_bytes,
            "max_gap_bytes": max_gap_bytes, "max_read_amplification": max_read_amplification,
            "device_bytes_per_needed_byte": read_bytes / needed_bytes if needed_bytes else None,
            "device_bytes_per_token": read_bytes / tokens, "needed_bytes_per_token": needed_bytes / tokens,
            "requests_per_token": requests / tokens,
            "model_read_ms_per_token": (requests * read_cost.request_s + read_bytes * read_cost.byte_s) / tokens * 1e3,
            "store_ffn_bytes_per_neuron": slot_bytes}


def policies(read_cost: ReadCostModel) -> dict[str, tuple[int, int, float | None]]:
    """name -> (alignment, max gap, byte bound)"""
    return {
        "before (4 KiB, 8 KiB gaps, no bound)": (4096, 8192, None),
        "512 B, no gap read": (512, 0, None),
        "512 B, break-even gaps, no bound": (512, read_cost.break_even_gap_bytes, None),
        f"512 B, break-even gaps, bound {DEFAULT_MAX_READ_AMPLIFICATION}x (default)":
            (512, read_cost.break_even_gap_bytes, DEFAULT_MAX_READ_AMPLIFICATION),
    }


def measure(store: str, read_sets: list[tuple[int, np.ndarray]], tokens: int, rounds: int = 3) -> list[dict]:
    """The real reader on the recorded reads, per policy (the store's own packed layout), in turns:
    median over rounds of ms/token (read only) and /proc/self/io bytes per token."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.bundle_reader import BundleReader, numpy_dtype_of_store
    from flashllm.workers.flash_io.io_counters import process_read_bytes

    layout = read_manifest(store).ffn
    out = np.empty((max(region.num_neurons for region in layout.layers), layout.bundle_elements),
                   dtype=numpy_dtype_of_store(layout.dtype))
    out.fill(0)
    cases = {"4 KiB alignment, 8 KiB gaps, no bound (before)": dict(max_gap_bytes=8192, max_read_amplification=None,
                                                                  force_4k=True),
             "512 B, no gap read": dict(max_gap_bytes=0, max_read_amplification=None),
             "512 B, break-even gaps, no bound": dict(max_read_amplification=None),
             "512 B, break-even gaps, default bound": dict()}
    readers = {}
    for name, options in cases.items():
        force_4k = options.pop("force_4k", False)
        reader = BundleReader(store, layout, **options)
        if force_4k:
            reader.alignment_bytes = 4096  # what the reader assumed before it asked the file
        readers[name] = reader
    per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    try:
        for _ in range(rounds):
            for name, reader in readers.items():
                before_bytes, started_s = process_read_bytes(), time.perf_counter()
                for layer, ids in read_sets:
                    reader.read_neurons(layer, np.sort(ids), out[: len(ids)])
                elapsed_s = time.perf_counter() - started_s
                per_round[name].append((elapsed_s * 1e3 / tokens, (process_read_bytes() - before_bytes) / tokens))
    finally:
        for reader in readers.values():
            reader.close()
    needed = sum(len(ids) for _, ids in read_sets) * layout.bundle_bytes / tokens
    return [{"case": name, "bundle_bytes": layout.bundle_bytes,
             "read_ms_per_token": float(np.median([ms for ms, _ in runs])),
             "read_ms_per_token_runs": [ms for ms, _ in runs],
             "device_bytes_per_token": float(np.median([b for _, b in runs])),
             "device_bytes_per_needed_byte": float(np.median([b for _, b in runs])) / needed}
            for name, runs in per_round.items()]


def main(argv: list[str] | None = None) -> int:
    from flashllm.runtime.tools.bench import load_read_sets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", required=True, help=".npz from `flashllm bench --record-reads`")
    parser.add_argument("--neurons", type=int, default=1536, help="FFN neurons per layer of the recorded model")
    parser.add_argument("--request-us", type=float, help="read cost: microseconds per request (default: the model's)")
    parser.add_argument("--byte-ns", type=float, help="read cost: nanoseconds per byte (default: the model's)")
    parser.add_argument("--measure", help="a store to time the real reader on (its own bundle size, packed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, help="replay only the first N recorded decode steps")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    read_sets, tokens = load_read_sets(args.reads, args.tokens)
    read_cost = DEFAULT_READ_COST
    if args.request_us is not None or args.byte_ns is not None:
        read_cost = ReadCostModel((args.request_us or read_cost.request_s * 1e6) * 1e-6,
                                  (args.byte_ns or read_cost.byte_s * 1e9) * 1e-9, "command line")
    rows = []
    for kind, bundle_bytes in BUNDLE_SIZES_BYTES.items():
        for layout_name, slot_bytes in (("packed", bundle_bytes), ("padded to 512", align_up(bundle_bytes, 512))):
            for policy, (alignment, gap, bound) in policies(read_cost).items():
                if layout_name != "packed" and alignment != 512:
                    continue
                row = simulate(read_sets, tokens, bundle_bytes, slot_bytes, alignment, gap, bound, read_cost,
                               args.neurons)
                rows.append({"store": kind, "layout": layout_name, "policy": policy, **row})
    print(f"{len(read_sets)} reads over ~{tokens} tokens; cost model {read_cost.request_s * 1e6:.1f} us/request + "
          f"{read_cost.byte_s * 1e9:.3f} ns/byte (break-even gap {read_cost.break_even_gap_bytes} B)")
    print(f"{'store':>9} {'layout':>14} {'policy':>52} {'dev/needed':>10} {'req/token':>9} {'KiB/token':>9} {'model ms':>8}")
    for row in rows:
        print(f"{row['store']:>9} {row['layout']:>14} {row['policy']:>52} {row['device_bytes_per_needed_byte']:>10.3f} "
              f"{row['requests_per_token']:>9.1f} {row['device_bytes_per_token'] / 1024:>9.1f} "
              f"{row['model_read_ms_per_token']:>8.2f}")
    report = {"reads": args.reads, "tokens": tokens, "read_cost": vars(read_cost), "simulated": rows}
    if args.measure:
        report["measured"] = measure(args.measure, read_sets, tokens, args.rounds)
        print(f"\nreal reader on {args.measure} ({args.rounds} rounds in turns, medians)")
        for row in report["measured"]:
            print(f"  {row['case']:>50}: {row['read_ms_per_token']:.2f} ms/token, "
                  f"{row['device_bytes_per_token'] / 1024:.1f} KiB/token, device/needed "
                  f"{row['device_bytes_per_needed_byte']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
