"""`flashllm serve`: a real daemon process, talked to the way users and systemd do.

A tiny random model keeps these fast; what is checked is the daemon's
behaviour, not the text: systemd notifications and a clean exit, continuous
batching that gives every request the output it would get alone, bad requests
answered with errors while the daemon carries on, clients that vanish.
"""
from __future__ import annotations

import asyncio
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import time

import msgpack
import pytest
import zmq

from daemon_process import running_daemon
from flashllm.protocol.client_api import (MAX_REQUEST_BYTES, ErrorCode, ErrorReply, FinalMessage, GenerateRequest, TokenChunk,
                                 decode_reply, encode)
from flashllm.runtime.clients.cli import main as cli_main
from flashllm.runtime.clients.client import AsyncClient, Client, RequestFailed

PROMPTS = ["The quick brown fox", "Flash memory is", "Paris is the capital", "def add(a, b):",
           "1 2 3 4", "Large language models", "Berlin is", "The lazy dog"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def daemon(tiny_stores):
    """One daemon for the protocol tests: 4 batch slots, so 64 requests queue, join and leave."""
    group = grp.getgrgid(os.getgid()).gr_name
    with running_daemon(tiny_stores("llama"), ["--max-batch", "4", "--socket-group", group]) as running:
        yield running


@pytest.fixture(scope="module")
def sparse_store(calibrated_stores):
    """A calibrated copy of the tiny store: what the worker runtime (--mode sparse --runtime workers) needs."""
    return calibrated_stores("llama")


@pytest.fixture(scope="module")
def single_outputs(daemon):
    """Greedy tokens of each prompt run alone (nothing else in the batch)."""
    with Client(daemon.socket_path) as client:
        return {p: client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids for p in PROMPTS}


@pytest.fixture
def raw(daemon):
    """A bare DEALER socket, for frames the Client would never send."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + daemon.socket_path)
    yield sock
    sock.close(linger=0)


def receive(sock, timeout_s: float = 10.0):
    assert sock.poll(timeout_s * 1e3), "the daemon did not answer"
    return decode_reply(sock.recv())


def receive_until_final(sock, request_id: str):
    while True:
        reply = receive(sock)
        if reply.id == request_id and not isinstance(reply, TokenChunk) and reply.type != "heartbeat":
            return reply


def assert_still_serves(daemon) -> None:
    with Client(daemon.socket_path, timeout_s=30) as client:
        final = client.generate("The quick brown fox", max_tokens=4)
    assert final.usage.completion_tokens >= 1


# ---------------------------------------------------------------------- systemd and lifecycle


def test_ready_then_watchdog_then_stopping_and_a_clean_exit(sparse_store, tmp_path):
    """The deployment's shape: worker processes and shared memory, all gone after SIGTERM."""
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(notify_path)
        manager.settimeout(60)
        env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
        args = ["--max-batch", "2", "--mode", "sparse", "--runtime", "workers"]
        with running_daemon(sparse_store, args, env=env, wait=False) as daemon:
            received = []

            def wait_for(line: str) -> None:
                while line not in received:
                    received.extend(manager.recv(4096).decode().split("\n"))

            wait_for("READY=1")
            assert len(daemon.note_workers()) >= 3  # prefetch, predictor, compute were up before READY
            assert any(m.startswith("STATUS=loading") for m in received[:received.index("READY=1")])
            assert not any(m == "WATCHDOG=1" for m in received[:received.index("READY=1")])
            wait_for("WATCHDOG=1")
            pings = received.count("WATCHDOG=1")
            while received.count("WATCHDOG=1") == pings:  # and they repeat (every 0.2 s)
                received.extend(manager.recv(4096).decode().split("\n"))

            with Client(daemon.socket_path) as client:
                stream = client.stream("The quick brown fox", max_tokens=40, ignore_eos=True)
                first = next(stream)
                daemon.process.send_signal(signal.SIGTERM)
                wait_for("STOPPING=1")
                rest = "".join(chunk.text for chunk in stream)  # the in-flight request is drained, not cut
            assert stream.final.usage.completion_tokens == 40
            assert stream.final.text == first.text + rest
            assert daemon.process.wait(timeout=30) == 0
        # running_daemon checked: no socket, lock, shared memory or process left behind


def test_a_service_manager_that_stops_reading_does_not_stall_the_daemon(tiny_stores, tmp_path):
    """Its notification queue fills with watchdog pings (10 datagrams here); clients are still answered."""
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(notify_path)  # and never read
        env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
        with running_daemon(tiny_stores("llama"), ["--max-batch", "1"], env=env) as daemon:
            time.sleep(2.5)  # ~25 pings at 0.1 s
            with Client(daemon.socket_path, timeout_s=10) as client:
                result = client.generate("The quick brown fox", max_tokens=8, ignore_eos=True)
                assert result.usage.completion_tokens == 8
            assert "not reading its notification socket" in daemon.log()


def test_drain_is_bounded_and_cut_requests_get_an_error(tiny_stores):
    with running_daemon(tiny_stores("llama"), ["--max-batch", "1", "--drain-timeout-s", "0.3"]) as daemon:

        async def flood():
            async with AsyncClient(daemon.socket_path) as client:
                tasks = [asyncio.create_task(client.generate(p, max_tokens=200, ignore_eos=True))
                         for p in PROMPTS * 3]
                await asyncio.sleep(0.5)
                daemon.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        start = time.monotonic()
        results = asyncio.run(flood())
        assert daemon.process.wait(timeout=30) == 0
        assert time.monotonic() - start < 20
    cut = [r for r in results if isinstance(r, RequestFailed)]
    assert cut and all(r.code == ErrorCode.SHUTTING_DOWN for r in cut)
    assert all(isinstance(r, (FinalMessage, RequestFailed)) for r in results)


def test_second_serve_on_the_same_socket_refuses(daemon, tiny_stores):
    second = subprocess.run(["flashllm", "serve", "--store", tiny_stores("llama"), "--socket", daemon.socket_path],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "already serving" in second.stderr and str(daemon.process.pid) in second.stderr
    assert_still_serves(daemon)


def test_socket_is_for_owner_and_group_only(daemon):
    info = os.stat(daemon.socket_path)
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()


def test_unknown_socket_group_refuses_before_loading(tiny_stores, tmp_path):
    run = subprocess.run(["flashllm", "serve", "--store", tiny_stores("llama"), "--socket", str(tmp_path / "s.sock"),
                          "--socket-group", "no-such-group-here"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "socket group 'no-such-group-here' does not exist" in run.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- continuous batching


async def test_sixteen_async_clients_four_requests_each_equal_single_outputs(daemon, single_outputs):
    async def one_client(n: int) -> list[tuple[str, list[int]]]:
        async with AsyncClient(daemon.socket_path) as client:
            prompts = [PROMPTS[(n + k) % len(PROMPTS)] for k in range(4)]
            finals = await asyncio.gather(*(client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True)
                                            for p in prompts))
            return [(p, f.token_ids) for p, f in zip(prompts, finals)]

    results = [pair for client_results in await asyncio.gather(*(one_client(n) for n in range(16)))
               for pair in client_results]
    assert len(results) == 64
    for prompt, tokens in results:
        assert tokens == single_outputs[prompt], prompt


async def test_streamed_chunks_add_up_to_the_final_text(daemon, single_outputs):
    async with AsyncClient(daemon.socket_path) as client:
        stream = client.stream(PROMPTS[1], max_tokens=MAX_TOKENS, ignore_eos=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.text for c in chunks) == stream.final.text
    assert [t for c in chunks for t in c.token_ids] == stream.final.token_ids == single_outputs[PROMPTS[1]]
    assert stream.final.usage.completion_tokens == MAX_TOKENS and stream.final.finish_reason == "length"


def test_cancel_ends_a_request_with_finish_reason_cancelled(daemon):
    with Client(daemon.socket_path) as client:
        stream = client.stream(PROMPTS[0], max_tokens=200, ignore_eos=True)
        next(stream)
        client.cancel(stream.request_id)
        list(stream)
        assert stream.final.finish_reason == "cancelled"
        assert stream.final.usage.completion_tokens < 200
        assert client.status().requests_running == 0


def test_status_reports_load_and_throughput(daemon, single_outputs):
    with Client(daemon.socket_path) as client:
        status = client.status()
    assert status.ok and status.state == "ready" and status.mode == "dense" and status.max_batch == 4
    assert status.requests_completed >= len(PROMPTS) and status.tokens_generated > 0
    assert status.requests_running == 0 and status.requests_queued == 0
    assert status.cache_hit_rate is None  # dense mode has no neuron cache
    assert status.head_precision == "stored"  # no --memory: the head as the store holds it


def test_status_says_when_the_head_is_a_sketch():
    from dataclasses import replace

    from flashllm.protocol.client_api import StatusReply, validate
    from flashllm.runtime.clients.client_cli import human_status

    stored = validate(StatusReply(
        id="s", state="ready", ok=True, model="smollm2 (gguf:llama)", mode="naive", max_batch=1, requests_running=0,
        requests_queued=0, requests_completed=0, requests_failed=0, tokens_generated=0, uptime_s=1.0, window_s=1.0,
        tokens_per_s=0.0, steps_per_s=0.0, mean_batch=0.0, step_ms=0.0, io_ms_per_step=0.0,
        compute_ms_per_step=0.0, flash_bytes_per_token=0.0, cache_hit_rate=None))
    assert "mode naive, max batch 1\n" in human_status("d.sock", stored)
    assert "mode naive, max batch 1, head as a 4-bit sketch\n" in human_status(
        "d.sock", replace(stored, head_precision="4bit"))


def test_status_command_json_prometheus_and_human(daemon, single_outputs, capsys):
    as_json = subprocess.run(["flashllm", "status", "--socket", daemon.socket_path, "--json"],
                             capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    fields = json.loads(as_json.stdout)
    assert fields["ok"] and fields["requests_completed"] >= len(PROMPTS)
    assert cli_main(["status", "--socket", daemon.socket_path, "--prometheus"]) == 0
    prom = capsys.readouterr().out
    assert "flashllm_up 1" in prom and "flashllm_requests_running 0" in prom
    assert cli_main(["status", "--socket", daemon.socket_path]) == 0
    human = capsys.readouterr().out
    assert "ready (healthy)" in human and "tokens/s" in human


def test_status_without_a_daemon_exits_2_with_what_to_do(tmp_path, capsys):
    assert cli_main(["status", "--socket", str(tmp_path / "nobody.sock")]) == 2
    assert "flashllm serve --store STORE --socket" in capsys.readouterr().err


def test_generate_command_through_the_daemon(daemon, capsys):
    with Client(daemon.socket_path) as client:
        expected = client.generate(PROMPTS[2], max_tokens=6, ignore_eos=True)
    assert cli_main(["generate", "--socket", daemon.socket_path, "--max-tokens", "6", "--ignore-eos", "--json",
                     PROMPTS[2], PROMPTS[3]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS[2:4]
    assert lines[0]["tokens"] == expected.token_ids and lines[0]["text"] == expected.text
    assert cli_main(["generate", "--socket", daemon.socket_path, "--max-tokens", "6", "--ignore-eos",
                     PROMPTS[2]]) == 0
    assert capsys.readouterr().out == expected.text + "\n"  # one prompt streams to stdout


# ---------------------------------------------------------------------- the scheduler's policy, in-process


class RecordingEngine:
    """An engine stand-in whose step() records who was prefilled and who decoded; one token per word of prompt."""

    def __init__(self, max_batch: int, prefill_token_budget: int = 2048):
        from flashllm.runtime.core.engine import RequestOutput

        self.output = RequestOutput
        self.max_batch, self.max_context, self.prefill_token_budget = max_batch, 4096, prefill_token_budget
        self.token_stats: list[dict] = []
        self.waiting: list[tuple[str, int, int]] = []  # (id, prompt tokens, max_tokens)
        self.running: dict[str, list[int]] = {}  # id → [generated, max_tokens, prompt tokens]
        self.steps: list[dict] = []
        self.aborted: list[str] = []

    def encode_prompt(self, prompt, chat=False):
        return [7] * len(prompt.split())

    def add_request(self, prompt_ids, params, request_id):
        self.waiting.append((request_id, len(prompt_ids), params.max_tokens))

    def abort(self, request_id):
        self.aborted.append(request_id)
        self.running.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    @property
    def num_running(self):
        return len(self.running)

    @property
    def num_waiting(self):
        return len(self.waiting)

    def step(self):
        time.sleep(0.002)  # a step takes time: requests arrive while it runs
        decoding = list(self.running)
        prefilled = [rid for rid, _, _ in self.waiting]
        for rid, prompt_tokens, max_tokens in self.waiting:
            self.running[rid] = [0, max_tokens, prompt_tokens]
        self.waiting = []
        assert len(self.running) <= self.max_batch
        self.steps.append({"prefilled": prefilled, "decoded": decoding, "batch": len(self.running)})
        self.token_stats.append({"batch": len(decoding), "ms": 1.0})
        outputs = []
        for rid in prefilled + decoding:
            state = self.running[rid]
            state[0] += 1
            done = state[0] >= state[1]
            outputs.append(self.output(rid, [5], "x", done, "length" if done else None, state[2], state[0]))
            if done:
                del self.running[rid]
        return outputs


async def test_long_prompts_arriving_do_not_starve_running_streams():
    from flashllm.runtime.core.sampling import SamplingParams
    from flashllm.runtime.daemon.scheduler import Scheduler

    engine = RecordingEngine(max_batch=8, prefill_token_budget=512)
    scheduler = Scheduler(engine)
    finals = []
    deliver = lambda reply: finals.append(reply) or True  # noqa: E731 (True: the client is there)
    run = asyncio.create_task(scheduler.run())
    streams = [await scheduler.submit(f"s{i}", "short prompt", SamplingParams(max_tokens=40), deliver)
               for i in range(2)]
    await asyncio.sleep(0.01)  # the two streams are decoding
    for i in range(6):
        await scheduler.submit(f"long{i}", "word " * 300, SamplingParams(max_tokens=3), deliver)
    while sum(isinstance(f, FinalMessage) for f in finals) < 8:
        await asyncio.sleep(0.001)
    scheduler.close()
    await run
    scheduler.shutdown_threads()
    stream_ids = {s.engine_id for s in streams}
    busy = [step for step in engine.steps if stream_ids <= set(step["decoded"])]
    assert any(step["prefilled"] for step in busy)
    assert all(len(step["prefilled"]) <= 1 for step in busy)  # 300-token prompts: one per step (512 budget)
    assert all(step["batch"] <= 8 for step in engine.steps)
    assert sorted(f.id for f in finals if isinstance(f, FinalMessage)) == sorted(
        ["s0", "s1"] + [f"long{i}" for i in range(6)])


async def test_batch_never_exceeds_max_batch_and_cancel_leaves_between_steps():
    from flashllm.runtime.core.sampling import SamplingParams
    from flashllm.runtime.daemon.scheduler import Scheduler

    engine = RecordingEngine(max_batch=3)
    scheduler = Scheduler(engine)
    replies = []
    run = asyncio.create_task(scheduler.run())
    handles = await asyncio.gather(*(scheduler.submit(f"r{i}", "a b", SamplingParams(max_tokens=30),
                                                      lambda reply: replies.append(reply) or True)
                                     for i in range(7)))
    await asyncio.sleep(0.02)
    assert scheduler.requests_running == 3 and scheduler.requests_queued >= 1
    victim = next(h for h in handles if h.engine_id in engine.running)
    scheduler.cancel(victim, scheduler.cancelled_final(victim))
    while sum(isinstance(r, FinalMessage) for r in replies) < 7:
        await asyncio.sleep(0.001)
    scheduler.close()
    await run
    scheduler.shutdown_threads()
    assert engine.aborted == [victim.engine_id]
    assert max(step["batch"] for step in engine.steps) == 3
    reasons = {r.id: r.finish_reason for r in replies if isinstance(r, FinalMessage)}
    assert reasons.pop(victim.request_id) == "cancelled" and set(reasons.values()) == {"length"}


# ---------------------------------------------------------------------- bad requests, then a good one


def test_malformed_msgpack_gets_an_error_and_the_daemon_carries_on(daemon, raw):
    raw.send(b"\xc1\xff not msgpack")
    reply = receive(raw)
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.MALFORMED and reply.id is None
    raw.send(msgpack.packb([1, 2, 3]))
    assert receive(raw).code == ErrorCode.MALFORMED
    assert_still_serves(daemon)


def test_unknown_op_gets_an_error(daemon, raw):
    raw.send(msgpack.packb({"op": "summon", "id": "x1"}))
    reply = receive(raw)
    assert reply.code == ErrorCode.UNKNOWN_OP and reply.id == "x1" and "generate" in reply.message
    assert_still_serves(daemon)


@pytest.mark.parametrize("fields, expected", [
    ({"prompt": 42}, "prompt must be a string"),
    ({"prompt": "hi", "max_tokens": "12"}, "max_tokens must be an integer"),
    ({"prompt": "hi", "temperature": [1]}, "temperature must be a finite number"),
    ({"prompt": "hi", "stop": "x"}, "stop must be a list"),
    ({"prompt": "hi", "stream": 1}, "stream must be true or false"),
    ({"messages": [{"role": "user"}]}, "missing field 'content'"),
    ({"prompt": "hi", "colour": "blue"}, "unknown field 'colour'"),
    ({}, "exactly one of prompt"),
])
def test_wrong_types_get_an_error_naming_the_field(daemon, raw, fields, expected):
    raw.send(msgpack.packb({"op": "generate", "id": "bad", **fields}))
    reply = receive(raw)
    assert reply.code == ErrorCode.INVALID_REQUEST and reply.id == "bad"
    assert expected in reply.message


@pytest.mark.parametrize("max_tokens", [0, -5, 10**7])
def test_max_tokens_out_of_range_gets_an_error(daemon, raw, max_tokens):
    raw.send(msgpack.packb({"op": "generate", "id": "m", "prompt": "hi", "max_tokens": max_tokens}))
    reply = receive(raw)
    assert reply.code == ErrorCode.INVALID_REQUEST and f"max_tokens={max_tokens}" in reply.message
    assert_still_serves(daemon)


def test_oversized_prompts_get_an_error(daemon, raw):
    raw.send(msgpack.packb({"op": "generate", "id": "huge", "prompt": "x" * (MAX_REQUEST_BYTES + 10)}))
    reply = receive(raw)
    assert reply.code == ErrorCode.TOO_LARGE and "bytes" in reply.message
    raw.send(encode(GenerateRequest(id="long", prompt="the quick brown fox " * 200)))  # > 256-token context
    reply = receive(raw)
    assert reply.code == ErrorCode.PROMPT_TOO_LONG and reply.id == "long" and "context" in reply.message
    assert_still_serves(daemon)


def test_duplicate_running_id_is_refused(daemon, raw):
    request = GenerateRequest(id="twice", prompt="hi", max_tokens=200, ignore_eos=True, stream=False)
    raw.send(encode(request))
    raw.send(encode(request))
    replies = [receive_until_final(raw, "twice"), receive_until_final(raw, "twice")]
    codes = sorted(r.code if isinstance(r, ErrorReply) else r.finish_reason for r in replies)
    assert codes == [ErrorCode.DUPLICATE_ID, "length"]


def test_client_vanishing_mid_stream_is_cancelled(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect("ipc://" + daemon.socket_path)
    sock.send(encode(GenerateRequest(id="gone", prompt="The lazy dog", max_tokens=250, ignore_eos=True)))
    assert isinstance(receive(sock), TokenChunk)
    sock.close(linger=0)  # the program died mid-stream
    with Client(daemon.socket_path) as client:
        completed = client.status().requests_completed
        deadline = time.monotonic() + 10
        while client.status().requests_running and time.monotonic() < deadline:
            time.sleep(0.02)
        status = client.status()
    assert status.requests_running == 0 and status.requests_completed == completed  # cut, not finished
    assert_still_serves(daemon)


def test_failed_requests_are_counted(daemon, raw):
    with Client(daemon.socket_path) as client:
        before = client.status().requests_failed
        with pytest.raises(RequestFailed) as refused:
            client.generate("the quick brown fox " * 200)
        assert refused.value.code == ErrorCode.PROMPT_TOO_LONG
        assert client.status().requests_failed == before + 1


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_demo_model_answers_a_chat_and_batches_like_it_runs_alone(demo_store):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = ["The capital of France is", "Water boils at", "The first month of the year is"]
    with running_daemon(demo_store, ["--max-batch", "4"]) as daemon:
        with Client(daemon.socket_path) as client:
            answer = client.generate(messages=question, max_tokens=16)
            alone = [client.generate(p, max_tokens=8).token_ids for p in prompts]

        async def together():
            async with AsyncClient(daemon.socket_path) as client:
                return await asyncio.gather(*(client.generate(p, max_tokens=8) for p in [*prompts, *prompts]))

        finals = asyncio.run(together())
    assert "Paris" in answer.text
    assert [f.token_ids for f in finals] == alone + alone
