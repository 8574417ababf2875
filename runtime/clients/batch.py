"""`flashllm batch IN.jsonl --out OUT.jsonl (--socket PATH | --store STORE)`: many prompts, for throughput.

Input, one JSON object per line:

    {"id": "q1", "prompt": "Translate to French: cheese"}
    {"id": 2, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32, "temperature": 0.7, "seed": 1}

(optional per line: chat, max_tokens, temperature, top_p, top_k, seed, stop,
ignore_eos; the command's flags give the defaults). Output, one line per
input id, in the order they finish:

    {"id": "q1", "line": 1, "text": "...", "finish_reason": "stop", "usage": {...}, "timings": {...}}
    {"id": 2, "line": 2, "error": {"code": "prompt_too_long", "message": "..."}}

OpenAI's batch format works too, line by line (what `openai batches` uploads):

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}}

answered in OpenAI's batch output shape (the body's own values and OpenAI's
defaults apply, not the command's flags; `model` is not checked):

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...",
     "body": {"object": "chat.completion", "choices": [...], "usage": {...}, ...}}, "error": null}
    {"id": "batch_req_...", "custom_id": "q2", "response": null, "error": {"code": "...", "message": "..."}}

Each line is appended and flushed as soon as its prompt finishes, so killing
the command loses nothing that was written; re-running it skips the ids
already in OUT (a line cut short by the kill is dropped and redone). A prompt
the model refuses records its error and the rest go on; trouble that is not
the prompt's fault (the daemon went away or is shutting down) stops the run
without recording anything, so the re-run does those prompts.

--socket sends the prompts to a running daemon; --store runs the same
continuous-batching scheduler in this process; --store with --ray runs it in
engines spread over a Ray cluster, this process writing OUT (ray_batch.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass

from flashllm.protocol.client_api import ErrorCode, ErrorReply, FinalMessage, GenerateRequest, ProtocolError, validate
from flashllm.protocol.openai_api import (ENDPOINT_URLS, Choice, CompletionJob, OpenAIError, new_completion_id,
                                          parse_request, response_body)
from flashllm.runtime.clients.cli import CliError

# Refusals that are about the prompt itself: recorded on its line. Anything else stops the run.
PROMPT_ERRORS = {ErrorCode.INVALID_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.PROMPT_TOO_LONG, ErrorCode.MALFORMED}
OVERLOADED_RETRY_S = 0.5
SAMPLING_KEYS = ("chat", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def register_cli(subparsers) -> None:
    from flashllm.runtime.clients.cli import add_engine_args, add_sampling_args

    p = subparsers.add_parser("batch", help="generate for every prompt of a JSONL file (resumable)")
    p.add_argument("input", help="JSONL file: one {\"id\", \"prompt\" or \"messages\", ...} object per line")
    p.add_argument("--out", required=True, help="JSONL file to append results to (existing ids are skipped)")
    add_engine_args(p, store_required=False)
    p.add_argument("--socket", help="use the daemon on this ipc socket instead of --store")
    p.add_argument("--max-batch", type=int, default=8, help="with --store: requests decoded together (default 8)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="prompts in flight at once (default: 64 with --socket, 2 x --max-batch with --store)")
    p.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    add_sampling_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the run on stdout at the end")
    _add_ray_args(p)
    p.set_defaults(func=cmd_batch)


RAY_ONLY_FLAGS = ("replicas", "threads_per_replica", "gpus_per_replica")


def _add_ray_args(p) -> None:
    """--ray and its options; the Ray code (ray_batch.py, and Ray) is imported only when --ray is given."""
    from flashllm.runtime.clients.cli import positive_int

    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run the prompts on engines spread over a Ray cluster (pip install 'flashllm[ray]'): "
                        "ADDRESS of its head (host:port), auto (the cluster `ray start` made here, or RAY_ADDRESS; "
                        "the default) or local (a private one-machine Ray for this run); --store is opened at the "
                        "same path on every node")
    p.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                   help="--ray: engines to start, spread one per node (default: one per node with room for one)")
    p.add_argument("--threads-per-replica", type=positive_int, default=None, metavar="T",
                   help="--ray: torch threads of each engine, and the CPUs Ray books for it (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="--ray: GPUs Ray books for each engine, which then runs on its GPU (default 0: the CPU)")


@dataclass
class BatchItem:
    line: int  # 1-based line number in the input
    key: str  # what marks it done in OUT: its id, or its line number when it has none
    id: object  # the input's id (str or int), None when missing
    request: GenerateRequest | None  # None when the line itself is broken
    error: ErrorReply | None = None
    openai_line: bool = False  # an OpenAI batch-format line: answered in that format
    openai_job: CompletionJob | None = None  # its request, once its body was read


class RunStopped(Exception):
    """The backend cannot go on (daemon gone, shutting down); what is written stays, a re-run resumes."""


def cmd_batch(args) -> int:
    if bool(args.socket) == bool(args.store):
        raise CliError("give exactly one of --socket PATH (a running daemon) or --store STORE (run in-process)")
    if args.ray is None:
        given = [name for name in RAY_ONLY_FLAGS if getattr(args, name) is not None]
        if given:
            raise CliError(f"--{given[0].replace('_', '-')} applies to --ray; add --ray ADDRESS or drop it")
    defaults = {"chat": args.chat, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": list(args.stop or []),
                "ignore_eos": args.ignore_eos}
    items = read_input(args.input, defaults)
    done = read_done_keys(args.out)
    todo = [item for item in items if item.key not in done]
    print(f"{len(items)} prompts in {args.input}: {len(items) - len(todo)} already in {args.out}, "
          f"{len(todo)} to do", file=sys.stderr)
    if not todo:
        return 0
    if args.ray is not None:
        from flashllm.runtime.clients.ray_batch import run_on_ray  # Ray is imported on this path only

        return run_on_ray(args, todo)
    concurrency = args.concurrency or (64 if args.socket else 2 * args.max_batch)
    if concurrency < 1:
        raise CliError(f"--concurrency {concurrency} is invalid: give at least 1")
    try:
        summary = asyncio.run(_run(args, todo, concurrency))
    except RunStopped as stop:
        raise CliError(f"{stop}; the finished prompts are in {args.out}, run the same command again to do the rest")
    print(f"wrote {summary['written']} lines to {args.out} ({summary['failed']} failed), "
          f"{summary['tokens']} tokens in {summary['seconds']:.1f} s = {summary['tokens_per_s']:.1f} tokens/s",
          file=sys.stderr)
    if args.json:
        print(json.dumps({"replicas": 1, "nodes": 1, "prompts": summary["written"], "failed": summary["failed"],
                          "tokens": summary["tokens"], "wall_s": summary["seconds"],
                          "tokens_per_s": summary["tokens_per_s"]}))
    return 0


# ---------------------------------------------------------------------- input and output files


def read_input(path: str, defaults: dict) -> list[BatchItem]:
    """Every input line as a BatchItem; broken lines carry their error (recorded on their output line)."""
    items: list[BatchItem] = []
    seen: set[str] = set()
    with open(path, "rb") as f:  # bytes: one undecodable line becomes that line's error, not the whole file's
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            item = _parse_line(number, raw, defaults)
            if item.key in seen:
                print(f"{path}:{number}: id {item.id!r} appeared before; this line is skipped", file=sys.stderr)
                continue
            seen.add(item.key)
            items.append(item)
    return items


def _parse_line(number: int, raw: bytes, defaults: dict) -> BatchItem:
    def broken(key: str, item_id, message: str) -> BatchItem:
        return BatchItem(number, key, item_id, None, ErrorReply(None, ErrorCode.INVALID_REQUEST, message))

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return broken(f"line:{number}", None, f"line {number} is not UTF-8 text (byte {raw[error.start]:#04x} at "
                                              f"column {error.start + 1}); save the file as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        return broken(f"line:{number}", None, f"line {number} is not JSON ({error})")
    except RecursionError:
        return broken(f"line:{number}", None, f"line {number} nests JSON too deeply to read")
    if not isinstance(obj, dict):
        return broken(f"line:{number}", None, f"line {number} is not a JSON object")
    if "custom_id" in obj:
        return _parse_openai_line(number, obj)
    item_id = obj.pop("id", None)
    if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int))):
        return broken(f"line:{number}", None, f"line {number}: id must be a string or an integer, "
                                              f"got {type(item_id).__name__}")
    key = _key(item_id, number)
    unknown = [k for k in obj if k not in ("prompt", "messages", *SAMPLING_KEYS)]
    if unknown:
        return broken(key, item_id, f"line {number}: unknown field {unknown[0]!r}; known: id, prompt, messages, "
                                    + ", ".join(SAMPLING_KEYS))
    fields = {**defaults, **obj}
    try:
        request = validate(GenerateRequest(id=f"line-{number}", **fields))
    except ProtocolError as error:
        return BatchItem(number, key, item_id, None, ErrorReply(None, error.code, error.message))
    return BatchItem(number, key, item_id, request)


OPENAI_LINE_KEYS = ("custom_id", "method", "url", "body")
ENDPOINT_OF_URL = {url: endpoint for endpoint, url in ENDPOINT_URLS.items()}


def _parse_openai_line(number: int, obj: dict) -> BatchItem:
    """An OpenAI batch-format line: {"custom_id", "method": "POST", "url", "body"}."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchItem(number, f"line:{number}", None, None, ErrorReply(
            None, ErrorCode.INVALID_REQUEST, f"line {number}: custom_id must be a non-empty string"))
    item = BatchItem(number, _key(custom_id, number), custom_id, None, openai_line=True)

    def broken(message: str, code: str = ErrorCode.INVALID_REQUEST) -> BatchItem:
        item.error = ErrorReply(None, code, f"line {number}: {message}")
        item.request = None
        return item

    unknown = [k for k in obj if k not in OPENAI_LINE_KEYS]
    if unknown:
        return broken(f"unknown field {unknown[0]!r}; an OpenAI batch line has {', '.join(OPENAI_LINE_KEYS)}")
    if obj.get("method", "POST") != "POST":
        return broken(f"method {obj.get('method')!r} is not supported; use POST")
    endpoint = ENDPOINT_OF_URL.get(obj.get("url"))
    if endpoint is None:
        return broken(f"url {obj.get('url')!r} is not supported; use one of {', '.join(ENDPOINT_OF_URL)}")
    try:
        job = parse_request(endpoint, obj.get("body"))
    except OpenAIError as error:
        return broken(error.message, ErrorCode.TOO_LARGE if error.status == 413 else ErrorCode.INVALID_REQUEST)
    item.openai_job = job
    if job.stream:
        return broken("stream=true is not supported in a batch; leave it out")
    if len(job.prompts) != 1 or not isinstance(job.prompts[0], (str, list)) or (
            isinstance(job.prompts[0], list) and not all(isinstance(m, dict) for m in job.prompts[0])):
        return broken("give one text prompt per line (token-id prompts and prompt lists are for the HTTP API)")
    prompt = job.prompts[0]
    text, messages = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    try:
        item.request = validate(GenerateRequest(id=f"line-{number}", prompt=text, messages=messages,
                                                **job.sampling))
    except ProtocolError as error:
        return broken(error.message, error.code)
    return item


