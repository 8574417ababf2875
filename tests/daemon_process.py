"""Start `flashllm serve` as a real subprocess for a test, and prove it left nothing behind.

    with running_daemon(store, extra_args=["--max-batch", "8"]) as daemon:
        Client(daemon.socket_path).generate(...)
    # here: the process is gone, and so are its socket file, its lock file,
    # any /dev/shm/flashllm-<its pid>-* segment it made (that no living process uses),
    # its worker processes and any process naming its socket
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from flashllm.protocol.shm import SEGMENT_PREFIX

START_TIMEOUT_S = 120.0
# One torch thread per process: test machines have few cores shared by the daemon's event loop, the
# test process and other tests; an OpenMP team spinning on an oversubscribed core makes a tiny model's
# step 10-20x slower. (Deployments keep torch's default.)
TEST_ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class Daemon:
    process: subprocess.Popen
    socket_path: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    seen_workers: set[int] = dataclasses.field(default_factory=set)

    def note_workers(self) -> set[int]:
        """Remember the daemon's child processes now, to check later that they died with it."""
        self.seen_workers |= descendants(self.process.pid)
        return self.seen_workers

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("flashllm")}


def shm_in_use() -> set[str]:
    """/dev/shm names some living process maps or holds open (segments of other tests still running)."""
    names = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f:
                names.update(line.split("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    names.add(target.removeprefix("/dev/shm/").split()[0])
        except OSError:
            continue
    return names


def descendants(pid: int) -> set[int]:
    """Every living process below pid (its workers, their helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_naming(text: str) -> list[int]:
    """Pids whose command line contains `text` (the daemon and any worker it spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_until_serving(daemon: Daemon, timeout_s: float = START_TIMEOUT_S) -> None:
    from flashllm.runtime.clients.client import Client, ClientError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"flashllm serve exited with {daemon.process.returncode}:\n{daemon.log()}")
        if os.path.exists(daemon.socket_path):
            try:
                with Client(daemon.socket_path, timeout_s=5) as client:
                    if client.health().ok:
                        return
            except ClientError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"flashllm serve did not start in {timeout_s} s:\n{daemon.log()}")


@contextlib.contextmanager
def running_daemon(store: str, extra_args: list[str] = (), env: dict | None = None, wait: bool = True):
    """A `flashllm serve` on a fresh socket; always killed and checked for leftovers afterwards."""
    directory = tempfile.mkdtemp(prefix="flsrv-")  # short: ipc paths must stay under 107 bytes
    socket_path = os.path.join(directory, "flashllm.sock")
    log_path = os.path.join(directory, "serve.log")
    shm_before = shm_segments()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(["flashllm", "serve", "--store", store, "--socket", socket_path, *extra_args],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, **TEST_ENV, **(env or {})})
    daemon = Daemon(process, socket_path, log_path)
    try:
        if wait:
            wait_until_serving(daemon)
            daemon.note_workers()
        yield daemon
    finally:
        workers = daemon.note_workers() if process.poll() is None else daemon.seen_workers
        try:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
            leftovers = [p for p in (socket_path, socket_path + ".lock") if os.path.exists(p)]
            assert not leftovers, f"flashllm serve left {leftovers} behind:\n{daemon.log()}"
            deadline = time.monotonic() + 10  # workers die with the daemon, give them a moment
            while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not [pid for pid in workers if alive(pid)], "a worker of the daemon outlived it"
            assert not processes_naming(socket_path), "a process of the daemon outlived it"
            # only the segments this daemon named (flashllm-<its pid>-...): other tests run beside it in other
            # xdist workers, making and removing segments of their own
            made = {name for name in shm_segments() - shm_before if name.startswith(f"{SEGMENT_PREFIX}{process.pid}-")}
            orphans = made - shm_in_use()
            assert not orphans, f"shared memory left behind: {orphans}"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
