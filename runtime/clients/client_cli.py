"""`flashllm generate --socket PATH` and `flashllm status --socket PATH`: the CLI side of the daemon's clients.

Both go through runtime.client, so they start in a fraction of a second (no torch).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from flashllm.runtime.clients.cli import CliError

STATUS_TIMEOUT_S = 10.0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("status", help="health and recent performance of a running daemon")
    p.add_argument("--socket", required=True, help="the daemon's ipc socket path")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object")
    output.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    p.add_argument("--timeout-s", type=float, default=STATUS_TIMEOUT_S, help="how long to wait for the daemon")
    p.set_defaults(func=cmd_status)


# ---------------------------------------------------------------------- generate


def _sampling_fields(args) -> dict:
    return {"chat": args.chat, "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": list(args.stop or []), "ignore_eos": args.ignore_eos}


def _ms_per_token(final) -> float:
    decoded = final.usage.completion_tokens - 1
    return final.timings.decode_ms / decoded if decoded > 0 else float("nan")


def generate_via_daemon(args) -> int:
    """`flashllm generate --socket PATH PROMPT...`: one prompt streams to stdout; several run concurrently."""
    from flashllm.runtime.clients.client import AsyncClient, Client, ClientError

    sampling = _sampling_fields(args)
    prompts = args.prompt
    try:
        if len(prompts) == 1 and not args.json:
            with Client(args.socket) as client:
                with client.stream(prompts[0], **sampling) as stream:
                    for chunk in stream:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
            print()
            return 0

        async def run_all():
            async with AsyncClient(args.socket) as client:
                return await asyncio.gather(*(client.generate(p, **sampling) for p in prompts))

        finals = asyncio.run(run_all())
    except ClientError as error:
        raise CliError(str(error)) from None
    for prompt, final in zip(prompts, finals):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": final.text, "tokens": final.token_ids,
                              "finish_reason": final.finish_reason, "prompt_tokens": final.usage.prompt_tokens,
                              "ms_per_token": round(_ms_per_token(final), 3),
                              "timings": dataclasses.asdict(final.timings)}))
        else:
            print(f"--- {prompt}\n{final.text}")
    return 0


# ---------------------------------------------------------------------- status


def cmd_status(args) -> int:
    """Exit 0 when the daemon is healthy, 1 when it answers but is not, 2 when none answers."""
    from flashllm.runtime.clients.client import Client, ClientError

    try:
        with Client(args.socket, timeout_s=args.timeout_s) as client:
            status = client.status()
    except ClientError as error:
        if args.prometheus:  # a scraper wants flashllm_up 0, not an empty page
            print("# HELP flashllm_up Whether the daemon answered.\n# TYPE flashllm_up gauge\nflashllm_up 0")
        raise CliError(str(error)) from None
    if args.json:
        fields = dataclasses.asdict(status)
        fields.pop("id")
        print(json.dumps(fields))
    elif args.prometheus:
        sys.stdout.write(prometheus_text(status))
    else:
        print(human_status(args.socket, status))
    return 0 if status.ok else 1


def human_status(socket_path: str, s) -> str:
    hit_rate = f"{s.cache_hit_rate:.1%}" if s.cache_hit_rate is not None else "- (no neuron cache)"
    return "\n".join([
        f"flashllm daemon at {socket_path}: {s.state} ({'healthy' if s.ok else 'UNHEALTHY'}), "
        f"up {_duration(s.uptime_s)}",
        f"model         {s.model}, mode {s.mode}, max batch {s.max_batch}"
        + (", head as a 4-bit sketch" if s.head_precision == "4bit" else ""),
        f"requests      {s.requests_running} running, {s.requests_queued} queued, "
        f"{s.requests_completed} completed, {s.requests_failed} failed",
        f"throughput    {s.tokens_per_s:.1f} tokens/s over the last {s.window_s:.0f} s, "
        f"mean batch {s.mean_batch:.1f}, {s.tokens_generated} tokens since start",
        f"decode step   {s.step_ms:.1f} ms: FFN I/O {s.io_ms_per_step:.1f} ms, "
        f"FFN compute {s.compute_ms_per_step:.1f} ms",
        f"flash         {_bytes(s.flash_bytes_per_token)}/token read, cache hit rate {hit_rate}",
    ])


# (name, type, help, value getter): also what the daemon's HTTP /metrics says about its scheduler
STATUS_METRICS = [
    ("up", "gauge", "Whether the daemon answered.", lambda s: 1),
    ("healthy", "gauge", "1 when the daemon is ready and its engine makes progress.", lambda s: int(s.ok)),
    ("requests_running", "gauge", "Requests in the engine's batch.", lambda s: s.requests_running),
    ("requests_queued", "gauge", "Requests waiting for a batch slot.", lambda s: s.requests_queued),
    ("requests_completed_total", "counter", "Requests finished since start.", lambda s: s.requests_completed),
    ("requests_failed_total", "counter", "Requests refused or failed since start.", lambda s: s.requests_failed),
    ("tokens_generated_total", "counter", "Tokens generated since start.", lambda s: s.tokens_generated),
    ("tokens_per_second", "gauge", "Tokens generated per second, recent window.", lambda s: s.tokens_per_s),
    ("mean_batch", "gauge", "Sequences per decode step, recent window.", lambda s: s.mean_batch),
    ("decode_step_seconds", "gauge", "Mean decode step time, recent window.", lambda s: s.step_ms / 1e3),
    ("ffn_io_seconds_per_step", "gauge", "FFN flash read time per decode step.", lambda s: s.io_ms_per_step / 1e3),
    ("ffn_compute_seconds_per_step", "gauge", "FFN compute time per decode step.",
     lambda s: s.compute_ms_per_step / 1e3),
    ("flash_bytes_per_token", "gauge", "Bytes read from flash per decoded token.", lambda s: s.flash_bytes_per_token),
    ("cache_hit_rate", "gauge", "Neuron cache hits over neurons needed.", lambda s: s.cache_hit_rate),
    ("uptime_seconds", "gauge", "Seconds since the daemon started serving.", lambda s: s.uptime_s),
]


def prometheus_text(status) -> str:
    lines = []
    for name, kind, help_text, value_of in STATUS_METRICS:
        value = value_of(status)
        if value is None:
            continue
        lines += [f"# HELP flashllm_{name} {help_text}", f"# TYPE flashllm_{name} {kind}", f"flashllm_{name} {value}"]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
