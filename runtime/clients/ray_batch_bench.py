"""Throughput of `flashllm batch --ray` by replica count: what spreading a batch over engines buys.

    python -m flashllm.runtime.clients.ray_batch_bench --store stores/smollm2 --replicas 1,2 \
        --prompts 24 --prompt-tokens 64 --max-tokens 32 --json bench-out/ray_batch.json

Writes a JSONL of --prompts prompts of exactly --prompt-tokens tokens each (as
the engine counts them), then runs the real command, `flashllm batch ... --ray
ADDRESS --replicas R --threads-per-replica T --ignore-eos --json`, once per
replica count and round, in turns; each run's tokens/s is its generated
tokens over the time from the first prompt sent to the last line written
(starting Ray and loading the engines is reported apart). Prints a table with
each count's median tokens/s and its speed-up over the first count, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from flashllm.runtime.clients.cli import CliError

PROMPT_TOPICS = ["the sea", "a lighthouse", "flash memory", "a long train journey", "the moon", "an old library",
                 "a mountain village", "a clockmaker"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashllm.runtime.clients.ray_batch_bench",
                                description="tokens/s of `flashllm batch --ray` by replica count")
    p.add_argument("--store", required=True)
    p.add_argument("--ray", default="local", help="cluster address, auto, or local (default: a private local Ray)")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default 1,2)")
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (EOS ignored)")
    p.add_argument("--max-batch", type=int, default=8, help="requests each replica decodes together")
    p.add_argument("--rounds", type=int, default=1, help="runs of each replica count, in turns")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args(argv)


def prompts_of_exactly(store: str, count: int, tokens: int) -> list[str]:
    """`count` different prompts that the engine encodes to exactly `tokens` tokens (its BOS included)."""
    from flashllm.runtime.core.tokenizer import Tokenizer
    from flashllm.workers.store_reader import open_store

    manifest = open_store(store)
    tokenizer = Tokenizer.from_store(store, manifest.tokenizer, manifest.arch.eos_token_ids)
    prompts = []
    for i in range(count):
        topic = PROMPT_TOPICS[i % len(PROMPT_TOPICS)]
        text = f"Story {i}: " + " ".join(f"Tell me about {topic}, part {n}." for n in range(tokens))
        ids = tokenizer.encode(text)
        cut = tokens
        while cut > 0:  # decoding a cut and encoding it again may merge differently: shorten until it is exact
            candidate = tokenizer.decode(ids[:cut])
            if len(tokenizer.encode(candidate)) == tokens:
                prompts.append(candidate)
                break
            cut -= 1
        else:
            raise CliError(f"could not make a prompt of exactly {tokens} tokens")
    return prompts


def run_once(args, prompts_path: str, replicas: int, folder: str, run: int) -> dict:
    out = os.path.join(folder, f"out-{replicas}-{run}.jsonl")
    command = ["flashllm", "batch", prompts_path, "--out", out, "--store", args.store, "--ray", args.ray,
               "--replicas", str(replicas), "--threads-per-replica", str(args.threads_per_replica),
               "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens), "--ignore-eos",
               "--quiet", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CliError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    summary = json.loads(result.stdout)
    with open(out, encoding="utf-8") as f:
        prompt_tokens = {json.loads(line)["usage"]["prompt_tokens"] for line in f}
    return {"replicas": replicas, "round": run, "tokens": summary["tokens"], "wall_s": summary["wall_s"],
            "startup_s": summary["startup_s"], "tokens_per_s": summary["tokens_per_s"],
            "nodes": summary["nodes"], "prompt_tokens": sorted(prompt_tokens),
            "per_replica_tokens_per_s": [r["tokens_per_s"] for r in summary["per_replica"]]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(part) for part in args.replicas.split(",") if part.strip()]
    with tempfile.TemporaryDirectory(prefix="flashllm-ray-bench-") as folder:
        prompts_path = os.path.join(folder, "prompts.jsonl")
        with open(prompts_path, "w", encoding="utf-8") as f:
            for i, prompt in enumerate(prompts_of_exactly(args.store, args.prompts, args.prompt_tokens)):
                f.write(json.dumps({"id": i, "prompt": prompt}) + "\n")
        runs = []
        for run in range(args.rounds):
            for replicas in counts:
                runs.append(run_once(args, prompts_path, replicas, folder, run))
                print(f"round {run}: {replicas} replicas: {runs[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    median = {n: statistics.median(r["tokens_per_s"] for r in runs if r["replicas"] == n) for n in counts}
    print(f"{'replicas':>8} {'threads':>7} {'tokens/s':>9} {'speed-up':>8} {'startup s':>9}")
    for n in counts:
        startup_s = statistics.median(r["startup_s"] for r in runs if r["replicas"] == n)
        print(f"{n:>8} {args.threads_per_replica:>7} {median[n]:>9.1f} {median[n] / median[counts[0]]:>7.2f}x "
              f"{startup_s:>9.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "runs": runs, "median_tokens_per_s": median,
                       "speedup": {n: median[n] / median[counts[0]] for n in counts}}, f, indent=2)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CliError as error:
        print(f"ray_batch_bench: error: {error}", file=sys.stderr)
        sys.exit(2)
