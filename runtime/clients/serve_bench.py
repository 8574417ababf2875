"""`flashllm bench-serve`: tokens/s of a running daemon at several concurrencies (the continuous-batching payoff).

    flashllm bench-serve --socket /tmp/flashllm.sock --concurrency 1,4,16 --requests 32 --max-tokens 64 --json out.json
    flashllm bench-serve --http unix:/tmp/flashllm-http.sock ...     the same through the OpenAI HTTP API

At each concurrency C, `max(requests, C)` greedy requests of exactly
--max-tokens tokens (ignore_eos) are sent with C in flight at any time; the
throughput is all their tokens over the wall time from the first send to the
last final. A warm-up request runs first. Prints a table, writes JSON.

With --http ADDRESS (unix:/path or HOST:PORT, --api-key-file if the daemon
wants a key) every request is a streamed POST /v1/completions (ignore_eos,
temperature 0, usage in the last chunk); time to first token is measured by
this client, so it includes the HTTP path.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from flashllm.runtime.clients.cli import CliError

PROMPT_TOPICS = ["the sea", "a lighthouse", "flash memory", "a long train journey", "the moon", "an old library",
                 "a mountain village", "a clockmaker"]


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-serve", help="throughput of a running daemon at 1, 4, 16... concurrent requests")
    p.add_argument("--socket", help="the daemon's ipc socket path")
    p.add_argument("--http", help="bench the daemon's OpenAI HTTP API instead: unix:/path/to.sock or HOST:PORT")
    p.add_argument("--api-key-file", help="with --http: file holding the daemon's API key")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrencies (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=cmd_bench_serve)


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise CliError(f"--concurrency {text!r} is invalid: give positive integers like 1,4,16")
    return values


def prompt_for(index: int) -> str:
    return f"Write a short story about {PROMPT_TOPICS[index % len(PROMPT_TOPICS)]}. Story {index}:"


async def run_level(client, concurrency: int, requests: int, max_tokens: int) -> dict:
    """Run `requests` requests with `concurrency` in flight; tokens/s over the wall time."""
    next_index = iter(range(requests))
    finals = []

    async def worker() -> None:
        for index in next_index:
            finals.append(await client.generate(prompt_for(index), max_tokens=max_tokens, ignore_eos=True))

    start_s = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - start_s
    tokens = sum(f.usage.completion_tokens for f in finals)
    return {"concurrency": concurrency, "requests": len(finals), "tokens": tokens, "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s,
            "mean_time_to_first_token_ms": statistics.fmean(f.timings.time_to_first_token_ms for f in finals),
            "mean_request_decode_tokens_per_s": statistics.fmean(f.timings.decode_tokens_per_s for f in finals)}


async def bench(socket_path: str, concurrencies: list[int], requests: int, max_tokens: int) -> dict:
    from flashllm.runtime.clients.client import AsyncClient

    async with AsyncClient(socket_path, timeout_s=600) as client:
        status = await client.status()
        await client.generate(prompt_for(0), max_tokens=min(max_tokens, 8), ignore_eos=True)  # warm-up
        levels = []
        for concurrency in concurrencies:
            levels.append(await run_level(client, concurrency, max(requests, concurrency), max_tokens))
    return _with_speedups({"model": status.model, "mode": status.mode, "max_batch": status.max_batch,
                           "max_tokens": max_tokens, "transport": "zeromq", "levels": levels})


async def bench_http(address: str, api_key: str | None, concurrencies: list[int], requests: int,
                     max_tokens: int) -> dict:
    from flashllm.runtime.clients.openai_http import OpenAIHttpClient

    async with OpenAIHttpClient(address, api_key) as client:
        card = await client.model_card()
        await client.stream_completion(card["id"], prompt_for(0), min(max_tokens, 8))  # warm-up
        levels = []
        for concurrency in concurrencies:
            levels.append(await run_http_level(client, card["id"], concurrency, max(requests, concurrency),
                                               max_tokens))
    meta = card.get("flashllm", {})
    return _with_speedups({"model": card["id"], "mode": meta.get("mode", "?"), "max_batch": meta.get("max_batch"),
                           "max_tokens": max_tokens, "transport": "http", "levels": levels})


async def run_http_level(client, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    next_index = iter(range(requests))
    results = []

    async def worker() -> None:
        for index in next_index:
            results.append(await client.stream_completion(model, prompt_for(index), max_tokens))

    start_s = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - start_s
    tokens = sum(r.completion_tokens for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s,
            "mean_time_to_first_token_ms": statistics.fmean(r.time_to_first_token_s * 1e3 for r in results),
            "mean_request_decode_tokens_per_s": statistics.fmean(r.decode_tokens_per_s for r in results)}


def _with_speedups(result: dict) -> dict:
    levels = result["levels"]
    base = next((lv["tokens_per_s"] for lv in levels if lv["concurrency"] == 1), None)
    for level in levels:
        level["speedup_vs_1"] = level["tokens_per_s"] / base if base else None
    return result


def cmd_bench_serve(args) -> int:
    from flashllm.runtime.clients.client import ClientError

    concurrencies = _concurrencies(args.concurrency)
    if args.requests < 1 or args.max_tokens < 1:
        raise CliError("--requests and --max-tokens must be at least 1")
    if bool(args.socket) == bool(args.http):
        raise CliError("give exactly one of --socket PATH (ZeroMQ) or --http ADDRESS (the OpenAI HTTP API)")
    try:
        if args.http:
            from flashllm.runtime.clients.openai_http import HttpClientError, read_key_file

            api_key = read_key_file(args.api_key_file) if args.api_key_file else None
            try:
                result = asyncio.run(bench_http(args.http, api_key, concurrencies, args.requests, args.max_tokens))
            except HttpClientError as error:
                raise CliError(str(error)) from None
        else:
            result = asyncio.run(bench(args.socket, concurrencies, args.requests, args.max_tokens))
    except ClientError as error:
        raise CliError(str(error)) from None
    print(f"daemon: {result['model']}, mode {result['mode']}, max batch {result['max_batch']}, "
          f"{args.max_tokens} tokens per request, over {result['transport']}")
    print(f"{'concurrency':>11} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x vs 1':>7} "
          f"{'TTFT ms':>8} {'req tok/s':>9}")
    for lv in result["levels"]:
        speedup = f"{lv['speedup_vs_1']:.2f}" if lv["speedup_vs_1"] is not None else "-"
        print(f"{lv['concurrency']:>11} {lv['requests']:>8} {lv['tokens']:>7} {lv['wall_s']:>7.2f} "
              f"{lv['tokens_per_s']:>9.1f} {speedup:>7} {lv['mean_time_to_first_token_ms']:>8.0f} "
              f"{lv['mean_request_decode_tokens_per_s']:>9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
