"""What checking FFN reads against their checksums costs: sparse decode ms/token with the check on and off.

    python -m flashllm.runtime.tools.verify_reads_bench --store STORE --memory 343MiB --json out.json

Each round builds a sparse engine with the check on and one with it off (in
turns, order swapped every round, the same greedy prompt), and takes each
one's median decode ms/token; the table gives the medians over rounds and the
difference. Beside it, the hashing alone: xxh3 over as many bundles as a
token read, timed on those rows (what the check adds per token when nothing
else competes for the core).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

PROMPT = "The history of the printing press begins"


def measure(store: str, memory: str | None, tokens: int, verify: bool, runtime: str) -> dict:
    from flashllm.runtime.core.engine import Engine
    from flashllm.runtime.core.engine_config import EngineConfig, parse_size
    from flashllm.runtime.core.sampling import SamplingParams
    from flashllm.workers.flash_io.integrity import VERIFY_READS_ENV

    os.environ[VERIFY_READS_ENV] = "1" if verify else "0"
    config = EngineConfig(mode="sparse", runtime=runtime, memory_budget_bytes=parse_size(memory) if memory else None)
    with Engine(store, config=config) as engine:
        result = engine.generate([PROMPT], SamplingParams(max_tokens=tokens, ignore_eos=True))[0]
    decode = result.token_stats
    return {"verify": verify, "ms_per_token": result.ms_per_token,
            "flash_read_bytes_per_token": statistics.mean(s["flash_read_bytes"] for s in decode),
            "tokens": result.tokens}


def hash_ms_per_token(store: str, rows_per_token: float, repeats: int = 20) -> float:
    """xxh3 over rows_per_token bundles of layer 0 (the check's own work per token), median ms."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.bundle_reader import numpy_dtype_of_store
    from flashllm.workers.flash_io.integrity import bundle_digests

    layout = read_manifest(store).ffn
    region = layout.layers[0]
    with open(os.path.join(store, layout.file), "rb") as f:
        f.seek(region.offset_bytes)
        rows = np.frombuffer(f.read(region.length_bytes), dtype=numpy_dtype_of_store(layout.dtype))
    rows = rows.reshape(region.num_neurons, -1)  # (n_ff, E)
    count = max(1, int(round(rows_per_token)))
    picks = rows[np.arange(count) % region.num_neurons]  # (count, E)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        bundle_digests(picks)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify_reads_bench", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a calibrated store with checksums (from `flashllm convert`)")
    p.add_argument("--memory", default=None, help="sparse memory budget, e.g. 343MiB (small enough that tokens read)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", default="inproc", choices=["inproc", "workers"])
    p.add_argument("--json", required=True, help="file to write the measurements to")
    args = p.parse_args(argv)

    runs = []
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for verify in order:
            run = measure(args.store, args.memory, args.tokens, verify, args.runtime)
            run["round"] = round_index
            runs.append(run)
            print(f"round {round_index} verify {'on ' if verify else 'off'}: {run['ms_per_token']:.1f} ms/token, "
                  f"{run['flash_read_bytes_per_token'] / 2**20:.2f} MiB read/token", file=sys.stderr)
    on = statistics.median(r["ms_per_token"] for r in runs if r["verify"])
    off = statistics.median(r["ms_per_token"] for r in runs if not r["verify"])
    same_tokens = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    from flashllm.protocol.store_format import read_manifest

    bundle_bytes = read_manifest(args.store).ffn.bundle_bytes
    read_per_token = statistics.median(r["flash_read_bytes_per_token"] for r in runs)
    hashing_ms = hash_ms_per_token(args.store, read_per_token / bundle_bytes)
    summary = {"ms_per_token_verify_on": on, "ms_per_token_verify_off": off, "difference_ms": on - off,
               "difference_percent": (on - off) / off * 100, "hash_ms_per_token": hashing_ms,
               "hash_percent_of_token": hashing_ms / off * 100, "flash_read_bytes_per_token": read_per_token,
               "same_tokens": same_tokens, "runtime": args.runtime, "memory": args.memory, "tokens": args.tokens,
               "rounds": args.rounds}
    print(f"{'check':>6} {'ms/token':>9}\n{'on':>6} {on:9.1f}\n{'off':>6} {off:9.1f}\n"
          f"difference {on - off:+.1f} ms/token ({(on - off) / off * 100:+.1f}%); hashing alone "
          f"{hashing_ms:.2f} ms/token ({hashing_ms / off * 100:.1f}%) for {read_per_token / 2**20:.2f} MiB read/token; "
          f"same tokens on and off: {same_tokens}")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
