"""Talk to a running `flashllm serve` from Python: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("/run/flashllm/flashllm.sock") as client:
        print(client.generate("The capital of France is", max_tokens=16).text)
        for chunk in client.stream("Once upon a time", max_tokens=64):
            print(chunk.text, end="", flush=True)

    async with AsyncClient("/run/flashllm/flashllm.sock") as client:
        final = await client.generate(messages=[{"role": "user", "content": "Hi!"}])
        async for chunk in client.stream("Once upon a time"):
            ...

One connection runs any number of requests at once (each reply carries its
request's id). `timeout_s` is the longest silence tolerated: the daemon sends
a heartbeat every second while a request waits or runs, so a long generation
never times out, a dead daemon does. Leaving a stream early (break, close)
cancels its request in the daemon.

Imports only protocol/, pyzmq and msgpack, so a client program never pays for torch.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import socket
import stat
import time

import zmq
import zmq.asyncio

from flashllm.protocol.client_api import (CancelRequest, ErrorReply, FinalMessage, GenerateRequest, HealthReply, HealthRequest,
                                 Heartbeat, ProtocolError, StatusReply, StatusRequest, TokenChunk, decode_reply, encode,
                                 validate)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
IPC_SCHEME = "ipc://"


class ClientError(Exception):
    """Base of everything the client raises."""


class DaemonUnavailableError(ClientError):
    """No daemon listens on the socket (or this user may not connect to it)."""


class ClientTimeoutError(ClientError, TimeoutError):
    """The daemon said nothing for timeout_s."""


class RequestFailed(ClientError):
    """The daemon (or the client's own check) refused or failed the request; `code` is a protocol ErrorCode."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


def check_daemon_listening(socket_path: str) -> str:
    """The absolute socket path if a process listens there; DaemonUnavailableError saying what to do if not."""
    path = os.path.abspath(socket_path.removeprefix(IPC_SCHEME))
    start_hint = (f"start one with `flashllm serve --store STORE --socket {path}` "
                  "(or `systemctl start flashllm`)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DaemonUnavailableError(f"no flashllm daemon at {path}: the socket does not exist; {start_hint}") from None
    except PermissionError:
        raise DaemonUnavailableError(f"cannot reach {path}: permission denied on its directory; ask to be added "
                                     f"to {_group_of(os.path.dirname(path))}") from None
    if not stat.S_ISSOCK(mode):
        raise DaemonUnavailableError(f"{path} is not a socket; pass the daemon's --socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM):
                raise DaemonUnavailableError(f"may not connect to {path}: permission denied; the socket is "
                                             f"for {_group_of(path)}, ask to be added to it") from None
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise DaemonUnavailableError(f"no flashllm daemon listens on {path} (a stopped daemon left the "
                                             f"socket file behind); {start_hint}") from None
            raise DaemonUnavailableError(f"cannot connect to {path}: {error.strerror}") from None
    return path


def _group_of(path: str) -> str:
    """'group NAME' of a file, for telling a user which group to join."""
    import grp

    try:
        gid = os.stat(path).st_gid
    except OSError:
        return "the daemon's socket group"
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"group id {gid}"


def build_generate_request(request_id: str, prompt: str | None, messages: list[dict] | None, stream: bool,
                           **sampling) -> GenerateRequest:
    """A checked generate request; RequestFailed with the daemon's own message if a field is wrong."""
    request = GenerateRequest(id=request_id, prompt=prompt, messages=messages, stream=stream, **sampling)
    try:
        return validate(request)
    except ProtocolError as error:
        raise RequestFailed(error.code, error.message) from None


def _raise_for(reply) -> None:
    if isinstance(reply, ErrorReply):
        raise RequestFailed(reply.code, reply.message)


def _timeout_error(path: str, timeout_s: float) -> ClientTimeoutError:
    return ClientTimeoutError(f"no reply from the daemon at {path} for {timeout_s:g} s; is it still running? "
                              f"(`flashllm status --socket {path}`)")


def _connect(sock: zmq.Socket, path: str) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(IPC_SCHEME + path)


# ---------------------------------------------------------------------- blocking


class Client:
    """A blocking client; not thread-safe (one per thread)."""

    def __init__(self, socket_path: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.socket_path = check_daemon_listening(socket_path)
        self.timeout_s = timeout_s
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        _connect(self._sock, self.socket_path)
        self._ids = itertools.count()
        self._inbox: dict[str, collections.deque] = {}  # replies of requests that are not being read right now

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 request_id: str | None = None, **sampling) -> FinalMessage:
        """Run one request to its end. sampling: chat, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos."""
        request = build_generate_request(request_id or self._new_id(), prompt, messages, False, **sampling)
        self._send(request)
        try:
            while True:
                reply = self._next(request.id)
                _raise_for(reply)
                if isinstance(reply, FinalMessage):
                    return reply
        finally:
            self._inbox.pop(request.id, None)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               request_id: str | None = None, **sampling) -> TokenStream:
        """An iterator of TokenChunks; its `final` holds the FinalMessage once exhausted."""
        request = build_generate_request(request_id or self._new_id(), prompt, messages, True, **sampling)
        self._send(request)
        return TokenStream(self, request.id)

    def cancel(self, request_id: str) -> None:
        self._send(CancelRequest(id=request_id))

    def status(self) -> StatusReply:
        return self._ask(StatusRequest(id=self._new_id()))

    def health(self) -> HealthReply:
        return self._ask(HealthRequest(id=self._new_id()))

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, request):
        self._send(request)
        try:
            reply = self._next(request.id)
        finally:
            self._inbox.pop(request.id, None)
        _raise_for(reply)
        return reply

    def _new_id(self) -> str:
        return f"r{next(self._ids)}"

    def _send(self, request) -> None:
        self._inbox.setdefault(request.id, collections.deque())
        self._sock.send(encode(request))

    def _next(self, request_id: str):
        """The next reply for request_id, keeping other requests' replies for their readers."""
        waiting = self._inbox.get(request_id)
        if waiting:
            return waiting.popleft()
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self._sock.poll(remaining_s * 1e3, zmq.POLLIN):
                raise _timeout_error(self.socket_path, self.timeout_s)
            reply = decode_reply(self._sock.recv())
            if reply.id == request_id or reply.id is None:  # an id-less error answers the frame just sent
                return reply
            if reply.id in self._inbox:  # replies of requests no one reads any more are dropped
                self._inbox[reply.id].append(reply)


def _chunk_of(stream: "TokenStream | AsyncTokenStream", reply) -> TokenChunk | None:
    """One reply of a stream: the chunk to hand out, or None once the stream has ended (an error raises)."""
    if isinstance(reply, TokenChunk):
        return reply
    if isinstance(reply, FinalMessage):
        stream.final = reply
        stream._finish()
    elif isinstance(reply, ErrorReply):
        stream._finish()
        _raise_for(reply)
    return None


class TokenStream:
    """TokenChunks of one streamed request; leaving it early (close(), break in a with-block) cancels the request."""

    def __init__(self, client: Client, request_id: str):
        self._client = client
        self.request_id = request_id
        self.final: FinalMessage | None = None
        self._closed = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> TokenChunk:
        while not self._closed:
            try:
                reply = self._client._next(self.request_id)
            except BaseException:
                self.close()
                raise
            chunk = _chunk_of(self, reply)
            if chunk is not None:
                return chunk
        raise StopIteration

    def text(self) -> str:
        """Read the stream to its end and return the whole text."""
        return "".join(chunk.text for chunk in self)

    def close(self) -> None:
        if not self._closed:
            self._client.cancel(self.request_id)
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        self._client._inbox.pop(self.request_id, None)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------- asyncio


class AsyncClient:
    """An asyncio client; any number of tasks may share one (each request has its own reply queue)."""

    def __init__(self, socket_path: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.socket_path = check_daemon_listening(socket_path)
        self.timeout_s = timeout_s
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        _connect(self._sock, self.socket_path)
        self._ids = itertools.count()
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       request_id: str | None = None, **sampling) -> FinalMessage:
        """Run one request to its end. sampling: chat, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos."""
        request = build_generate_request(request_id or self._new_id(), prompt, messages, False, **sampling)
        queue = await self._send(request)
        try:
            while True:
                reply = await self._next(queue)
                _raise_for(reply)
                if isinstance(reply, FinalMessage):
                    return reply
        except asyncio.CancelledError:
            await self._send_quietly(CancelRequest(id=request.id))
            raise
        finally:
            self._queues.pop(request.id, None)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               request_id: str | None = None, **sampling) -> AsyncTokenStream:
        """An async iterator of TokenChunks; its `final` holds the FinalMessage once exhausted."""
        request = build_generate_request(request_id or self._new_id(), prompt, messages, True, **sampling)
        return AsyncTokenStream(self, request)

    async def cancel(self, request_id: str) -> None:
        await self._sock.send(encode(CancelRequest(id=request_id)))

    async def status(self) -> StatusReply:
        return await self._ask(StatusRequest(id=self._new_id()))

    async def health(self) -> HealthReply:
        return await self._ask(HealthRequest(id=self._new_id()))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _ask(self, request):
        queue = await self._send(request)
        try:
            reply = await self._next(queue)
        finally:
            self._queues.pop(request.id, None)
        _raise_for(reply)
        return reply

    def _new_id(self) -> str:
        return f"r{next(self._ids)}"

    async def _send(self, request) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_replies())
        queue = self._queues[request.id] = asyncio.Queue()
        await self._sock.send(encode(request))
        return queue

    async def _send_quietly(self, request) -> None:
        try:
            await asyncio.shield(self._sock.send(encode(request)))
        except Exception:
            pass

    async def _next(self, queue: asyncio.Queue):
        while True:
            try:
                reply = await asyncio.wait_for(queue.get(), self.timeout_s)
            except TimeoutError:
                raise _timeout_error(self.socket_path, self.timeout_s) from None
            if not isinstance(reply, Heartbeat):
                return reply

    async def _read_replies(self) -> None:
        """Route each reply to its request's queue (the one reader of the socket)."""
        while True:
            frame = await self._sock.recv()
            try:
                reply = decode_reply(frame)
            except ProtocolError as error:
                log.warning("ignoring an unreadable reply from the daemon: %s", error)
                continue
            targets = [self._queues.get(reply.id)] if reply.id is not None else list(self._queues.values())
            for queue in targets:
                if queue is not None:
                    queue.put_nowait(reply)


class AsyncTokenStream:
    """Async iterator of one streamed request's TokenChunks; aclose() (or leaving `async with`) cancels it."""

    def __init__(self, client: AsyncClient, request: GenerateRequest):
        self._client = client
        self._request = request
        self.request_id = request.id
        self.final: FinalMessage | None = None
        self._queue: asyncio.Queue | None = None
        self._closed = False

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._queue is None and not self._closed:
            self._queue = await self._client._send(self._request)
        while not self._closed:
            try:
                reply = await self._client._next(self._queue)
            except BaseException:
                await self.aclose()
                raise
            chunk = _chunk_of(self, reply)
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    async def text(self) -> str:
        """Read the stream to its end and return the whole text."""
        return "".join([chunk.text async for chunk in self])

    async def aclose(self) -> None:
        if not self._closed:
            if self._queue is not None:
                await self._client._send_quietly(CancelRequest(id=self.request_id))
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        self._client._queues.pop(self.request_id, None)

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
