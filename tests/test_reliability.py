"""The daemon probed as an attacker and an operator would: bad frames, dying and stopped workers, another user.

Every test runs a real `flashllm serve` (tests/daemon_process.py), which
checks on the way out that no process, socket, lock or /dev/shm segment is
left behind. The tiny random model keeps each one to seconds; the 5,000-frame
fuzz run is marked slow (the default run sends a few hundred).
"""
from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_process import TEST_ENV, descendants, running_daemon, shm_segments
from flashllm.protocol.client_api import ErrorCode, ErrorReply, FinalMessage, decode_reply
from flashllm.runtime.clients.client import AsyncClient, Client, RequestFailed

DENSE_ARGS = ["--max-batch", "4"]
GOOD_REQUEST = {"op": "generate", "id": "good", "prompt": "The quick brown fox", "max_tokens": 3, "stream": False}
# what a refused request may be answered with: never "internal" (a bug) for a malformed frame
REFUSAL_CODES = {ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_OP, ErrorCode.INVALID_REQUEST,
                 ErrorCode.PROMPT_TOO_LONG, ErrorCode.NOT_FOUND, ErrorCode.DUPLICATE_ID}


@pytest.fixture(scope="module")
def daemon(tiny_stores):
    with running_daemon(tiny_stores("llama"), DENSE_ARGS) as running:
        yield running


@pytest.fixture(scope="module")
def sparse_store(calibrated_stores):
    return calibrated_stores("llama")


@pytest.fixture
def raw(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + daemon.socket_path)
    yield sock
    sock.close(linger=0)


def outcome(sock, timeout_s: float = 30.0):
    """The request's last reply (an error, a final, a status...), skipping chunks and heartbeats."""
    while True:
        assert sock.poll(timeout_s * 1e3), "the daemon did not answer (hung or dead)"
        reply = decode_reply(sock.recv())
        if reply.type not in ("chunk", "heartbeat"):
            return reply


def assert_alive_and_serving(daemon) -> None:
    assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.log()[-3000:]}"
    with Client(daemon.socket_path, timeout_s=30) as client:
        assert client.generate("The quick brown fox", max_tokens=3).usage.completion_tokens >= 1


# ---------------------------------------------------------------------- frames built by hand


class Deep:
    """A value nested `depth` lists (or maps) deep, written straight as msgpack: packb itself refuses >511."""

    def __init__(self, depth: int, maps: bool = False):
        self.depth, self.maps = depth, maps

    def __repr__(self) -> str:
        return f"Deep({self.depth}{', maps' if self.maps else ''})"

    def pack(self) -> bytes:
        if self.maps:  # {"a": {"a": ... nil}}
            return (b"\x81\xa1a" * self.depth) + b"\xc0"
        return b"\x91" * self.depth + b"\xc0"


