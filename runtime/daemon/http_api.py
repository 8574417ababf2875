"""`flashllm serve --http ADDRESS`: OpenAI's HTTP API beside the ZeroMQ socket, on the same scheduler.

    POST /v1/chat/completions, /v1/completions   JSON, or server-sent events with stream=true
    GET  /v1/models, /v1/models/{id}             the store's name and metadata
    GET  /health                                 200 ready; 503 loading, draining or stuck (no key needed)
    GET  /metrics                                Prometheus text (runtime/daemon/metrics.py)

ADDRESS is `unix:/path/to.sock` (mode 0660, group --socket-group, like the
ZeroMQ socket) or `HOST:PORT`. A host that is not loopback needs
--api-key-file; with a key, every request but /health must carry
`Authorization: Bearer KEY` (compared in constant time).

uvicorn (httptools) serves a starlette app in the daemon's own uvloop event
loop: handlers call the scheduler directly, as the ZeroMQ ClientServer does.
The socket is bound before the model loads, so /health answers 503 while it
loads. A client that goes away is noticed by starlette (streams) or by a
watcher on the connection (plain responses), and its request is cancelled in
the engine at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashllm.protocol.client_api import MAX_REQUEST_BYTES, ErrorReply, FinalMessage, Heartbeat, TokenChunk
from flashllm.protocol.openai_api import (CHAT, COMPLETION, Choice, CompletionJob, OpenAIError, chunk_body,
                                          error_for_code, new_completion_id, parse_request, response_body,
                                          usage_chunk_body)
from flashllm.runtime.daemon.metrics import CONTENT_TYPE
from flashllm.runtime.daemon.socket_lock import IpcEndpointError

log = logging.getLogger("flashllm.http")

MAX_BODY_BYTES = MAX_REQUEST_BYTES
UNIX_PREFIX = "unix:"
STOP_GRACE_S = 5.0  # after the scheduler drained: time for the last responses to leave
CLIENT_GONE_STATUS = 499  # nobody reads it: the connection is closed


class HttpAddressError(IpcEndpointError):
    """--http or --api-key-file cannot be used as given (exit status 2)."""


@dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP API listens: a unix socket path, or a TCP host and port."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_loopback(self) -> bool:
        if self.unix_path is not None or self.host == "localhost":
            return True
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        if self.unix_path is not None:
            return UNIX_PREFIX + self.unix_path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_http_address(text: str) -> HttpAddress:
    """`unix:/path.sock`, `HOST:PORT` or `[V6HOST]:PORT`; HttpAddressError saying what to write if not."""
    usage = "give unix:/path/to.sock, 127.0.0.1:PORT or [::1]:PORT"
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]
        if not path:
            raise HttpAddressError(f"--http {text!r} names no socket path; {usage}")
        return HttpAddress(unix_path=os.path.abspath(path))
    host, colon, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HttpAddressError(f"--http {text!r} is not an address; {usage}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise HttpAddressError(f"--http {text!r}: {host!r} is not an IP address; {usage}") from None
    return HttpAddress(host=host, port=int(port_text))


def read_api_key(path: str) -> str:
    """The key in an --api-key-file (first line, stripped); HttpAddressError if unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except OSError as error:
        raise HttpAddressError(f"cannot read --api-key-file {path}: {error.strerror}") from None
    if len(key) < 16:
        raise HttpAddressError(f"--api-key-file {path} holds a key of {len(key)} characters; put a random key of "
                               "at least 16 on its first line (e.g. `openssl rand -hex 32 > FILE`)")
    return key


@dataclass
class HttpOptions:
    addresses: list[HttpAddress]
    api_key: str | None  # required of every request on every address when given
    socket_group: str | None  # group of the unix sockets (mode 0660)

    @staticmethod
    def from_args(http: list[str], api_key_file: str | None, socket_group: str | None) -> HttpOptions:
        addresses = [parse_http_address(text) for text in http]
        for address in addresses:
            if not address.is_loopback and api_key_file is None:
                raise HttpAddressError(f"--http {address} listens beyond this machine: give --api-key-file FILE "
                                       "so that every request must carry its key, or listen on 127.0.0.1 or a "
                                       "unix socket")
        api_key = read_api_key(api_key_file) if api_key_file is not None else None
        return HttpOptions(addresses, api_key, socket_group)


@dataclass
class ModelCard:
    """What GET /v1/models says about the served store."""

    id: str  # the store directory's name; requests must name it as `model`
    created_s: int
    metadata: dict

    def body(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created_s, "owned_by": "flashllm",
                "max_model_len": self.metadata.get("max_context"), "flashllm": self.metadata}


