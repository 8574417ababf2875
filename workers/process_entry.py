"""What every worker process does the same way: config, inbox, hygiene, the serve loop.

Each `run_<role>()` entry (workers/prefetch.py, predictor.py, compute.py) is

    def run_prefetch(config: WorkerConfig) -> None:
        run_worker(ROLE_PREFETCH, config, PrefetchWorker.from_config)

and `run_worker` gives every role the same hygiene (SGLang's habit):
- dies with its parent: a thread waits on the parent's multiprocessing
  sentinel (readable once the parent is gone, however it died) and then
  exits, sweeping the instance's /dev/shm segments since their owner can no
  longer do it;
- a process title (setproctitle if installed, else the kernel comm name
  through prctl(PR_SET_NAME), what `ps -o comm` and `top` show);
- SIGINT is ignored (Ctrl-C goes to the whole process group; the supervisor
  decides), SIGTERM exits cleanly;
- an unexpected error is reported to the supervisor (WorkerFailed, with the
  traceback) before the process exits with status 1.

A core is any object with `dispatcher` (protocol.messages.Dispatcher),
`info()` and `close()`; `Channel` is how it sends: `ZmqChannel` between
processes, `LocalBus` (tests) calls the other cores in-process.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from flashllm.protocol import codec
from flashllm.protocol.endpoints import endpoint
from flashllm.protocol.messages import ROLE_SUPERVISOR, Shutdown, WorkerFailed, WorkerReady
from flashllm.protocol.shm import SegmentLayout, list_segments
from flashllm.workers.engine_config import SparseOptions
from flashllm.workers.malloc_tuning import limit_malloc_growth, release_free_memory

PR_SET_NAME = 15
SEND_LINGER_MS = 1000  # a crash report gets this long to leave before the process exits


@dataclass
class WorkerConfig:
    """Everything a worker needs to start (pickled to the spawned process)."""

    instance: str  # runtime instance id ("<pid>-<hex>"): names the /dev/shm segments
    runtime_dir: str  # the instance directory holding the ipc sockets
    store_dir: str
    num_slots: int  # KV-cache sequences (the engine's max_batch)
    max_context: int
    max_tokens: int  # most tokens in one forward (B*T): sizes the hidden and mask buffers
    logits_rows: int  # rows of the logits buffer (a forward's logits move in chunks of this many)
    device: str  # compute device ("cpu", "cuda")
    cache_dtype: str  # numpy dtype string of the neuron cache rows
    capacity_rows: list[int]  # neuron-cache rows per layer, as allocated (sparse.capacity_rows resolved)
    cache_layout: SegmentLayout
    exchange_layout: SegmentLayout
    sparse: SparseOptions  # the engine's --mode sparse options, as the in-process SparseFlashFfn gets them
    verify: bool = True
    predictor_threads: int = 1  # torch threads of the predictor process
    compute_threads: int | None = None  # torch threads of the compute process (None: torch's default)
    resident_dtype: str | None = None  # dtype the compute process holds resident matrices in (None: compute dtype)
    head_precision: str = "stored"  # how the compute process holds a q8_0 head: "stored" or "4bit"
    extra: dict = field(default_factory=dict)


class ZmqChannel:
    """A process's inbox (PULL, bound at <runtime_dir>/<role>.sock) and its PUSH sockets to the others."""

    def __init__(self, runtime_dir: str, role: str):
        import zmq

        self._zmq = zmq
        self.runtime_dir, self.role = runtime_dir, role
        self.context = zmq.Context()  # after spawn: never inherit a context
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.bind(endpoint(runtime_dir, role))
        self._outboxes: dict[str, Any] = {}

    def send(self, role: str, msg) -> None:
        sock = self._outboxes.get(role)
        if sock is None:
            sock = self.context.socket(self._zmq.PUSH)
            sock.setsockopt(self._zmq.LINGER, SEND_LINGER_MS)
            sock.connect(endpoint(self.runtime_dir, role))
            self._outboxes[role] = sock
        sock.send(codec.encode(msg), copy=False)

    def recv(self, timeout_s: float | None = None):
        """The next message, or None after timeout_s (None: wait for ever)."""
        if timeout_s is not None and not self.inbox.poll(int(timeout_s * 1000)):
            return None
        return codec.decode(self.inbox.recv(copy=False).buffer)

    def close(self) -> None:
        for sock in self._outboxes.values():
            sock.close()
        self._outboxes = {}
        self.inbox.close(linger=0)
        self.context.term()


class CoHostedChannel:
    """The channel of a core that shares its process with others (the predictor inside the compute process).

    A message to a co-hosted role is handled at once, in this thread, by that core's dispatcher when it
    handles the type (compute's StepBegin/FfnInput to the predictor), or else queued for that role's recv()
    (the predictor's PredictionStats/StepFailed, which compute waits for); every other role is reached over
    the process's sockets. No message to a co-hosted core crosses a socket, and the process imports torch
    once instead of twice (docs/benchmarks.md: what a torch process costs)."""

    def __init__(self, sockets: "ZmqChannel", role: str, hosted: dict[str, Any],
                 queues: dict[str, collections.deque]):
        self.sockets, self.role, self.hosted, self.queues = sockets, role, hosted, queues

    def send(self, role: str, msg) -> None:
        if role not in self.hosted:
            self.sockets.send(role, msg)
            return
        core = self.hosted[role]
        if core is not None and core.dispatcher.handles(type(msg)):
            core.dispatcher.dispatch(msg)
        else:
            self.queues[role].append(msg)

    def recv(self, timeout_s: float | None = None):
        queue = self.queues[self.role]
        if queue:
            return queue.popleft()
        return self.sockets.recv(timeout_s)

    def close(self) -> None:
        pass