def pack(value) -> bytes:
    """msgpack of value, where a Deep anywhere inside is written by hand."""
    if isinstance(value, Deep):
        return value.pack()
    if isinstance(value, dict):
        assert len(value) < 16
        return bytes([0x80 | len(value)]) + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, list):
        assert len(value) < 16
        return bytes([0x90 | len(value)]) + b"".join(pack(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


GENERATE_FIELDS = ["id", "prompt", "messages", "chat", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "ignore_eos", "stream"]
BAD_VALUES = [Deep(1000), Deep(10_000), Deep(900, maps=True), None, True, -1, 2**64 - 1, -(2**63), 1e-40, 1e-320,
              -0.0, float("inf"), float("nan"), 1e308, "x", "", b"\xff\xfe", [], {}, ["a", 1], [{"role": "user"}],
              msgpack.ExtType(5, b"ext")]


def corpus() -> list[tuple[str, bytes]]:
    """The hand-made cases: every bad value at every field of every op, plus broken frames."""
    cases = []
    for field in GENERATE_FIELDS:
        for value in BAD_VALUES:
            request = {"op": "generate", "id": "c", "prompt": "hi", "max_tokens": 2, "stream": False}
            if field == "messages":
                request.pop("prompt")
            request[field] = value
            cases.append((f"generate.{field}={value!r:.30}", pack(request)))
        for value in (Deep(1000), 1e-40, None, ["x"] * 3):  # inside a chat turn
            turn = {"role": "user", "content": value}
            cases.append((f"messages[0].content={value!r:.30}",
                          pack({"op": "generate", "id": "c", "messages": [turn], "max_tokens": 2, "stream": False})))
    for op in ("status", "health", "cancel", "summon", Deep(1000), 7, None):
        for value in (Deep(1000), Deep(10_000), 5, None, "", "z" * 200):
            cases.append((f"{op!r:.20}.id={value!r:.20}", pack({"op": op, "id": value})))
    cases += [("not msgpack", b"\xc1\xff"), ("empty", b""), ("truncated", pack(GOOD_REQUEST)[:-3]),
              ("array", pack([1, 2, 3])), ("deep top level", Deep(10_000).pack()),
              ("deep map", Deep(5_000, maps=True).pack()), ("int keys", msgpack.packb({1: 2})),
              ("bytes keys", msgpack.packb({b"op": b"status", b"id": b"x"}, use_bin_type=True)),
              ("two maps", pack(GOOD_REQUEST) * 2), ("messages empty", pack({"op": "generate", "id": "e",
                                                                              "messages": []}))]
    return cases


CORPUS = corpus()


def test_the_hand_made_corpus_gets_typed_errors_and_the_daemon_carries_on(daemon, raw):
    """Nesting to 10,000, tiny and huge numbers, wrong types at every field: each answered, none fatal."""
    assert len(CORPUS) >= 105
    answered = {}
    for name, frame in CORPUS:
        raw.send(frame)
        reply = outcome(raw)
        answered[name] = reply
        assert isinstance(reply, (ErrorReply, FinalMessage)) or reply.type in ("status", "health"), name
        if isinstance(reply, ErrorReply):
            assert reply.code in REFUSAL_CODES, (name, reply)
    assert sum(isinstance(r, ErrorReply) for r in answered.values()) > 0.8 * len(CORPUS)
    assert answered["generate.temperature=1e-40"].code == ErrorCode.INVALID_REQUEST
    assert "0 (greedy) or a number in 0.001..100" in answered["generate.temperature=1e-40"].message
    assert "nests maps and lists more than 8 levels" in answered["generate.prompt=Deep(1000)"].message
    assert answered["messages empty"].code == ErrorCode.INVALID_REQUEST
    assert "messages is empty" in answered["messages empty"].message
    assert isinstance(answered["generate.top_p=1e-40"], FinalMessage)  # tiny top_p: the top token, no crash
    assert_alive_and_serving(daemon)


def test_refused_frames_count_as_failed_requests(daemon, raw):
    with Client(daemon.socket_path) as client:
        before = client.status().requests_failed
    for frame in (b"\xc1", pack({"op": "status", "id": Deep(2000)}), pack({"op": "nope", "id": "n"})):
        raw.send(frame)
        assert isinstance(outcome(raw), ErrorReply)
    with Client(daemon.socket_path) as client:
        assert client.status().requests_failed == before + 3


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)
field_names = st.sampled_from(["op", "id", *GENERATE_FIELDS, "colour"])
request_like = st.fixed_dictionaries({"op": st.sampled_from(["generate", "status", "health", "cancel", "x"])},
                                     optional={name: msgpack_values for name in ["id", *GENERATE_FIELDS]})
frames = st.one_of(
    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.dictionaries(field_names, msgpack_values, max_size=6).map(lambda v: msgpack.packb(v, use_bin_type=True)),
    request_like.map(lambda v: msgpack.packb({**v, "max_tokens": 2} if v["op"] == "generate" and "max_tokens" not in v
                                             else v, use_bin_type=True)),
    st.binary(max_size=64),
)


FRAMES_PER_EXAMPLE = 10  # hypothesis's cost is per example: drawing ten frames at once is ~4x cheaper per frame


def fuzz(daemon, frame_count: int) -> None:
    """frame_count random frames sent one at a time, each answered with a refusal code or a result."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + daemon.socket_path)
    counter = iter(range(10**9))
    sent = []
    try:
        @settings(max_examples=frame_count // FRAMES_PER_EXAMPLE, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(frames, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
        def some(batch):
            for frame in batch:
                one(frame)

        def one(frame):
            # a unique id per generate, so two fuzz requests never collide as duplicates
            try:
                wire = msgpack.unpackb(frame, raw=False)
            except Exception:
                wire = None
            if isinstance(wire, dict) and wire.get("op") == "generate":
                if isinstance(wire.get("id"), str):
                    wire["id"] = f"f{next(counter)}"
                max_tokens = wire.get("max_tokens")  # keep accepted requests short: a few tokens each
                if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 2:
                    wire["max_tokens"] = 2
                frame = msgpack.packb(wire, use_bin_type=True)
            sock.send(frame)
            sent.append(frame)
            reply = outcome(sock)
            if isinstance(reply, ErrorReply):
                assert reply.code in REFUSAL_CODES, reply

        some()
    finally:
        sock.close(linger=0)
    assert len(sent) >= frame_count  # every example ran
    assert_alive_and_serving(daemon)


def test_random_frames_never_kill_the_daemon(daemon):
    fuzz(daemon, frame_count=200)


@pytest.mark.slow
def test_five_thousand_random_frames_never_kill_the_daemon(daemon):
    fuzz(daemon, frame_count=5000)


# ---------------------------------------------------------------------- sampling values that used to kill it


def test_tiny_sampling_values_are_refused_or_safe_in_process_and_in_the_daemon(daemon, tiny_stores):
    from flashllm import Engine, SamplingParams

    with Client(daemon.socket_path) as client:
        with pytest.raises(RequestFailed) as refused:
            client.generate("hi", max_tokens=2, temperature=1e-40)
        assert refused.value.code == ErrorCode.INVALID_REQUEST and "temperature=1e-40" in refused.value.message
        for top_p in (1e-45, 1e-300, 5e-324):
            assert client.generate("hi", max_tokens=4, temperature=1.0, top_p=top_p).usage.completion_tokens >= 1
        greedy = client.generate("hi", max_tokens=4, ignore_eos=True).token_ids
        assert client.generate("hi", max_tokens=4, ignore_eos=True, temperature=0.001, seed=3).token_ids == greedy
    with Engine(tiny_stores("llama")) as engine:
        with pytest.raises(ValueError, match="temperature=1e-40 is invalid"):
            engine.generate(["hi"], SamplingParams(temperature=1e-40))
        result = engine.generate(["hi"], SamplingParams(max_tokens=4, temperature=1.0, top_p=5e-324, ignore_eos=True))
        assert result[0].tokens == greedy
    assert_alive_and_serving(daemon)


def test_a_batch_with_an_undecodable_line_and_a_tiny_temperature_finishes_the_rest(daemon, tmp_path):
    from flashllm.runtime.clients.cli import main as cli_main

    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": f"Story {i}:", "max_tokens": 3}).encode() for i in range(30)]
    lines[6] = b'{"id": "p6", "prompt": "caf\xff"}'
    lines[19] = json.dumps({"id": "p19", "prompt": "hot", "temperature": 1e-40}).encode()
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    assert cli_main(["batch", str(prompts), "--out", str(out), "--socket", daemon.socket_path, "--quiet"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 30
    errors = {r["line"]: r["error"]["message"] for r in results if "error" in r}
    assert sorted(errors) == [7, 20]
    assert "line 7 is not UTF-8" in errors[7] and "0xff" in errors[7]
    assert "temperature=1e-40" in errors[20]
    assert sum("text" in r for r in results) == 28


# ---------------------------------------------------------------------- worker processes dying and stopping


RESTART_BOUND_S = float(os.environ.get("FLASHLLM_TEST_RESTART_BOUND_S", "30"))


def worker_pids(daemon) -> dict[str, int]:
    """role → pid of the daemon's worker processes, by their process title (fl-prefetch, ...)."""
    found = {}
    for pid in descendants(daemon.process.pid):
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("fl-"):
            found[comm.removeprefix("fl-")] = pid
    return found


def instance_segments(daemon) -> set[str]:
    return {name for name in shm_segments() if f"-{daemon.process.pid}-" in name}


async def streams_then_kill(daemon, victim_pid: int, clients: int = 8) -> list[tuple[object, float]]:
    """Start `clients` streams, kill -9 the victim once each has a token; (outcome, seconds after the kill)."""
    started = asyncio.Event()
    seen = set()
    killed_at = [0.0]

    async def one(n: int):
        async with AsyncClient(daemon.socket_path, timeout_s=30) as client:
            stream = client.stream(f"Story {n}:", max_tokens=200, ignore_eos=True)
            try:
                async for _ in stream:
                    seen.add(n)
                    if len(seen) == clients:
                        started.set()
                return stream.final, time.monotonic() - killed_at[0]
            except RequestFailed as error:
                return error, time.monotonic() - killed_at[0]

    tasks = [asyncio.create_task(one(n)) for n in range(clients)]
    await asyncio.wait_for(started.wait(), 60)
    killed_at[0] = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    return await asyncio.gather(*tasks)


def test_killed_workers_are_restarted_in_place_until_the_budget_is_spent(sparse_store):
    args = ["--mode", "sparse", "--runtime", "workers", "--max-batch", "8", "--worker-restarts", "3"]
    with running_daemon(sparse_store, args) as daemon:
        segments = instance_segments(daemon)
        assert segments
        for role in ("prefetch", "compute", "prefetch"):  # three crashes: the budget of 3, spent
            pids = worker_pids(daemon)
            assert set(pids) == {"prefetch", "compute"}, pids  # the predictor runs inside compute
            results = asyncio.run(streams_then_kill(daemon, pids[role]))
            for result, after_s in results:
                assert isinstance(result, RequestFailed) and result.code == ErrorCode.WORKER_FAILED, (role, result)
                assert "send the request again" in result.message
                assert after_s < 2.0, (role, after_s)
            killed_at = time.monotonic()
            with Client(daemon.socket_path, timeout_s=30) as client:
                assert client.generate("The quick brown fox", max_tokens=4).usage.completion_tokens >= 1
            # 10 s on a quiet machine (a restart is two fresh Python processes, compute importing torch); a loaded
            # test box can take three times that
            assert time.monotonic() - killed_at < RESTART_BOUND_S
            assert daemon.process.poll() is None  # the same daemon, not a restarted one
            new_pids = worker_pids(daemon)
            assert set(new_pids) == set(pids) and not set(new_pids.values()) & set(pids.values())
            assert instance_segments(daemon) == segments  # the new set maps the same segments; none left over
            daemon.note_workers()
        with Client(daemon.socket_path) as client:
            assert client.status().requests_failed >= 24
        # a fourth crash within the window spends the budget of 3: the daemon exits 1 for systemd to act
        asyncio.run(streams_then_kill(daemon, worker_pids(daemon)["compute"], clients=2))
        assert daemon.process.wait(timeout=30) == 1
        assert "already restarted 3 times" in daemon.log()


def test_a_stopped_worker_is_reported_and_sigterm_still_ends_the_daemon(sparse_store):
    args = ["--mode", "sparse", "--runtime", "workers", "--max-batch", "2", "--step-timeout", "2",
            "--drain-timeout-s", "1"]
    with running_daemon(sparse_store, args) as daemon:
        compute = worker_pids(daemon)["compute"]
        with Client(daemon.socket_path, timeout_s=60) as client:
            stream = client.stream("Story:", max_tokens=200, ignore_eos=True)
            next(stream)
            os.kill(compute, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                with Client(daemon.socket_path, timeout_s=10) as watcher:
                    while watcher.status().ok:
                        assert time.monotonic() - stopped_at < 2 + 5, "the stuck step was not reported"
                        time.sleep(0.2)
                    assert not watcher.health().ok
                term_at = time.monotonic()
                daemon.process.send_signal(signal.SIGTERM)
                assert daemon.process.wait(timeout=1 + 10) == 0
                assert time.monotonic() - term_at < 1 + 10
            finally:
                try:
                    os.kill(compute, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            with pytest.raises(RequestFailed) as cut:
                list(stream)
            assert cut.value.code == ErrorCode.SHUTTING_DOWN


# ---------------------------------------------------------------------- another local user


def run_serve(store: str, socket_path: str, extra: list[str] = (), env: dict | None = None):
    return subprocess.run(["flashllm", "serve", "--store", store, "--socket", socket_path, *extra],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **TEST_ENV, **(env or {})})


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tiny_stores, tmp_path):
    target = tmp_path / "precious"
    target.write_text("do not overwrite\n")
    sock_dir = tmp_path / "s"
    sock_dir.mkdir(mode=0o700)
    os.symlink(target, sock_dir / "x.sock.lock")
    run = run_serve(tiny_stores("llama"), str(sock_dir / "x.sock"))
    assert run.returncode == 2 and "x.sock.lock is a symlink: refusing to follow it" in run.stderr
    assert target.read_text() == "do not overwrite\n"
    assert sorted(os.listdir(sock_dir)) == ["x.sock.lock"]


def test_a_symlinked_socket_is_refused(tiny_stores, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    sock_dir = tmp_path / "s"
    sock_dir.mkdir(mode=0o700)
    os.symlink(target, sock_dir / "x.sock")
    run = run_serve(tiny_stores("llama"), str(sock_dir / "x.sock"))
    assert run.returncode == 2 and "x.sock is a symlink: refusing" in run.stderr
    assert target.read_text() == "x" and sorted(os.listdir(sock_dir)) == ["x.sock"]


def test_a_runtime_root_that_is_not_private_is_refused(tmp_path):
    from flashllm.protocol.endpoints import RuntimeDirError, private_runtime_root

    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(RuntimeDirError, match="mode 0o777"):
        private_runtime_root(str(loose))
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(RuntimeDirError, match="symlink"):
        private_runtime_root(str(tmp_path / "link"))
    fresh = private_runtime_root(str(tmp_path / "fresh"))
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    os.chmod(fresh, 0o750)  # systemd's RuntimeDirectoryMode=0750 is fine
    assert private_runtime_root(fresh) == fresh


OTHER_UID = 65534  # nobody


def as_other_user():
    os.setgid(OTHER_UID)
    os.setuid(OTHER_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second local user (uid 65534)")
def test_a_runtime_dir_pre_created_by_another_user_is_refused(sparse_store, tmp_path):
    """The attack: another user makes the daemon's runtime root first, to bind its worker sockets."""
    shared = tempfile.mkdtemp(prefix="flshared-", dir="/tmp")  # reachable by the other user, like /tmp itself
    try:
        os.chmod(shared, 0o1777)
        root = os.path.join(shared, "flashllm-rt")
        subprocess.run(["mkdir", "-m", "0777", root], check=True, preexec_fn=as_other_user)
        assert os.stat(root).st_uid == OTHER_UID
        sock_dir = tmp_path / "s"
        sock_dir.mkdir(mode=0o700)
        run = run_serve(sparse_store, str(sock_dir / "x.sock"), ["--mode", "sparse", "--runtime", "workers"],
                        env={"FLASHLLM_RUNTIME_DIR": root})
        assert run.returncode == 2
        assert f"the runtime directory {root} belongs to uid {OTHER_UID}" in run.stderr
        assert os.listdir(root) == [] and os.listdir(sock_dir) == []
    finally:
        shutil.rmtree(shared)


def as_other_user_in_a_child(action) -> str:
    """Run action() in a forked child as uid 65534 (Python is already loaded: the interpreter under /root is not
    reachable by that user); returns what it returned, or the text of what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            as_other_user()
            try:
                text = f"returned {action()!r}"
            except Exception as error:
                text = f"{type(error).__name__}: {error}"
            os.write(write_end, text.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second local user (uid 65534)")
def test_another_user_cannot_connect_and_is_told_which_group_to_join(daemon):
    from flashllm.runtime.clients.client import check_daemon_listening

    os.chmod(os.path.dirname(daemon.socket_path), 0o755)  # the directory is open; the socket (0660) is not
    try:
        told = as_other_user_in_a_child(lambda: check_daemon_listening(daemon.socket_path))
    finally:
        os.chmod(os.path.dirname(daemon.socket_path), 0o700)
    group = grp.getgrgid(os.stat(daemon.socket_path).st_gid).gr_name
    assert told.startswith("DaemonUnavailableError") and f"the socket is for group {group}" in told, told
    assert_alive_and_serving(daemon)


# ---------------------------------------------------------------------- a corrupt store, caught on read


def flip_one_byte_per_bundle(store: str, layer: int, neuron_positions) -> None:
    """One flipped bit in the middle of each given bundle of `layer` in ffn.bin."""
    from flashllm.protocol.store_format import read_manifest

    layout = read_manifest(store).ffn
    region = layout.layers[layer]
    with open(os.path.join(store, layout.file), "r+b") as f:
        for position in neuron_positions:
            offset = region.offset_bytes + int(position) * layout.bundle_bytes + layout.bundle_bytes // 2
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x10]))


@pytest.fixture
def corrupt_store(sparse_store, tmp_path):
    """A copy of the calibrated store with one flipped byte in every layer-1 bundle that is not pinned hot (those
    are read at start-up): whichever of them the first token predicts, it reads a corrupt one."""
    import numpy as np

    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.prefetch import load_hot_ids

    store = str(tmp_path / "corrupt")
    shutil.copytree(sparse_store, store)
    manifest = read_manifest(store)
    hot = load_hot_ids(store, manifest)[1]
    cold = np.setdiff1d(np.arange(manifest.ffn.layers[1].num_neurons), hot)
    flip_one_byte_per_bundle(store, 1, cold)
    return store


def test_a_corrupt_bundle_fails_the_request_in_the_daemon_and_it_carries_on(corrupt_store):
    args = ["--mode", "sparse", "--runtime", "workers", "--max-batch", "2"]
    with running_daemon(corrupt_store, args) as daemon:
        with Client(daemon.socket_path, timeout_s=60) as client:
            with pytest.raises(RequestFailed) as failed:
                client.generate("The quick brown fox", max_tokens=8)
            assert failed.value.code == ErrorCode.STORE_CORRUPT
            assert "layer 1 neuron" in failed.value.message and "flashllm verify --store" in failed.value.message
            status = client.status()
            assert not status.ok and status.requests_failed >= 1
            assert client.health().ok  # the engine itself still makes progress: no restart loop
        assert daemon.process.poll() is None


@pytest.mark.parametrize("mode", ["naive", "sparse"])
def test_a_corrupt_bundle_fails_the_in_process_token_that_reads_it(corrupt_store, mode):
    from flashllm import Engine, SamplingParams
    from flashllm.workers.flash_io.integrity import BundleChecksumError

    with Engine(corrupt_store, mode=mode, runtime="inproc") as engine:
        for _ in range(2):  # the next request reads again and fails the same way (no stale error, no hang)
            with pytest.raises(BundleChecksumError, match=r"layer 1 neuron \d+ \(store position \d+\) failed its checksum"):
                engine.generate(["The quick brown fox"], SamplingParams(max_tokens=4))


def test_a_corrupt_bundle_stops_the_dense_load_and_reads_can_be_left_unchecked(corrupt_store):
    from flashllm import Engine, SamplingParams
    from flashllm.workers.flash_io.integrity import BundleChecksumError

    with pytest.raises(BundleChecksumError, match="layer 1 neuron"):
        Engine(corrupt_store, mode="dense")
    run = run_serve(corrupt_store, os.path.join(os.path.dirname(corrupt_store), "x.sock"))
    assert run.returncode == 2 and "layer 1 neuron" in run.stderr and "flashllm verify" in run.stderr
    os.environ["FLASHLLM_VERIFY_READS"] = "0"  # what --no-verify-reads sets
    try:
        with Engine(corrupt_store, mode="dense") as engine:
            assert engine.generate(["hi"], SamplingParams(max_tokens=2))[0].tokens
    finally:
        del os.environ["FLASHLLM_VERIFY_READS"]
