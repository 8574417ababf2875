"""One server per ipc:// socket: a second `flashllm serve` on the same path refuses.

Without the lock, ZeroMQ would let the second server silently take the
socket over (zmq_ipc(7)); these tests bind real ZeroMQ sockets and use real
second processes, since flock belongs to an open file description.
"""
from __future__ import annotations

import grp
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zmq

from flashllm.runtime.daemon.socket_lock import (
    MAX_SOCKET_PATH_BYTES,
    EndpointInUseError,
    IpcEndpointError,
    IpcEndpointLock,
    apply_socket_permissions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# A server in another process: takes the lock, binds ZeroMQ, says so, waits.
SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, time, zmq
    from flashllm.runtime.daemon.socket_lock import IpcEndpointLock
    lock = IpcEndpointLock(sys.argv[1])
    lock.acquire()
    context = zmq.Context()
    server = context.socket(zmq.REP)
    server.bind(lock.endpoint)
    print("bound", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def socket_path(tmp_path) -> str:
    return str(tmp_path / "flashllm.sock")


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def start_server_process(socket_path: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, socket_path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )
    line = server.stdout.readline()
    if line.strip() != "bound":
        server.kill()
        raise AssertionError(f"server process did not start: {line!r} {server.stderr.read()}")
    return server


def try_to_serve(socket_path: str) -> str:
    """Runs in a spawned process: what a second `flashllm serve` would be told."""
    try:
        IpcEndpointLock(socket_path).acquire()
    except EndpointInUseError as error:
        return str(error)
    return "acquired"


def request_reply(context: zmq.Context, endpoint: str, server: zmq.Socket) -> bytes:
    client = context.socket(zmq.REQ)
    client.connect(endpoint)
    client.send(b"ping")
    assert server.poll(5000), "the bound server never got the request"
    server.send(server.recv() + b" pong")
    assert client.poll(5000)
    reply = client.recv()
    client.close(linger=0)
    return reply


def test_second_lock_in_the_same_process_refuses_with_our_pid(socket_path):
    with IpcEndpointLock(socket_path):
        with pytest.raises(EndpointInUseError) as refused:
            IpcEndpointLock(socket_path).acquire()
    message = str(refused.value)
    assert f"another flashllm serve (pid {os.getpid()}) is already serving {socket_path}" in message


def test_second_server_in_a_spawned_process_refuses(socket_path):
    with IpcEndpointLock(socket_path):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            message = pool.apply(try_to_serve, (socket_path,))
    assert message.startswith(f"another flashllm serve (pid {os.getpid()}) is already serving {socket_path}")


def test_lock_held_by_another_server_process_refuses_then_frees_when_it_dies(socket_path, zmq_context):
    other = start_server_process(socket_path)
    try:
        with pytest.raises(EndpointInUseError, match=f"pid {other.pid}"):
            IpcEndpointLock(socket_path).acquire()
    finally:
        other.kill()  # SIGKILL: no cleanup, like a crash or the OOM killer
        other.wait()
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode), "a crashed server leaves its socket file"
    assert os.path.exists(socket_path + ".lock")

    with IpcEndpointLock(socket_path) as lock:
        assert not os.path.exists(socket_path), "the stale socket file is removed under the lock"
        assert Path(lock.lock_path).read_text() == f"{os.getpid()}\n"
        server = zmq_context.socket(zmq.REP)
        server.bind(lock.endpoint)
        assert request_reply(zmq_context, lock.endpoint, server) == b"ping pong"
        server.close(linger=0)
    assert os.listdir(os.path.dirname(socket_path)) == []


def test_live_listener_without_lock_is_not_stolen(socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(socket_path)
        listener.listen()
        lock = IpcEndpointLock(socket_path)
        with pytest.raises(EndpointInUseError, match="listening on .* but holds no .lock file"):
            lock.acquire()
        assert not lock.held
        assert stat.S_ISSOCK(os.lstat(socket_path).st_mode), "the live socket is left alone"
        assert not os.path.exists(socket_path + ".lock")


def test_a_regular_file_at_the_socket_path_is_not_deleted(socket_path):
    Path(socket_path).write_text("precious")
    with pytest.raises(IpcEndpointError, match="exists and is not a socket"):
        IpcEndpointLock(socket_path).acquire()
    assert Path(socket_path).read_text() == "precious"


def test_too_long_path_is_refused_before_anything_is_created(tmp_path):
    long_path = str(tmp_path / ("s" * 120))
    with pytest.raises(IpcEndpointError, match=f"longer than the {MAX_SOCKET_PATH_BYTES} bytes .*sun_path"):
        IpcEndpointLock(long_path)
    assert os.listdir(tmp_path) == []


def test_longest_allowed_path_binds_with_zmq(tmp_path, zmq_context):
    name_bytes = MAX_SOCKET_PATH_BYTES - len(os.fsencode(str(tmp_path))) - 1
    path = str(tmp_path / ("s" * name_bytes))
    with IpcEndpointLock(path) as lock:
        server = zmq_context.socket(zmq.REP)
        server.bind(lock.endpoint)
        server.close(linger=0)


def test_missing_directory_says_how_to_make_it(tmp_path):
    with pytest.raises(IpcEndpointError, match="does not exist.*RuntimeDirectory"):
        IpcEndpointLock(str(tmp_path / "no-such-dir" / "flashllm.sock")).acquire()


def test_abstract_and_empty_paths_are_refused():
    with pytest.raises(IpcEndpointError, match="abstract"):
        IpcEndpointLock("ipc://@flashllm")
    with pytest.raises(IpcEndpointError, match="empty"):
        IpcEndpointLock("ipc://")


def test_ipc_prefix_and_relative_paths_resolve_to_one_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert IpcEndpointLock("flashllm.sock").socket_path == str(tmp_path / "flashllm.sock")
    lock = IpcEndpointLock(f"ipc://{tmp_path}/flashllm.sock")
    assert lock.endpoint == f"ipc://{tmp_path}/flashllm.sock"


def test_socket_permissions_after_bind(socket_path, zmq_context):
    own_group = grp.getgrgid(os.getgid()).gr_name
    with IpcEndpointLock(socket_path) as lock:
        server = zmq_context.socket(zmq.REP)
        server.bind(lock.endpoint)
        apply_socket_permissions(lock.socket_path, mode=0o660, group=own_group)
        socket_stat = os.stat(socket_path)
        assert stat.S_IMODE(socket_stat.st_mode) == 0o660
        assert socket_stat.st_gid == os.getgid()
        assert request_reply(zmq_context, lock.endpoint, server) == b"ping pong"
        server.close(linger=0)


def test_unknown_socket_group_is_a_clear_error(socket_path, zmq_context):
    with IpcEndpointLock(socket_path) as lock:
        server = zmq_context.socket(zmq.REP)
        server.bind(lock.endpoint)
        with pytest.raises(IpcEndpointError, match="group 'no-such-flashllm-group' does not exist"):
            apply_socket_permissions(lock.socket_path, group="no-such-flashllm-group")
        server.close(linger=0)


def test_release_leaves_no_files_and_is_idempotent(socket_path, zmq_context):
    lock = IpcEndpointLock(socket_path)
    lock.acquire()
    lock.acquire()  # already held: nothing changes
    server = zmq_context.socket(zmq.REP)
    server.bind(lock.endpoint)
    assert sorted(os.listdir(os.path.dirname(socket_path))) == ["flashllm.sock", "flashllm.sock.lock"]

    lock.release()
    lock.release()
    assert os.listdir(os.path.dirname(socket_path)) == []
    assert not lock.held
    server.close(linger=0)

    # The path is free again for the next server.
    with IpcEndpointLock(socket_path):
        pass


def test_unwritable_socket_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write into any directory, so there is no permission error to see")
    locked_dir = tmp_path / "not-mine"
    locked_dir.mkdir(mode=0o500)
    with pytest.raises(IpcEndpointError, match="permission denied"):
        IpcEndpointLock(str(locked_dir / "flashllm.sock")).acquire()