class _CoHostedCores:
    """Several cores as one: the main core's dispatcher and info, every core's close()."""

    def __init__(self, main, others: list):
        self.main, self.others = main, others
        self.dispatcher = main.dispatcher

    def info(self) -> dict:
        return self.main.info()

    def close(self) -> None:
        for core in [self.main, *self.others]:
            core.close()


class LocalBus:
    """In-process stand-in for the sockets: `send` hands the message to the receiving core at once.

    A role without a core (the compute core reading its own replies, the supervisor)
    gets a queue instead; `channel(role).recv()` pops from it. Lets tests drive the
    three cores in one process, step for step like the real pipeline."""

    def __init__(self):
        self.cores: dict[str, Any] = {}
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def channel(self, role: str) -> "LocalChannel":
        return LocalChannel(self, role)

    def deliver(self, role: str, msg) -> None:
        msg = codec.decode(codec.encode(msg))  # exactly what would cross a socket
        core = self.cores.get(role)
        if core is not None and core.dispatcher.handles(type(msg)):
            core.dispatcher.dispatch(msg)
        else:
            self.queues[role].append(msg)


class LocalChannel:
    def __init__(self, bus: LocalBus, role: str):
        self.bus, self.role = bus, role

    def send(self, role: str, msg) -> None:
        self.bus.deliver(role, msg)

    def recv(self, timeout_s: float | None = None):
        queue = self.bus.queues[self.role]
        if not queue:
            if timeout_s is None:
                raise RuntimeError(f"{self.role}: nothing to receive on the local bus (the pipeline stalled)")
            return None
        return queue.popleft()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- hygiene


def set_process_title(title: str) -> None:
    try:
        import setproctitle  # optional

        setproctitle.setproctitle(title)
        return
    except ImportError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: no title


def sweep_instance(instance: str, runtime_dir: str | None) -> None:
    """Unlink an instance's segments and sockets (its supervisor is gone; idempotent, races are fine)."""
    import shutil

    for owner, path in list_segments():
        if owner == instance:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    if runtime_dir:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def die_with_parent(instance: str, runtime_dir: str) -> None:
    """Start a thread that exits this process as soon as the parent process is gone."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return  # not started by multiprocessing (a test driving the core)
    parent_pid = parent.pid

    def watch() -> None:
        wait([parent.sentinel])
        sys.stderr.write(f"flashllm worker {os.getpid()}: supervisor {parent_pid} is gone; exiting\n")
        sweep_instance(instance, runtime_dir)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def run_worker(role: str, config: WorkerConfig, build_core: Callable[[WorkerConfig, Any], Any],
               co_hosted: tuple[tuple[str, Callable[[WorkerConfig, Any], Any]], ...] = ()) -> None:
    """The body of every worker process: build the core (and the cores it hosts), say ready, serve until Shutdown.

    co_hosted: (role, build_core) of cores that run in this process, built first (the main core's settings,
    e.g. its torch threads, win); each says ready under its own role, with this process's pid."""
    set_process_title(f"fl-{role}")
    limit_malloc_growth()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    die_with_parent(config.instance, config.runtime_dir)
    channel = ZmqChannel(config.runtime_dir, role)
    core = None
    built: list = []
    reporting = role
    try:
        hosted: dict[str, Any] = {role: None}
        queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        for other_role, build_other in co_hosted:
            reporting = other_role
            hosted[other_role] = None
            other = build_other(config, CoHostedChannel(channel, other_role, hosted, queues))
            hosted[other_role] = other
            built.append((other_role, other))
        reporting = role
        main = build_core(config, CoHostedChannel(channel, role, hosted, queues) if co_hosted else channel)
        core = _CoHostedCores(main, [other for _, other in built]) if built else main
        built = []
        release_free_memory()  # the load's temporaries
        for hosted_role, hosted_core in hosted.items():
            info = (main if hosted_role == role else hosted_core).info()
            channel.send(ROLE_SUPERVISOR, WorkerReady(role=hosted_role, pid=os.getpid(), info=info))
        serve(core, CoHostedChannel(channel, role, hosted, queues) if co_hosted else channel)
    except SystemExit:
        raise
    except BaseException as exc:  # report, then die: the supervisor restarts the workers
        try:
            channel.send(ROLE_SUPERVISOR, WorkerFailed(role=reporting, pid=os.getpid(),
                                                       error=f"{type(exc).__name__}: {exc}",
                                                       traceback=traceback.format_exc()))
        except Exception:
            pass
        traceback.print_exc()
        sys.exit(1)
    finally:
        for _, other in built:  # cores built before a later one failed
            other.close()
        if core is not None:
            core.close()
        channel.close()


def serve(core, channel) -> None:
    """Dispatch inbox messages to the core until a Shutdown arrives."""
    dispatcher = core.dispatcher
    while True:
        msg = channel.recv()
        if type(msg) is Shutdown:
            return
        dispatcher.dispatch(msg)
