"""The supervisor: starts the worker processes, watches them, owns their shared memory.

    Supervisor(config).start()
      1. sweep what dead earlier instances left: runtime dirs whose lock is free,
         /dev/shm/flashllm-<pid>-… segments whose supervisor is gone
      2. create this instance's directory (locked) and its two segments
      3. bind the supervisor inbox, spawn prefetch and compute (which hosts the predictor)
         (multiprocessing "spawn": no inherited zmq contexts, locks or CUDA state)
      4. wait for WorkerReady from all three roles (a WorkerFailed or a death fails the start)

    recv()   the next message for the engine; raises WorkerCrashedError within
             POLL_INTERVAL_S of a worker dying (or reporting WorkerFailed), after
             killing the others: a pipeline missing one process is useless.
    ensure_running()   restarts the workers after a crash (WorkerStartError if that fails), at most
             max_restarts times in RESTART_WINDOW_S, each after a growing pause
             (RestartBudgetSpent past that: the caller should give up and exit)
    kill_workers()   SIGKILL the workers from any thread: unblocks a step stuck on a stopped worker
    close()  staged shutdown: Shutdown message, then SIGTERM, then SIGKILL; unlink the
             segments, remove the directory. Also runs at interpreter exit and, when
             the supervisor owns the process's SIGTERM handling, on SIGTERM.

Workers die with the supervisor on their own (workers/process_entry.py), and
sweep the segments when it died without cleaning up.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time

from flashllm.protocol import codec
from flashllm.protocol.client_api import ErrorCode
from flashllm.protocol.endpoints import InstanceDir, instance_alive, private_runtime_root, stale_instance_dirs
from flashllm.protocol.messages import (
    ROLE_COMPUTE, ROLE_PREDICTOR, ROLE_PREFETCH, ROLE_SUPERVISOR, WORKER_ROLES, Dispatcher, Shutdown,
    WorkerFailed, WorkerReady,
)
from flashllm.protocol.shm import SharedSegment, list_segments
from flashllm.workers.process_entry import WorkerConfig, sweep_instance

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
DEFAULT_START_TIMEOUT_S = 300.0
ASK_TIMEOUT_S = 3.0  # staged shutdown: after Shutdown, before SIGTERM
TERM_TIMEOUT_S = 2.0  # after SIGTERM, before SIGKILL
DEFAULT_MAX_RESTARTS = 5  # worker-set restarts allowed within RESTART_WINDOW_S
RESTART_WINDOW_S = 600.0
FIRST_BACKOFF_S = 0.5  # pause before the 2nd restart in the window; doubles each time after
MAX_BACKOFF_S = 8.0


class WorkerRuntimeError(RuntimeError):
    """The worker runtime cannot serve this step."""


class WorkerCrashedError(WorkerRuntimeError):
    """A worker process died; the in-flight step failed. The workers restart at the next request."""

    client_error_code = ErrorCode.WORKER_FAILED  # what the daemon tells the step's clients: retry


class WorkerStartError(WorkerRuntimeError):
    """The workers could not be started (or restarted)."""


class RestartBudgetSpent(WorkerStartError):
    """The workers crashed more often than the restart budget allows: something is wrong beyond one bad step."""


def restart_backoff_s(recent_restarts: int) -> float:
    """Pause before a restart, given how many happened in the window already: none for the first."""
    if recent_restarts == 0:
        return 0.0
    return min(FIRST_BACKOFF_S * 2 ** (recent_restarts - 1), MAX_BACKOFF_S)


# the worker processes, by the role whose inbox each binds, and the roles each hosts: the prefetcher stays
# torch-free on its own (it must read while compute computes); the predictor runs inside compute
WORKER_PROCESSES = {ROLE_PREFETCH: (ROLE_PREFETCH,), ROLE_COMPUTE: (ROLE_COMPUTE, ROLE_PREDICTOR)}


def _entry_points():
    from flashllm.workers.compute import run_compute
    from flashllm.workers.prefetch import run_prefetch

    return {ROLE_PREFETCH: run_prefetch, ROLE_COMPUTE: run_compute}


def worker_label(process_name: str) -> str:
    """'compute worker (with the predictor)': a worker process and the roles it hosts, for messages."""
    roles = WORKER_PROCESSES.get(process_name, (process_name,))
    return f"{roles[0]} worker" + "".join(f" (with the {role})" for role in roles[1:])


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def sweep_stale_instances(root: str | None = None) -> list[str]:
    """Remove the runtime dirs and /dev/shm segments of instances whose supervisor is dead; returns their ids."""
    root = private_runtime_root(root)  # never sweep (or later use) a directory someone else controls
    swept = set(stale_instance_dirs(root))
    for instance, _ in list_segments():
        if instance not in swept and not instance_alive(instance, root):
            swept.add(instance)
    for instance in sorted(swept):
        logger.info("sweeping runtime instance %s left behind by a dead supervisor", instance)
        sweep_instance(instance, os.path.join(root, instance))
    return sorted(swept)


class Supervisor:
    def __init__(self, config: WorkerConfig, instance_dir: InstanceDir, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 handle_sigterm: bool = True, max_restarts: int = DEFAULT_MAX_RESTARTS):
        self.config = config
        self.instance_dir = instance_dir
        self.start_timeout_s = start_timeout_s
        self.handle_sigterm = handle_sigterm
        self.processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self.worker_info: dict[str, dict] = {}
        self.segments: dict[str, SharedSegment] = {}  # kind ("cache", "exchange") → segment
        self.restarts = 0
        self.max_restarts = max_restarts
        self._restart_times_s: list[float] = []  # monotonic times of the restarts within RESTART_WINDOW_S
        self.broken: str | None = None  # why the workers are down (a crash), until restarted
        self._context = None
        self._inbox = None
        self._outboxes: dict[str, object] = {}
        self._closed = False
        self._previous_sigterm = None
        self._control = Dispatcher({WorkerReady: self._on_worker_ready, WorkerFailed: self._on_worker_failed},
                                   owner="the supervisor")
        self._pending_failure: WorkerFailed | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> "Supervisor":
        import zmq

        try:
            for layout in (self.config.cache_layout, self.config.exchange_layout):
                self.segments[layout.kind] = SharedSegment.create(self.config.instance, layout)
            self._context = zmq.Context()
            self._inbox = self._context.socket(zmq.PULL)
            self._inbox.bind(self.instance_dir.endpoint(ROLE_SUPERVISOR))
            atexit.register(self.close)
            self._install_sigterm()
            self._start_workers()
        except BaseException:
            self.close()
            raise
        return self

    def _install_sigterm(self) -> None:
        """SIGTERM → SystemExit in the main thread, so `with`/atexit cleanup runs (unless someone else handles it)."""
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        self._sigterm_handler = on_sigterm
        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        entries = _entry_points()
        self.worker_info = {}
        self._pending_failure = None
        for role in WORKER_PROCESSES:
            process = context.Process(target=entries[role], args=(self.config,), name=f"flashllm-{role}", daemon=True)
            process.start()
            self.processes[role] = process
        deadline = time.monotonic() + self.start_timeout_s
        while len(self.worker_info) < len(WORKER_ROLES):
            if self._pending_failure is not None:
                failure = self._pending_failure
                raise WorkerStartError(f"the {failure.role} worker failed to start: {failure.error}\n{failure.traceback}")
            dead = self._dead_worker()
            if dead is not None:
                raise WorkerStartError(f"the {worker_label(dead)} (pid {self.processes[dead].pid}) "
                                       f"{describe_exit(self.processes[dead].exitcode)} while starting; "
                                       "its stderr says why")
            if time.monotonic() > deadline:
                waiting = ", ".join(r for r in WORKER_ROLES if r not in self.worker_info)
                raise WorkerStartError(f"workers not ready after {self.start_timeout_s:.0f} s (waiting for {waiting})")
            if self._inbox.poll(int(POLL_INTERVAL_S * 1000)):
                msg = codec.decode(self._inbox.recv(copy=False).buffer)
                if self._control.handles(type(msg)):
                    self._control.dispatch(msg)

    def _on_worker_ready(self, msg: WorkerReady) -> None:
        self.worker_info[msg.role] = dict(msg.info, pid=msg.pid)

    def _on_worker_failed(self, msg: WorkerFailed) -> None:
        self._pending_failure = msg

    # ------------------------------------------------------------------ talking to workers

    @property
    def pids(self) -> dict[str, int]:
        """role → pid of the process running it (co-hosted roles share one)."""
        return {role: self.processes[name].pid for name, roles in WORKER_PROCESSES.items() for role in roles
                if name in self.processes}

    def _dead_worker(self) -> str | None:
        for role, process in self.processes.items():
            if process.exitcode is not None:
                return role
        return None

    def dead_worker_reason(self) -> str | None:
        """'the <role> worker (pid N) was killed by SIGKILL' for a worker that is gone, else None."""
        dead = self._dead_worker()
        if dead is None:
            return None
        process = self.processes[dead]
        return f"the {dead} worker (pid {process.pid}) {describe_exit(process.exitcode)}"

    def send(self, role: str, msg) -> None:
        import zmq

        sock = self._outboxes.get(role)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.instance_dir.endpoint(role))
            self._outboxes[role] = sock
        sock.send(codec.encode(msg), copy=False)

    def recv(self, what: str = "the step"):
        """The next non-control message; raises WorkerCrashedError as soon as a worker is found dead."""
        if self.broken:
            raise WorkerCrashedError(self.broken)
        while True:
            if self._pending_failure is not None:
                failure = self._pending_failure
                self._crashed(f"the {failure.role} worker (pid {failure.pid}) failed during {what}: {failure.error}")
            dead = self._dead_worker()
            if dead is not None:
                process = self.processes[dead]
                self._crashed(f"the {worker_label(dead)} (pid {process.pid}) {describe_exit(process.exitcode)} during {what}")
            if self._inbox.poll(int(POLL_INTERVAL_S * 1000)):
                msg = codec.decode(self._inbox.recv(copy=False).buffer)
                if self._control.handles(type(msg)):
                    self._control.dispatch(msg)
                    continue
                return msg

    def _crashed(self, reason: str):
        self.broken = f"{reason}; the step failed and the workers will be restarted at the next request"
        logger.error("%s", self.broken)
        self._stop_workers(ask=False, kill=True)  # the pipeline's state is lost anyway: no grace period
        raise WorkerCrashedError(self.broken)

    def kill_workers(self) -> None:
        """SIGKILL every worker now; safe from another thread (recv() then sees them dead and raises)."""
        for process in list(self.processes.values()):
            try:
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError, AttributeError):
                pass

    def mark_broken(self, reason: str) -> None:
        """Workers that are up but can no longer be trusted (a step failed inside one): restart them next."""
        if not self.broken:
            self.broken = f"{reason}; the workers will be restarted"
            self._stop_workers(ask=False, kill=True)

    def ensure_running(self) -> None:
        """Restart the workers if a crash stopped them; WorkerStartError when that fails,
        RestartBudgetSpent when they already restarted max_restarts times in RESTART_WINDOW_S."""
        if self._closed:
            raise WorkerRuntimeError("the worker runtime is closed")
        if not self.broken:
            return
        now = time.monotonic()
        self._restart_times_s = [t for t in self._restart_times_s if now - t < RESTART_WINDOW_S]
        recent = len(self._restart_times_s)
        if recent >= self.max_restarts:
            raise RestartBudgetSpent(f"the workers already restarted {recent} times in the last "
                                     f"{RESTART_WINDOW_S:.0f} s (the budget is {self.max_restarts}) and failed again: "
                                     f"{self.broken}")
        backoff_s = restart_backoff_s(recent)
        logger.warning("restarting the workers in %.1f s (restart %d of %d allowed in %.0f s): %s", backoff_s,
                       recent + 1, self.max_restarts, RESTART_WINDOW_S, self.broken)
        self._restart_times_s.append(now)
        self._stop_workers(ask=False, kill=True)
        time.sleep(backoff_s)
        for sock in self._outboxes.values():
            sock.close(linger=0)
        self._outboxes = {}
        while self._inbox.poll(0):  # replies of the dead generation
            self._inbox.recv()
        try:
            self._start_workers()
        except WorkerStartError:
            self._stop_workers(ask=False, kill=True)
            raise
        self.restarts += 1
        self.broken = None

    # ------------------------------------------------------------------ stopping

    def _stop_workers(self, ask: bool = True, kill: bool = False) -> None:
        """Staged: Shutdown message (ask), SIGTERM, SIGKILL; every stage waits for the processes to exit.
        kill: straight to SIGKILL (after a crash)."""
        alive = [p for p in self.processes.values() if p.exitcode is None]
        if ask and alive:
            for role, process in self.processes.items():
                if process.exitcode is None:
                    try:
                        self.send(role, Shutdown(reason="supervisor shutting down"))
                    except Exception:
                        pass
            self._join(alive, ASK_TIMEOUT_S)
        stages = [(signal.SIGKILL, TERM_TIMEOUT_S)] if kill else [(signal.SIGTERM, TERM_TIMEOUT_S),
                                                                   (signal.SIGKILL, TERM_TIMEOUT_S)]
        for stage_signal, timeout_s in stages:
            alive = [p for p in self.processes.values() if p.exitcode is None]
            if not alive:
                break
            for process in alive:
                try:
                    os.kill(process.pid, stage_signal)
                except ProcessLookupError:
                    pass
            self._join(alive, timeout_s)
        for process in self.processes.values():
            if process.exitcode is not None:
                process.close()
        self.processes = {}

    @staticmethod
    def _join(processes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop the workers and release everything this instance owns; safe to call twice, from any exit path."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_workers(ask=self.broken is None)
        finally:
            for sock in self._outboxes.values():
                sock.close(linger=0)
            self._outboxes = {}
            if self._inbox is not None:
                self._inbox.close(linger=0)
            if self._context is not None:
                self._context.term()
            for segment in self.segments.values():
                segment.close()
                segment.unlink()
            self.segments = {}
            self.instance_dir.remove()
            atexit.unregister(self.close)
            if (self._previous_sigterm is not None and threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGTERM) is self._sigterm_handler):  # nobody replaced ours since
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