def _key(item_id, line: int) -> str:
    return json.dumps(item_id) if item_id is not None else f"line:{line}"


def read_done_keys(out_path: str) -> set[str]:
    """Keys of the lines already in OUT; a last line cut short by a kill is truncated away to be redone."""
    if not os.path.exists(out_path):
        return set()
    with open(out_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            print(f"{out_path}: dropping a last line cut short ({len(data) - keep} bytes); it is redone",
                  file=sys.stderr)
            f.truncate(keep)
            data = data[:keep]
    done = set()
    for text in data.decode("utf-8").splitlines():
        try:
            obj = json.loads(text)
            done.add(_key(obj["custom_id"], 0) if "custom_id" in obj else _key(obj.get("id"), obj["line"]))
        except (json.JSONDecodeError, KeyError, AttributeError):
            continue
    return done


def result_line(item: BatchItem, outcome: FinalMessage | ErrorReply) -> dict:
    if item.openai_line:
        return openai_result_line(item, outcome)
    line = {"id": item.id, "line": item.line}
    if isinstance(outcome, ErrorReply):
        line["error"] = {"code": outcome.code, "message": outcome.message}
    else:
        line.update(text=outcome.text, finish_reason=outcome.finish_reason, usage=asdict(outcome.usage),
                    timings=asdict(outcome.timings))
    return line


def openai_result_line(item: BatchItem, outcome: FinalMessage | ErrorReply) -> dict:
    """One line of OpenAI's batch output format."""
    line = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": item.id}
    if isinstance(outcome, ErrorReply):
        return {**line, "response": None, "error": {"code": outcome.code, "message": outcome.message}}
    job = item.openai_job
    choice = Choice(outcome.text, outcome.finish_reason, outcome.usage.prompt_tokens, outcome.usage.completion_tokens)
    body = response_body(job, new_completion_id(job.endpoint), int(time.time()), [choice])
    return {**line, "response": {"status_code": 200, "request_id": "req_" + secrets.token_hex(12), "body": body},
            "error": None}


# ---------------------------------------------------------------------- backends: daemon or in-process


class DaemonBackend:
    def __init__(self, socket_path: str):
        from flashllm.runtime.clients.client import AsyncClient, ClientError

        try:
            self._client = AsyncClient(socket_path)
        except ClientError as error:
            raise CliError(str(error)) from None

    async def generate(self, request: GenerateRequest) -> FinalMessage | ErrorReply:
        from flashllm.runtime.clients.client import ClientError, RequestFailed

        fields = {k: getattr(request, k) for k in SAMPLING_KEYS}
        messages = [asdict(m) for m in request.messages] if request.messages is not None else None
        try:
            return await self._client.generate(request.prompt, messages=messages, request_id=request.id, **fields)
        except RequestFailed as error:
            return ErrorReply(request.id, error.code, error.message)
        except ClientError as error:
            raise RunStopped(str(error)) from None

    async def close(self) -> None:
        await self._client.close()


class InProcessBackend:
    """The daemon's scheduler over an engine in this process: the same continuous batching, no socket."""

    def __init__(self, args):
        from flashllm.runtime.core.engine_config import engine_from_args
        from flashllm.runtime.daemon.scheduler import Scheduler

        if args.max_batch < 1:
            raise CliError(f"--max-batch {args.max_batch} is invalid: give at least 1")
        self._engine = engine_from_args(args, max_batch=args.max_batch)
        self._scheduler = Scheduler(self._engine)
        self._run_task = asyncio.create_task(self._scheduler.run())

    async def generate(self, request: GenerateRequest) -> FinalMessage | ErrorReply:
        from flashllm.runtime.core.sampling import SamplingParams
        from flashllm.runtime.daemon.scheduler import RequestRejected

        if self._run_task.done():
            raise RunStopped(f"the engine failed: {self._run_task.exception()}")
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_reply(reply) -> bool:
            if isinstance(reply, (FinalMessage, ErrorReply)) and not outcome.done():
                outcome.set_result(reply)
            return True

        prompt = [asdict(m) for m in request.messages] if request.messages is not None else request.prompt
        params = SamplingParams(**request.sampling_fields())
        try:
            await self._scheduler.submit(request.id, prompt, params, on_reply, chat=request.chat, stream=False)
        except RequestRejected as error:
            return ErrorReply(request.id, error.code, error.message)
        return await outcome

    async def close(self) -> None:
        self._scheduler.cancel_all()  # an interrupted run leaves prompts in flight; they are redone next time
        self._scheduler.close()
        try:
            await self._run_task
        finally:
            self._scheduler.shutdown_threads()
            self._engine.close()


# ---------------------------------------------------------------------- the run


async def _run(args, todo: list[BatchItem], concurrency: int) -> dict:
    from tqdm import tqdm

    backend = DaemonBackend(args.socket) if args.socket else InProcessBackend(args)
    queue = list(reversed(todo))
    start_s = time.monotonic()
    summary = {"written": 0, "failed": 0, "tokens": 0}
    progress = tqdm(total=len(todo), unit="prompt", desc="batch", disable=args.quiet, file=sys.stderr,
                    dynamic_ncols=True)
    out = open(args.out, "a", encoding="utf-8")

    def write(item: BatchItem, outcome: FinalMessage | ErrorReply) -> None:
        out.write(json.dumps(result_line(item, outcome), ensure_ascii=False) + "\n")
        out.flush()  # one line at a time: a kill loses only the prompts still running
        summary["written"] += 1
        if isinstance(outcome, ErrorReply):
            summary["failed"] += 1
        else:
            summary["tokens"] += outcome.usage.completion_tokens
        elapsed_s = time.monotonic() - start_s
        progress.set_postfix_str(f"{summary['tokens'] / elapsed_s:.1f} tok/s, {summary['failed']} failed",
                                 refresh=False)
        progress.update(1)

    async def worker() -> None:
        while queue:
            item = queue.pop()
            if item.request is None:
                write(item, item.error)
                continue
            while True:
                outcome = await backend.generate(item.request)
                # overloaded, or a worker crashed mid-step and the daemon restarted it: the prompt is not at fault
                if isinstance(outcome, ErrorReply) and outcome.code in (ErrorCode.OVERLOADED, ErrorCode.WORKER_FAILED):
                    await asyncio.sleep(OVERLOADED_RETRY_S)
                    continue
                break
            if isinstance(outcome, ErrorReply) and outcome.code not in PROMPT_ERRORS:
                raise RunStopped(f"the {'daemon' if args.socket else 'engine'} failed a request: "
                                 f"{outcome.message} [{outcome.code}]")
            write(item, outcome)

    try:
        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    finally:
        out.close()
        progress.close()
        await backend.close()
    seconds = time.monotonic() - start_s
    return {**summary, "seconds": seconds, "tokens_per_s": summary["tokens"] / seconds if seconds > 0 else 0.0}
