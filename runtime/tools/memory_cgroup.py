"""Run a command inside a memory cgroup (v1) and read what the kernel charged it.

A memory cgroup counts what a program really costs: the resident pages of all
its processes together plus the page cache they bring in (an mmap'd model file
is page cache), and /dev/shm pages they write. Its `memory.max_usage_in_bytes`
is the peak of that sum; with `memory.limit_in_bytes` set, the kernel reclaims
page cache to stay under the cap (a program that mmaps its weights re-reads
them from disk) and kills the group's processes when anonymous memory alone
exceeds it (the OOM kill is counted in `memory.oom_control`). `/usr/bin/time`'s
maximum RSS sees only the largest single process and no page cache.

Needs a writable cgroup v1 memory hierarchy (root, /sys/fs/cgroup/memory).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass

CGROUP_V1_MEMORY_ROOT = "/sys/fs/cgroup/memory"
CGROUP_NAME_PREFIX = "flashllm-peer-"
EMPTY_WAIT_S = 10.0  # how long a group's killed processes get to leave before its directory is removed


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup v1 hierarchy here; the message says what is needed."""


@dataclass
class CgroupRun:
    """What one command did inside its cgroup."""

    argv: list[str]
    pid: int  # the command's process id (its own children had others)
    limit_bytes: int | None  # the cap (None: uncapped, measured only)
    returncode: int  # negative: killed by that signal
    peak_bytes: int  # memory.max_usage_in_bytes: peak of resident + page cache charged, all processes together
    oom_kills: int  # processes the kernel killed for exceeding the cap
    cache_bytes_after_exit: int  # page cache still charged once every process has exited (files it read)
    wall_s: float
    timed_out: bool
    stdout: str
    stderr: str

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.oom_killed

    def failure(self) -> str | None:
        """None when the command succeeded, else why it did not, in words."""
        if self.oom_killed:
            return f"OOM-killed under a cap of {self.limit_bytes / 2**20:.1f} MiB"
        if self.timed_out:
            return "timed out"
        if self.returncode != 0:
            last_line = next((line for line in reversed(self.stderr.strip().splitlines()) if line.strip()), "")
            return f"exit {self.returncode}: {last_line}".strip()
        return None


def cgroup_v1_writable(root: str = CGROUP_V1_MEMORY_ROOT) -> bool:
    return os.path.isfile(os.path.join(root, "memory.max_usage_in_bytes")) and os.access(root, os.W_OK)


def drop_page_cache(paths: list[str]) -> None:
    """Evict the files' clean pages from the page cache, so the next reader starts from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _oom_kills(group: str) -> int:
    with open(os.path.join(group, "memory.oom_control")) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def _cache_bytes(group: str) -> int:
    with open(os.path.join(group, "memory.stat")) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "cache":
                return int(value)
    return 0


def _group_pids(group: str) -> list[int]:
    with open(os.path.join(group, "cgroup.procs")) as f:
        return [int(line) for line in f if line.strip()]


def _kill_group_processes(group: str) -> None:
    """SIGKILL every process still in the group (all of them were started by the command this module ran)."""
    deadline = time.monotonic() + EMPTY_WAIT_S
    while True:
        pids = _group_pids(group)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove_group(group: str) -> None:
    deadline = time.monotonic() + EMPTY_WAIT_S
    while True:
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last exiting process is still charged
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_in_memory_cgroup(argv: list[str], limit_bytes: int | None = None, timeout_s: float = 600.0,
                         env: dict[str, str] | None = None, root: str = CGROUP_V1_MEMORY_ROOT) -> CgroupRun:
    """Run argv (and everything it starts) in a fresh memory cgroup capped at limit_bytes; the group is removed
    afterwards. A command still running after timeout_s is killed with every process it started."""
    if not cgroup_v1_writable(root):
        raise CgroupUnavailable(f"no writable memory cgroup v1 hierarchy at {root}: run as root on a host that "
                                "mounts cgroup v1's memory controller there")
    group = os.path.join(root, f"{CGROUP_NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(group)
    try:
        if limit_bytes is not None:
            with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
                f.write(str(int(limit_bytes)))
        procs_path = os.path.join(group, "cgroup.procs")

        def enter_group() -> None:  # runs in the child between fork and exec: it and all it starts are charged
            with open(procs_path, "w") as f:
                f.write(str(os.getpid()))

        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   preexec_fn=enter_group, start_new_session=True)
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_group_processes(group)
            stdout, stderr = process.communicate()
        wall_s = time.perf_counter() - started
        _kill_group_processes(group)  # children that outlived the command (daemonized workers)
        return CgroupRun(argv=list(argv), pid=process.pid, limit_bytes=limit_bytes, returncode=process.returncode,
                         peak_bytes=_read_int(os.path.join(group, "memory.max_usage_in_bytes")),
                         oom_kills=_oom_kills(group), cache_bytes_after_exit=_cache_bytes(group), wall_s=wall_s,
                         timed_out=timed_out, stdout=stdout, stderr=stderr)
    finally:
        try:
            _kill_group_processes(group)
        finally:
            _remove_group(group)
