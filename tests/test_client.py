"""The client library and its protocol, without a model: round trips, validation, no daemon, a silent daemon.

A daemon that never answers is a bare ROUTER socket; the real daemon is in test_serve.py.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading

import msgpack
import pytest
import zmq

from flashllm.protocol.client_api import (CancelRequest, ChatMessage, ErrorCode, ErrorReply, FinalMessage, GenerateRequest,
                                 HealthReply, HealthRequest, Heartbeat, ProtocolError, StatusReply, StatusRequest,
                                 Timings, TokenChunk, Usage, decode_reply, decode_request, encode)
from flashllm.runtime.clients.client import (AsyncClient, Client, ClientTimeoutError, DaemonUnavailableError, RequestFailed,
                            check_daemon_listening)


def test_importing_the_client_does_not_import_torch():
    code = "import sys, flashllm.runtime.clients.client; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------- protocol round trips

REQUESTS = [
    GenerateRequest(id="g1", prompt="Hello", max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                    stop=["\n"], ignore_eos=True, stream=False),
    GenerateRequest(id="g2", messages=[ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]),
    CancelRequest(id="g1"),
    StatusRequest(id="s"),
    HealthRequest(id="h"),
]
REPLIES = [
    TokenChunk(id="g1", text="Hel", token_ids=[1, 2]),
    Heartbeat(id="g1"),
    FinalMessage(id="g1", text="Hello", token_ids=[1, 2, 3], finish_reason="stop", usage=Usage(4, 3),
                 timings=Timings(0.5, 10.0, 20.0, 30.5, 100.0)),
    ErrorReply(id=None, code=ErrorCode.MALFORMED, message="not msgpack"),
    HealthReply(id="h", state="ready", ok=True, uptime_s=1.5),
    StatusReply(id="s", state="ready", ok=True, model="m", mode="sparse", max_batch=8, requests_running=2,
                requests_queued=1, requests_completed=10, requests_failed=0, tokens_generated=99, uptime_s=5.0,
                window_s=5.0, tokens_per_s=12.5, steps_per_s=6.0, mean_batch=2.0, step_ms=80.0, io_ms_per_step=30.0,
                compute_ms_per_step=40.0, flash_bytes_per_token=1e6, cache_hit_rate=0.8),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.op)
def test_every_request_round_trips(request_):
    assert decode_request(encode(request_)) == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: r.type)
def test_every_reply_round_trips(reply):
    assert decode_reply(encode(reply)) == reply


def test_integers_are_accepted_where_numbers_are_expected():
    frame = msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "temperature": 1, "top_p": 1})
    request = decode_request(frame)
    assert request.temperature == 1.0 and isinstance(request.temperature, float)


@pytest.mark.parametrize("wire, code, words", [
    (b"\x93\x01", ErrorCode.MALFORMED, "not valid msgpack"),
    (msgpack.packb("generate"), ErrorCode.MALFORMED, "must be a msgpack map"),
    (msgpack.packb({"id": "a"}), ErrorCode.INVALID_REQUEST, 'no "op"'),
    (msgpack.packb({"op": "fly", "id": "a"}), ErrorCode.UNKNOWN_OP, "unknown op 'fly'"),
    (msgpack.packb({"op": "status"}), ErrorCode.INVALID_REQUEST, "missing field 'id'"),
    (msgpack.packb({"op": "status", "id": ""}), ErrorCode.INVALID_REQUEST, "id='' is invalid"),
    (msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "top_p": 0}), ErrorCode.INVALID_REQUEST, "(0, 1]"),
    (msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "seed": -1}), ErrorCode.INVALID_REQUEST, "seed=-1"),
    (msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "stop": [""]}), ErrorCode.INVALID_REQUEST, "stop"),
    (msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "max_tokens": 1.5}), ErrorCode.INVALID_REQUEST,
     "max_tokens must be an integer"),
    (msgpack.packb({"op": "generate", "id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}),
     ErrorCode.INVALID_REQUEST, "exactly one of"),
    (msgpack.packb({"op": "generate", "id": "a", "messages": []}), ErrorCode.INVALID_REQUEST, "messages is empty"),
    (msgpack.packb({"op": "generate", "id": "a", "messages": [{"role": "user", "content": "x"}] * 1025}),
     ErrorCode.TOO_LARGE, "at most 1024 chat messages"),
    (msgpack.packb({"op": "generate", "id": "a", "messages": [{"role": "user", "content": "y" * 600_000}] * 2}),
     ErrorCode.TOO_LARGE, "1200000 characters"),
])
def test_bad_requests_name_what_is_wrong(wire, code, words):
    with pytest.raises(ProtocolError) as refused:
        decode_request(wire)
    assert refused.value.code == code
    assert words in refused.value.message


# ---------------------------------------------------------------------- no daemon, a silent daemon


def test_no_daemon_says_how_to_start_one(tmp_path):
    with pytest.raises(DaemonUnavailableError, match="does not exist; start one with `flashllm serve"):
        Client(str(tmp_path / "flashllm.sock"))


def test_a_socket_left_by_a_dead_daemon_is_reported_as_no_daemon(tmp_path):
    path = str(tmp_path / "flashllm.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # bound but never listening: what a killed daemon leaves
    with pytest.raises(DaemonUnavailableError, match="no flashllm daemon listens"):
        Client(path)
    with pytest.raises(DaemonUnavailableError, match="no flashllm daemon listens"):
        AsyncClient("ipc://" + path)


def test_a_regular_file_is_not_taken_for_a_daemon(tmp_path):
    path = tmp_path / "flashllm.sock"
    path.write_text("")
    with pytest.raises(DaemonUnavailableError, match="is not a socket"):
        check_daemon_listening(str(path))


@pytest.fixture
def silent_daemon(tmp_path):
    """A ROUTER that reads requests and never answers; yields (path, list of requests seen)."""
    path = str(tmp_path / "silent.sock")
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind("ipc://" + path)
    seen = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            if sock.poll(50):
                seen.append(decode_request(sock.recv_multipart()[1]))

    reader = threading.Thread(target=read)
    reader.start()
    yield path, seen
    stop.set()
    reader.join()
    sock.close(linger=0)


def test_a_silent_daemon_times_out(silent_daemon):
    path, seen = silent_daemon
    with Client(path, timeout_s=0.3) as client:
        with pytest.raises(ClientTimeoutError, match="no reply from the daemon"):
            client.health()
        with pytest.raises(TimeoutError):  # ClientTimeoutError is a TimeoutError too
            client.generate("hi")
    assert [type(r) for r in seen] == [HealthRequest, GenerateRequest]


async def test_a_silent_daemon_times_out_async(silent_daemon):
    path, _ = silent_daemon
    async with AsyncClient(path, timeout_s=0.3) as client:
        with pytest.raises(ClientTimeoutError):
            await client.status()
        stream = client.stream("hi")
        with pytest.raises(ClientTimeoutError):
            async for _ in stream:
                pass


def test_bad_parameters_are_refused_before_sending(silent_daemon):
    path, seen = silent_daemon
    with Client(path, timeout_s=0.3) as client:
        with pytest.raises(RequestFailed) as refused:
            client.generate("hi", max_tokens=0)
        assert refused.value.code == ErrorCode.INVALID_REQUEST and "max_tokens=0" in refused.value.message
        with pytest.raises(RequestFailed, match="exactly one of prompt"):
            client.generate()
    assert seen == []


def test_messages_may_be_plain_dicts():
    request = GenerateRequest(id="x", messages=[{"role": "user", "content": "hi"}])
    decoded = decode_request(encode(request))
    assert decoded.messages == [ChatMessage("user", "hi")]
    assert dataclasses.asdict(decoded.messages[0]) == {"role": "user", "content": "hi"}