def model_card_for(store: str, engine, mode: str) -> ModelCard:
    arch = engine.arch
    manifest_path = os.path.join(store, "manifest.json")
    created_s = int(os.path.getmtime(manifest_path)) if os.path.exists(manifest_path) else int(time.time())
    metadata = {"store": os.path.abspath(store), "family": arch.family,
                "source_model_type": arch.source_model_type or arch.family, "dtype": engine.manifest.dtype,
                "mode": mode, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
                "num_hidden_layers": arch.num_hidden_layers, "vocab_size": arch.vocab_size,
                "max_context": engine.max_context, "max_batch": engine.max_batch,
                "sparsity_calibrated": engine.manifest.sparsity is not None}
    return ModelCard(id=model_id_for(store), created_s=created_s, metadata=metadata)


def model_id_for(store: str) -> str:
    return os.path.basename(os.path.normpath(store))


# ---------------------------------------------------------------------- one request's choices in the scheduler


class _Generation:
    """The choices of one HTTP request running in the scheduler; their replies arrive in one queue."""

    def __init__(self, scheduler, job: CompletionJob, metrics):
        self._scheduler = scheduler
        self._metrics = metrics
        self.job = job
        self.queue: asyncio.Queue = asyncio.Queue()
        self._handles: list = []
        self._finished: set[int] = set()
        self._last_token_s: dict[int, float] = {}
        self._closed = False
        self._tag = uuid.uuid4().hex[:12]

    async def submit(self) -> None:
        """Queue every choice; OpenAIError (and nothing left running) if the scheduler refuses one."""
        from flashllm.runtime.core.sampling import SamplingParams
        from flashllm.runtime.daemon.scheduler import RequestRejected

        for index, prompt in enumerate(self.job.prompts):
            try:
                handle = await self._scheduler.submit(
                    f"http-{self._tag}-{index}", prompt, SamplingParams(**self.job.sampling),
                    functools.partial(self._on_reply, index), stream=True)
            except RequestRejected as rejected:
                self._metrics.completions.labels(rejected.code).inc()
                self.close()
                raise error_for_code(rejected.code, rejected.message) from None
            self._handles.append(handle)

    def _on_reply(self, index: int, reply) -> bool:
        if self._closed:
            return False  # the client went away: the scheduler cancels the request
        self.queue.put_nowait((index, reply))
        return True

    def note(self, index: int, reply) -> None:
        """Metrics for one reply as the handler takes it."""
        now = time.monotonic()
        if isinstance(reply, TokenChunk) and reply.token_ids:
            last = self._last_token_s.get(index)
            if last is not None:
                self._metrics.inter_token_latency.observe((now - last) / len(reply.token_ids))
            self._last_token_s[index] = now
        elif isinstance(reply, FinalMessage):
            self._finished.add(index)
            self._metrics.completions.labels(reply.finish_reason).inc()
            self._metrics.time_to_first_token.observe(reply.timings.time_to_first_token_ms / 1e3)
            self._metrics.prompt_tokens.inc(reply.usage.prompt_tokens)
            self._metrics.completion_tokens.inc(reply.usage.completion_tokens)
        elif isinstance(reply, ErrorReply):
            self._finished.add(index)
            self._metrics.completions.labels(reply.code).inc()

    @property
    def done(self) -> bool:
        return len(self._finished) == len(self.job.prompts)

    def close(self) -> None:
        """Cancel whatever has not finished (the client went away, or another choice failed)."""
        if self._closed:
            return
        self._closed = True
        for index, handle in enumerate(self._handles):
            if self._scheduler.cancel(handle):
                self._finished.add(index)
                self._metrics.completions.labels("cancelled").inc()
                log.info("cancelled %s: its HTTP client went away", handle.request_id)


# ---------------------------------------------------------------------- the app


