"""`flashllm serve`: the daemon. One engine, a continuous-batching scheduler, local clients on a ZeroMQ ipc:// socket.

Start-up, in this order, so systemd and clients never see a half-started daemon:

    SystemdNotifier(unset_environment=True)   before anything can spawn a worker
    IpcEndpointLock(socket).acquire()         a second serve on the same path refuses here (exit 2)
    STATUS=loading ...; build the engine      in a thread: SIGTERM is still heard while weights load
    bind ROUTER, chmod 0660 (+ --socket-group)
    READY=1, then WATCHDOG=1 every $WATCHDOG_USEC/2 while the scheduler is healthy

Shutdown on SIGTERM/SIGINT: STOPPING=1; new generates get "shutting_down"
while status/health/cancel still work; in-flight requests finish within
--drain-timeout-s, the rest get an error; the socket is closed, the engine
(and its workers) stopped, and the socket and lock files removed; exit 0.
An engine failure instead exits 1, so systemd's Restart=on-failure restarts it.

A ROUTER socket sees each client connection as an identity; requests are keyed
by (identity, client's id). ROUTER_MANDATORY makes a send to a client that has
gone away fail at once, which is how a vanished client's requests get cancelled
(the scheduler's heartbeats make sure such a send happens within a second).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time

from flashllm.protocol.client_api import (CancelRequest, ErrorCode, ErrorReply, FinalMessage, GenerateRequest, HealthReply,
                                 HealthRequest, ProtocolError, StatusRequest, decode_request, encode, error_id)
from flashllm.runtime.core.supervisor import DEFAULT_MAX_RESTARTS, RESTART_WINDOW_S  # no torch: cheap for --help
from flashllm.runtime.daemon.scheduler import DEFAULT_STEP_TIMEOUT_S, RequestRejected, Scheduler

log = logging.getLogger("flashllm.serve")

DEFAULT_DRAIN_TIMEOUT_S = 25.0  # below the unit's TimeoutStopSec=60 with room for stopping workers
MAX_FRAME_BYTES = 64 * 2**20  # libzmq drops a connection sending more; up to this, the codec answers too_large
SEND_HIGH_WATER_MARK = 100_000  # queued replies per client before it counts as gone (it stopped reading)
CLOSE_LINGER_MS = 1000  # at shutdown, time for the last replies to leave
STATUS_LINE_INTERVAL_S = 10.0
STUCK_GRACE_S = 2.0  # after the drain, before the workers of a step that will not end are killed


def register_cli(subparsers) -> None:
    from flashllm.runtime.clients.cli import add_engine_args

    p = subparsers.add_parser("serve", help="run the daemon: serve local clients on an ipc socket")
    add_engine_args(p)
    p.add_argument("--socket", required=True, help="ipc socket path, e.g. /run/flashllm/flashllm.sock")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most requests decoded together (KV-cache slots; default 8)")
    p.add_argument("--socket-group", default=None, help="group allowed to connect (socket mode 0660)")
    p.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM, how long in-flight requests may take to finish "
                        f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    p.add_argument("--max-queued", type=int, default=1024, help="requests waiting for a batch slot before "
                                                                "new ones are refused as overloaded (default 1024)")
    p.add_argument("--http", action="append", default=None, metavar="ADDRESS",
                   help="also serve OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
                        "/health, /metrics) on unix:/path/to.sock (mode 0660, --socket-group) or HOST:PORT; "
                        "repeat for several addresses")
    p.add_argument("--api-key-file", default=None,
                   help="file whose first line is the key every HTTP request must send as "
                        "`Authorization: Bearer KEY` (required when --http is not loopback or a unix socket)")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S, dest="step_timeout_s",
                   help="a step running longer than this many seconds makes the daemon unhealthy: status says "
                        f"so and the systemd watchdog stops (default {DEFAULT_STEP_TIMEOUT_S:g})")
    p.add_argument("--worker-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                   help="with --runtime workers: restarts of crashed workers allowed in "
                        f"{RESTART_WINDOW_S:g} s before the daemon gives up and exits 1 (default {DEFAULT_MAX_RESTARTS})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from flashllm.runtime.daemon.socket_lock import IpcEndpointLock
    from flashllm.runtime.daemon.systemd_notify import SystemdNotifier

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} is invalid: give at least 1")
    if args.step_timeout_s <= 0:
        raise ValueError(f"--step-timeout {args.step_timeout_s} is invalid: give a positive number of seconds")
    if args.worker_restarts < 0:
        raise ValueError(f"--worker-restarts {args.worker_restarts} is invalid: give 0 or more")
    if args.drain_timeout_s < 0:
        raise ValueError(f"--drain-timeout-s {args.drain_timeout_s} is invalid: give 0 or more seconds")
    if args.socket_group is not None:
        _check_group_exists(args.socket_group)  # before minutes of loading, not after
    if args.api_key_file is not None and args.http is None:
        raise ValueError("--api-key-file is for the HTTP API: give --http ADDRESS too, or drop it")
    http = _http_front_door(args)  # address and key checked before minutes of loading
    notifier = SystemdNotifier(unset_environment=True)  # workers spawned later must not inherit $NOTIFY_SOCKET
    lock = IpcEndpointLock(args.socket)
    lock.acquire()
    try:
        if http is not None:
            http.claim()
        import uvloop

        return uvloop.run(_serve(args, notifier, lock, http))
    finally:
        if http is not None:
            http.release()
        lock.release()


def _http_front_door(args):
    """The OpenAI HTTP API (runtime/daemon/http_api.py) when --http is given, else None."""
    if args.http is None:
        return None
    from flashllm.runtime.daemon.http_api import HttpFrontDoor, HttpOptions, model_id_for
    from flashllm.runtime.daemon.metrics import DaemonMetrics

    options = HttpOptions.from_args(args.http, args.api_key_file, args.socket_group)
    return HttpFrontDoor(options, model_id_for(args.store), DaemonMetrics())


def _check_group_exists(group: str) -> None:
    import grp

    from flashllm.runtime.daemon.socket_lock import IpcEndpointError

    try:
        grp.getgrnam(group)
    except KeyError:
        raise IpcEndpointError(f"socket group {group!r} does not exist: create it (systemd-sysusers "
                               f"deploy/flashllm.sysusers, or groupadd {group}) or drop --socket-group") from None


def build_engine(args):
    """The engine behind the daemon; the worker runtime plugs in here (Engine(executor=...))."""
    from flashllm.runtime.core.engine_config import engine_from_args

    return engine_from_args(args, max_batch=args.max_batch)


async def _serve(args, notifier, lock, http=None) -> int:
    import zmq
    import zmq.asyncio

    from flashllm.runtime.daemon.socket_lock import apply_socket_permissions
    from flashllm.runtime.daemon.systemd_notify import watchdog_loop

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    if http is not None:
        await http.start()  # /health answers 503 while the model loads
    notifier.status(f"loading {args.store} (mode {args.mode}, max batch {args.max_batch})")
    log.info("loading %s (mode %s, max batch %d)", args.store, args.mode, args.max_batch)
    engine_future = loop.run_in_executor(None, build_engine, args)
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({engine_future, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if engine_future.done() and engine_future.exception() is not None:
        notifier.status(f"failed to start: {engine_future.exception()}")
    if stop.is_set():
        notifier.stopping()
        log.info("stopped while loading; waiting for the load to finish before exiting")
        try:
            (await engine_future).close()
        except Exception:
            pass
        if http is not None:
            await http.stop()
        return 0
    stop_wait.cancel()
    if engine_future.exception() is not None and http is not None:
        await http.stop()
    engine = engine_future.result()  # a load error (bad store, budget) propagates: exit 2 from the CLI

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    scheduler = Scheduler(engine, max_queued=args.max_queued, step_timeout_s=args.step_timeout_s)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        sock.bind(lock.endpoint)
        apply_socket_permissions(lock.socket_path, mode=0o660, group=args.socket_group)
        arch = engine.arch
        model = f"{os.path.basename(os.path.normpath(args.store))} ({arch.source_model_type or arch.family})"
        log.info("%s", engine.mode_reason)
        if engine.head_reason:
            log.info("%s", engine.head_reason)
        server = ClientServer(sock, scheduler, model=model, mode=engine.mode)
        if http is not None:
            from flashllm.runtime.daemon.http_api import model_card_for

            http.attach(scheduler, model_card_for(args.store, engine, engine.mode))
        run_task = asyncio.create_task(scheduler.run())
        receive_task = asyncio.create_task(server.receive_loop())
        notifier.ready()
        notifier.status(f"serving {args.store} on {lock.socket_path}")
        log.info("serving %s on %s", model, lock.socket_path)
        watchdog_task = asyncio.create_task(
            watchdog_loop(notifier, notifier.watchdog_interval_s(), scheduler.healthy))
        status_task = asyncio.create_task(_status_line_loop(notifier, scheduler, model))
        stop_wait = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stop_wait, run_task, receive_task}, return_when=asyncio.FIRST_COMPLETED)
        failed = run_task.done() or receive_task.done()

        notifier.stopping()
        in_flight = scheduler.requests_running + scheduler.requests_queued
        notifier.status(f"draining {in_flight} requests (at most {args.drain_timeout_s:g} s)")
        log.info("stopping: draining %d requests (at most %g s)", in_flight, args.drain_timeout_s)
        if failed:
            scheduler.cancel_all(lambda request: ErrorReply(request.request_id, ErrorCode.INTERNAL,
                                                            "the daemon failed and is restarting; send it again"))
        else:
            cut = await scheduler.drain(args.drain_timeout_s)
            if cut:
                log.warning("drain timed out: %d requests were cut off", cut)
        if http is not None:
            await http.stop()  # after the drain: streams still running got their last chunks
        scheduler.close()
        for task in (receive_task, watchdog_task, status_task, stop_wait):
            task.cancel()
        await asyncio.gather(receive_task, watchdog_task, status_task, stop_wait, return_exceptions=True)
        await _end_a_stuck_step(run_task, scheduler)
        try:
            await run_task
        except BaseException:
            log.exception("the engine failed; exiting with status 1 so the service manager restarts the daemon")
            return 1
        if receive_task.done() and not receive_task.cancelled() and receive_task.exception() is not None:
            log.error("the receive loop failed", exc_info=receive_task.exception())
            return 1
        return 0
    finally:
        if http is not None:
            await http.stop()
        sock.close(linger=CLOSE_LINGER_MS)
        ctx.term()
        scheduler.shutdown_threads()
        engine.close()
        log.info("stopped")


async def _end_a_stuck_step(run_task: asyncio.Task, scheduler) -> None:
    """At shutdown, a step still running after the drain (a worker stopped or hung) gets STUCK_GRACE_S more,
    then its workers are killed so that the step fails and the daemon can exit."""
    if run_task.done():
        return
    done, _ = await asyncio.wait({run_task}, timeout=STUCK_GRACE_S)
    if not done and scheduler.interrupt_step():
        log.error("a step was still running %g s after the drain; killed the workers to stop it",
                  STUCK_GRACE_S)


async def _status_line_loop(notifier, scheduler, model: str) -> None:
    """Keep `systemctl status` showing the load, when it changes."""
    if not notifier.enabled:
        return
    last = None
    while True:
        await asyncio.sleep(STATUS_LINE_INTERVAL_S)
        status = scheduler.status("", model=model, mode="")
        line = (f"serving {model}: {status.requests_running} running, {status.requests_queued} queued, "
                f"{status.tokens_per_s:.1f} tokens/s")
        if line != last:
            notifier.status(line)
            last = line


class ClientServer:
    """Reads client frames from the ROUTER socket, answers them, and routes the scheduler's replies back."""

    def __init__(self, sock, scheduler, model: str, mode: str):
        self._sock = sock
        self._scheduler = scheduler
        self._model = model
        self._mode = mode
        self._started_s = time.monotonic()
        # (identity, client id) → ScheduledRequest, or None while its prompt is being tokenized
        self._requests: dict[tuple[bytes, str], object] = {}
        self._cancel_early: set[tuple[bytes, str]] = set()  # cancelled before the scheduler had it
        self._tasks: set[asyncio.Task] = set()
        self._handlers = {GenerateRequest: self._on_generate, CancelRequest: self._on_cancel,
                          StatusRequest: self._on_status, HealthRequest: self._on_health}

    async def receive_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._on_frames(frames)
            except Exception:  # a bug must cost one request, never the loop that serves everyone
                log.exception("handling a client frame failed")
                self._scheduler.record_refused()
                self.send(frames[0], ErrorReply(None, ErrorCode.INTERNAL, "the daemon could not handle this "
                                                "request (its log says why); the daemon carries on"))

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._scheduler.record_refused()
            self.send(identity, ErrorReply(None, ErrorCode.MALFORMED,
                                           f"expected one frame per request, got {len(frames) - 1}"))
            return
        try:
            request = decode_request(frames[1])
        except ProtocolError as error:
            log.info("refused a request: %s", error.message)
            self._scheduler.record_refused()
            self.send(identity, ErrorReply(error_id(error), error.code, error.message))
            return
        try:
            self._handlers[type(request)](identity, request)
        except Exception as error:  # a bug must cost one request, not the daemon
            log.exception("handling %s failed", request.op)
            self._scheduler.record_refused()
            self.send(identity, ErrorReply(request.id, ErrorCode.INTERNAL, f"{request.op} failed: {error}"))

    def send(self, identity: bytes, reply) -> bool:
        """Send now without waiting; False when the client is gone (or stopped reading)."""
        import zmq

        future = self._sock.send_multipart([identity, encode(reply)], flags=zmq.NOBLOCK)
        error = future.exception() if future.done() else None
        if error is None:
            return True
        if not isinstance(error, zmq.ZMQError) or error.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            log.warning("sending to a client failed: %s", error)
        return False

    # ------------------------------------------------------------------ handlers

    def _on_generate(self, identity: bytes, request) -> None:
        key = (identity, request.id)
        if key in self._requests:
            self.send(identity, ErrorReply(request.id, ErrorCode.DUPLICATE_ID,
                                           f"request id {request.id!r} is already running on this connection; "
                                           "use a new id per request"))
            return
        self._requests[key] = None
        task = asyncio.create_task(self._start_generate(identity, key, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_generate(self, identity: bytes, key, request) -> None:
        from flashllm.runtime.core.sampling import SamplingParams

        if request.messages is not None:
            prompt = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            prompt = request.prompt
        params = SamplingParams(**request.sampling_fields())
        try:
            handle = await self._scheduler.submit(request.id, prompt, params,
                                                  functools.partial(self._deliver, identity, key),
                                                  chat=request.chat, stream=request.stream)
        except RequestRejected as error:
            self._forget(key)
            self.send(identity, ErrorReply(request.id, error.code, error.message))
            return
        except Exception as error:  # e.g. the tokenizer choking on a prompt: this request fails, nothing else
            log.exception("starting generate %r failed", request.id)
            self._scheduler.record_refused()
            self._forget(key)
            self.send(identity, ErrorReply(request.id, ErrorCode.INTERNAL, f"generate failed: {error}"))
            return
        self._requests[key] = handle
        if key in self._cancel_early:
            self._cancel_early.discard(key)
            self._scheduler.cancel(handle, self._scheduler.cancelled_final(handle))

    def _forget(self, key) -> None:
        self._requests.pop(key, None)
        self._cancel_early.discard(key)

    def _deliver(self, identity: bytes, key, reply) -> bool:
        if isinstance(reply, (FinalMessage, ErrorReply)):
            self._requests.pop(key, None)
        delivered = self.send(identity, reply)
        if not delivered:
            self._requests.pop(key, None)
        return delivered

    def _on_cancel(self, identity: bytes, request) -> None:
        key = (identity, request.id)
        if key not in self._requests:
            self.send(identity, ErrorReply(request.id, ErrorCode.NOT_FOUND,
                                           f"no running request {request.id!r} on this connection to cancel"))
            return
        handle = self._requests[key]
        if handle is None:
            self._cancel_early.add(key)
        else:
            self._scheduler.cancel(handle, self._scheduler.cancelled_final(handle))

    def _on_status(self, identity: bytes, request) -> None:
        self.send(identity, self._scheduler.status(request.id, model=self._model, mode=self._mode))

    def _on_health(self, identity: bytes, request) -> None:
        self.send(identity, HealthReply(id=request.id, state=self._scheduler.state, ok=self._scheduler.healthy(),
                                        uptime_s=time.monotonic() - self._started_s))
