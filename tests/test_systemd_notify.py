"""The daemon tells systemd it is ready, what it is doing and that it is alive.

A real AF_UNIX datagram socket stands in for systemd's notification socket:
what it receives is exactly what systemd would read.
"""
from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from flashllm.runtime.daemon.systemd_notify import SystemdNotifier, watchdog_loop


@pytest.fixture
def manager_socket(tmp_path):
    """A bound datagram socket at a filesystem path, like /run/systemd/notify."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_status_watchdog_stopping_reach_the_manager(manager_socket):
    path, sock = manager_socket
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.status("loading resident weights") is True
    assert receive(sock) == "STATUS=loading resident weights"
    notifier.ready()
    assert receive(sock) == "READY=1"
    notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert receive(sock) == "STOPPING=1"


def test_several_fields_travel_in_one_datagram(manager_socket):
    path, sock = manager_socket
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    notifier.notify(READY=1, status="serving 3 workers", mainpid=os.getpid())
    assert receive(sock) == f"READY=1\nSTATUS=serving 3 workers\nMAINPID={os.getpid()}"


def test_multiline_status_is_flattened_and_raw_newlines_are_refused(manager_socket):
    path, sock = manager_socket
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    notifier.status("worker died\nrestarting")
    assert receive(sock) == "STATUS=worker died restarting"
    with pytest.raises(ValueError, match="one line"):
        notifier.notify(STATUS="a\nREADY=1")


def test_abstract_namespace_socket(monkeypatch):
    name = f"flashllm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SystemdNotifier()
        assert notifier.ready() is True
        assert receive(sock) == "READY=1"


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("anything") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval_s() is None


def test_an_unreachable_manager_is_an_error_not_silence(tmp_path):
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with pytest.raises(OSError):
        notifier.ready()


def test_a_manager_that_stops_reading_never_stalls_the_daemon(manager_socket, caplog):
    """Its queue fills (max_dgram_qlen datagrams); pings are then dropped at once, other messages after a
    bounded wait, instead of blocking the daemon's event loop until the manager reads again."""
    import threading

    path, sock = manager_socket
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    result = {}
    sender = threading.Thread(target=lambda: result.update(pings=[notifier.watchdog() for _ in range(2000)],
                                                           status=notifier.status("draining 1 requests")),
                              daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "a full notification queue blocked the sender"
    assert result["pings"][0] and not result["pings"][-1]  # the first pings were queued, the later ones dropped
    assert result["status"] is False
    assert caplog.text.count("not reading its notification socket") == 1  # one warning per stall
    assert receive(sock) == "WATCHDOG=1"  # what was queued is intact
    sock.setblocking(False)
    queued = 1
    with pytest.raises(BlockingIOError):
        while True:  # empty the queue: a new message goes through again
            sock.recv(4096)
            queued += 1
    assert notifier.stopping() is True and sock.recv(4096) == b"STOPPING=1"
    assert f"{2001 - queued} messages were dropped" in caplog.text


def test_watchdog_interval_is_half_of_watchdog_usec():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(environ=environ).watchdog_interval_s() == 15.0


def test_watchdog_pid_must_name_this_process():
    base = {"WATCHDOG_USEC": "30000000"}
    mine = SystemdNotifier(environ={**base, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s() == 15.0
    # A worker that inherited its parent's environment must not ping.
    parents = SystemdNotifier(environ={**base, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert parents.watchdog_interval_s() is None


def test_unset_watchdog_and_bad_values():
    assert SystemdNotifier(environ={}).watchdog_interval_s() is None
    with pytest.raises(ValueError, match="WATCHDOG_USEC"):
        SystemdNotifier(environ={"WATCHDOG_USEC": "soon"})


def test_unset_environment_keeps_workers_from_inheriting_the_socket(manager_socket):
    path, sock = manager_socket
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/"}
    notifier = SystemdNotifier(environ=environ, unset_environment=True)
    assert environ == {"HOME": "/"}
    assert notifier.watchdog_interval_s() == 2.0
    notifier.ready()
    assert receive(sock) == "READY=1"


async def test_watchdog_loop_pings_only_while_healthy(manager_socket):
    path, sock = manager_socket
    sock.setblocking(False)
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    healthy = True
    task = asyncio.create_task(watchdog_loop(notifier, 0.01, lambda: healthy))

    await asyncio.sleep(0.1)
    pings_while_healthy = drain(sock)
    assert len(pings_while_healthy) >= 3
    assert set(pings_while_healthy) == {"WATCHDOG=1"}

    healthy = False
    await asyncio.sleep(0.03)  # a ping may already be on its way
    drain(sock)
    await asyncio.sleep(0.1)
    assert drain(sock) == []  # systemd would now time out and restart us

    healthy = True
    await asyncio.sleep(0.05)
    assert "WATCHDOG=1" in drain(sock)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_loop_treats_a_raising_check_as_unhealthy(manager_socket):
    path, sock = manager_socket
    sock.setblocking(False)
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})

    def broken_check() -> bool:
        raise RuntimeError("compute worker is not answering")

    task = asyncio.create_task(watchdog_loop(notifier, 0.01, broken_check))
    await asyncio.sleep(0.05)
    assert drain(sock) == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_loop_returns_when_there_is_no_watchdog(manager_socket):
    path, _ = manager_socket
    await asyncio.wait_for(watchdog_loop(SystemdNotifier(environ={"NOTIFY_SOCKET": path}), None, lambda: True), 1)
    await asyncio.wait_for(watchdog_loop(SystemdNotifier(environ={}), 0.01, lambda: True), 1)


def drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(receive(sock))
        except BlockingIOError:
            return messages