class OpenAIApp:
    """The starlette app; `scheduler` is None while the model loads."""

    def __init__(self, model_id: str, metrics, api_key: str | None):
        self.model_id = model_id
        self.scheduler = None
        self.card: ModelCard | None = None
        self._metrics = metrics
        self._api_key = api_key.encode() if api_key is not None else None
        routes = [
            Route("/v1/chat/completions", self._guarded(functools.partial(self._completions, CHAT)),
                  methods=["POST"]),
            Route("/v1/completions", self._guarded(functools.partial(self._completions, COMPLETION)),
                  methods=["POST"]),
            Route("/v1/models", self._guarded(self._models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._guarded(self._model), methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/metrics", self._guarded(self._prometheus), methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})
        self.asgi = _CountResponses(app, metrics, {r.path for r in routes if "{" not in r.path})

    def attach(self, scheduler, card: ModelCard) -> None:
        self.card = card
        self.scheduler = scheduler

    # ------------------------------------------------------------------ plumbing

    def _guarded(self, handler):
        """Check the key, then run the handler; OpenAIError becomes OpenAI's error object."""
        async def endpoint(request):
            try:
                self._authorize(request)
                return await handler(request)
            except OpenAIError as error:
                return _error_response(error)
        return endpoint

    def _authorize(self, request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self._api_key):
            raise OpenAIError(401, "missing or wrong API key: send the key of the daemon's --api-key-file as "
                                   "`Authorization: Bearer KEY`", "authentication_error", code="invalid_api_key")

    async def _http_exception(self, request, error):
        if error.status_code == 404:
            return _error_response(OpenAIError(
                404, f"no such endpoint {request.url.path}: flashllm serves POST /v1/chat/completions, "
                     "POST /v1/completions, GET /v1/models, GET /health and GET /metrics",
                "not_found_error", code="unknown_url"))
        if error.status_code == 405:
            return _error_response(OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                                               "invalid_request_error", code="method_not_allowed"))
        return _error_response(OpenAIError(error.status_code, str(error.detail), "invalid_request_error"))

    def _ready_scheduler(self):
        if self.scheduler is None:
            raise OpenAIError(503, "the daemon is still loading the model; retry once GET /health answers 200",
                              "service_unavailable", code="loading")
        return self.scheduler

    async def _read_json(self, request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _too_large(int(declared))
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise _too_large(len(body))
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OpenAIError(400, f"the request body is not valid JSON ({error}); send a JSON object with "
                                   "Content-Type: application/json", code="invalid_json") from None

    # ------------------------------------------------------------------ endpoints

    async def _health(self, request):
        scheduler = self.scheduler
        if scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if scheduler.state != "ready":
            return JSONResponse({"status": scheduler.state}, status_code=503)
        if not scheduler.healthy():
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _models(self, request):
        self._ready_scheduler()
        return JSONResponse({"object": "list", "data": [self.card.body()]})

    async def _model(self, request):
        self._ready_scheduler()
        self._check_model(request.path_params["model"])
        return JSONResponse(self.card.body())

    async def _prometheus(self, request):
        return Response(self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise OpenAIError(404, f"the model {model!r} does not exist here: this daemon serves "
                                   f"{self.model_id!r} (GET /v1/models)", "not_found_error",
                              param="model", code="model_not_found")

    async def _completions(self, endpoint: str, request):
        job = parse_request(endpoint, await self._read_json(request))
        scheduler = self._ready_scheduler()
        self._check_model(job.model)
        generation = _Generation(scheduler, job, self._metrics)
        await generation.submit()
        completion_id, created_s = new_completion_id(endpoint), int(time.time())
        if job.stream:
            async def close_generation() -> None:  # also when the client left before the first event
                generation.close()

            return StreamingResponse(self._events(generation, completion_id, created_s),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(close_generation))
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            choices = await _first_or_none(_collect(generation), watcher)
        finally:
            watcher.cancel()
            generation.close()
        if choices is None:
            return Response(status_code=CLIENT_GONE_STATUS)
        return JSONResponse(response_body(job, completion_id, created_s, choices))

    async def _events(self, generation: _Generation, completion_id: str, created_s: int):
        """Server-sent events: a chunk per new text, one with each finish_reason, usage, then [DONE]."""
        job = generation.job
        usage = [0, 0]
        try:
            if job.endpoint == CHAT:
                for index in range(len(job.prompts)):
                    yield _sse(chunk_body(job, completion_id, created_s, index, "", first=True))
            while not generation.done:
                index, reply = await generation.queue.get()
                generation.note(index, reply)
                if isinstance(reply, TokenChunk):
                    if reply.text:
                        yield _sse(chunk_body(job, completion_id, created_s, index, reply.text))
                elif isinstance(reply, FinalMessage):
                    usage[0] += reply.usage.prompt_tokens
                    usage[1] += reply.usage.completion_tokens
                    yield _sse(chunk_body(job, completion_id, created_s, index, None, reply.finish_reason))
                elif isinstance(reply, ErrorReply):
                    yield _sse(error_for_code(reply.code, reply.message).body())
                    return
                elif isinstance(reply, Heartbeat):
                    yield ": keep-alive\n\n"  # a comment: lets a queued request notice a client that left
            if job.include_usage:
                yield _sse(usage_chunk_body(job, completion_id, created_s, *usage))
            yield "data: [DONE]\n\n"
        finally:
            generation.close()


async def _collect(generation: _Generation) -> list[Choice]:
    """Every choice's final (or the first error, raised as OpenAIError)."""
    choices: dict[int, Choice] = {}
    while not generation.done:
        index, reply = await generation.queue.get()
        generation.note(index, reply)
        if isinstance(reply, FinalMessage):
            choices[index] = Choice(reply.text, reply.finish_reason, reply.usage.prompt_tokens,
                                    reply.usage.completion_tokens)
        elif isinstance(reply, ErrorReply):
            raise error_for_code(reply.code, reply.message)
    return [choices[i] for i in range(len(choices))]


async def _first_or_none(work, watcher: asyncio.Future):
    """work's result, or None when the watcher (the client went away) finishes first."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    return None


async def _client_gone(request) -> None:
    """Returns when the client closes its connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_response(error: OpenAIError):
    return JSONResponse(error.body(), status_code=error.status)


def _too_large(size_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the request body of {size_bytes} bytes is over the limit of {MAX_BODY_BYTES} bytes; "
                            "shorten the prompt", code="too_large")


class _CountResponses:
    """ASGI middleware: counts every response by endpoint (unknown paths as "other") and status."""

    def __init__(self, app, metrics, paths: set[str]):
        self._app = app
        self._metrics = metrics
        self._paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self._paths else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self._metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self._app(scope, receive, counting_send)


# ---------------------------------------------------------------------- the server in the daemon's loop


class HttpFrontDoor:
    """Binds the HTTP socket (before the model loads), serves it with uvicorn in this loop, stops after the drain.

        door = HttpFrontDoor(options, model_id, metrics)
        door.claim()              # lock + bind: a user error (exit 2) if the address is taken
        await door.start()        # /health says 503 "loading"
        door.attach(scheduler, card)
        ...
        await door.stop()         # after scheduler.drain()
        door.release()
    """

    def __init__(self, options: HttpOptions, model_id: str, metrics):
        self.options = options
        self.metrics = metrics
        self.app = OpenAIApp(model_id, metrics, options.api_key)
        self._locks: list = []
        self._sockets: list[socket.socket] = []
        self._server = None
        self._task: asyncio.Task | None = None

    def attach(self, scheduler, card: ModelCard) -> None:
        """The model is loaded: serve requests from this scheduler, report its state in /metrics."""
        self.metrics.attach(scheduler)
        self.app.attach(scheduler, card)

    def claim(self) -> None:
        """Bind every address (unix sockets under a lock, like the ZeroMQ one); all or none."""
        try:
            for address in self.options.addresses:
                self._sockets.append(self._bind(address))
        except BaseException:
            self.release()
            raise

    def _bind(self, address: HttpAddress) -> socket.socket:
        from flashllm.runtime.daemon.socket_lock import EndpointInUseError, IpcEndpointLock, apply_socket_permissions

        if address.unix_path is None:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            try:
                return socket.create_server((address.host, address.port), family=family)
            except OSError as error:
                raise HttpAddressError(f"cannot listen on --http {address}: {error.strerror}; pick another port "
                                       "or stop what listens there") from None
        lock = IpcEndpointLock(address.unix_path)
        try:
            lock.acquire()
        except EndpointInUseError as error:
            raise HttpAddressError(f"cannot serve HTTP on {address}: {error} (here: a different --http "
                                   "address)") from None
        self._locks.append(lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.unix_path)
            apply_socket_permissions(address.unix_path, mode=0o660, group=self.options.socket_group)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        config = uvicorn.Config(self.app.asgi, http="httptools", lifespan="off", log_config=None,
                                access_log=False, server_header=False, timeout_graceful_shutdown=STOP_GRACE_S)
        self._server = EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI HTTP API on %s%s", ", ".join(map(str, self.options.addresses)),
                 " (API key required)" if self.options.api_key else "")

    async def stop(self) -> None:
        """Close the listener and the idle connections; give responses still being sent STOP_GRACE_S."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_S + 2)
        except TimeoutError:
            self._task.cancel()
        except Exception:
            log.exception("the HTTP server failed while stopping")
        self._task = None

    def release(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for lock in self._locks:
            lock.release()
        self._locks.clear()


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon's SIGTERM handler decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
