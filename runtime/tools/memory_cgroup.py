"""Run a command and everything it starts in a fresh memory cgroup, and read what the kernel charged it.

The largest process's RSS (`/usr/bin/time`'s %M) misses the other processes of
the worker runtime and all page cache, and summed RSS counts shared memory and
shared libraries once per process. A memory cgroup charges each page once, to
whoever touched it first: the resident pages of all the group's processes plus
the page cache they bring in (an mmap'd model file is page cache) and the
/dev/shm pages they write, and it keeps the high-water mark. That is what an
OOM killer, a container or systemd's `MemoryMax=` holds a program to.

    measure_command(argv, limit_bytes=None, timeout_s=600, method="auto")
      1. a fresh child cgroup: cgroup v2 where the memory controller is delegated
         (peak: memory.peak; cap: memory.max; OOM kills: memory.events), else v1
         (memory.max_usage_in_bytes, memory.limit_in_bytes, memory.oom_control);
         the command joins it between fork and exec, so every process it starts
         is charged there. With a cap the kernel reclaims page cache to stay
         under it (a program that mmaps its weights re-reads them) and kills
         the group's processes when anonymous memory alone exceeds it. The page
         cache still charged after every process exited (files it read) is
         reported too. At the timeout, and once the command exits, every process
         left in the group is killed; the group is then removed.
      2. where no cgroup is writable (not root, no delegation) and no cap is
         asked for: the summed PSS (/proc/PID/smaps_rollup) of the process tree,
         sampled every few ms, which counts shared pages once too but can miss a
         spike between samples and sees no page cache.

`measure_baselines()` measures what a process costs before any store is loaded:
a Python that imported what the engine's torch processes import, and one that
imported what the torch-free prefetcher imports. The bound on a run at
`--memory M` is (M + one baseline per process + KV cache) x 1.10
(`memory_bound_bytes`); `measure_generate` runs a real `flashllm generate`
and sets its peak beside that bound.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_MEMORY_ROOT = "/sys/fs/cgroup/memory"
CGROUP_NAME_PREFIX = "flashllm-mem-"
EMPTY_WAIT_S = 10.0  # how long a group's killed processes get to leave before its directory is removed
PSS_SAMPLE_INTERVAL_S = 0.005
BOUND_SLACK = 0.10  # the bound's headroom over budget + baselines + KV cache

# What a process imports before it loads a store. The torch processes (the engine, the compute and the
# predictor workers) import the engine; the prefetcher imports only numpy-level modules. The processes that
# write and multiply a quantized store's neuron caches (the engine in process; else the prefetcher, which
# writes them, and compute, which sums their down columns) also load the compiled loops
# (flash_io/kernel_layout.py, and flash_io/bundle_products.py, which naive's engine loads) as they start.
TORCH_PROCESS_IMPORTS = "import flashllm.runtime.core.engine, flashllm.workers.compute, flashllm.workers.predictor"
LIGHT_PROCESS_IMPORTS = "import flashllm.workers.prefetch"
COMPILED_LOOPS = ("from flashllm.workers.flash_io.kernel_layout import load_compiled_loops; load_compiled_loops(); "
                  "from flashllm.workers.flash_io.bundle_products import load_compiled_products; "
                  "load_compiled_products()")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup this process may create a child in; the message says what was tried and what is needed."""


@dataclass
class MeasuredRun:
    """What one command did, all the processes it started together."""

    argv: list[str]
    pid: int  # the command's process id (its own children had others)
    method: str  # "cgroup-v2", "cgroup-v1" or "pss-sampling"
    limit_bytes: int | None  # the cap (None: uncapped, measured only)
    returncode: int  # negative: killed by that signal
    peak_bytes: int  # cgroup: peak of resident + page cache charged; pss-sampling: the largest summed PSS seen
    oom_kills: int  # processes the kernel killed for exceeding the cap
    cache_bytes_after_exit: int | None  # page cache still charged once every process has exited; None without a cgroup
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
            cap = "no cap" if self.limit_bytes is None else f"a cap of {self.limit_bytes / 2**20:.1f} MiB"
            return f"OOM-killed under {cap}"
        if self.timed_out:
            return "timed out"
        if self.returncode != 0:
            lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip()]
            # the error's own line (a CLI's "error: ...", a traceback's "...Error: ..."), not the hints after it
            said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
            return f"exit {self.returncode}: {said}".strip()
        return None


# ---------------------------------------------------------------------- the cgroup


class MemoryCgroup:
    """A fresh child memory cgroup (v2 where the memory controller is delegated, else v1), removed on close."""

    def __init__(self, parent: str, version: int):
        self.version = version
        self.path = os.path.join(parent, f"{CGROUP_NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.path)
        if not os.path.exists(self._file(self._peak_file())):  # v2 before Linux 5.19 keeps no peak
            os.rmdir(self.path)
            raise OSError(f"no {self._peak_file()} (kernel too old to keep a peak)")

    @classmethod
    def create(cls) -> "MemoryCgroup":
        errors = []
        for parent, version in candidate_parents():
            try:
                return cls(parent, version)
            except OSError as exc:
                errors.append(f"{parent}: {exc.strerror or exc}")
        raise CgroupUnavailable("no writable memory cgroup (" + ("; ".join(errors) or "none mounted") + "): run as "
                                "root, or in a cgroup v2 slice with the memory controller delegated "
                                "(systemd-run --user --scope -p Delegate=yes)")

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _peak_file(self) -> str:
        return "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"

    def _stat(self, key: str) -> int:
        with open(self._file("memory.stat")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    def set_limit(self, limit_bytes: int) -> None:
        with open(self._file("memory.max" if self.version == 2 else "memory.limit_in_bytes"), "w") as f:
            f.write(str(int(limit_bytes)))

    @property
    def procs_file(self) -> str:
        return self._file("cgroup.procs")

    def peak_bytes(self) -> int:
        with open(self._file(self._peak_file())) as f:
            return int(f.read().split()[0])

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(self._file(name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            pass
        return 0

    def cache_bytes(self) -> int:
        """Page cache charged to the group now (files its processes read or mapped)."""
        return self._stat("file" if self.version == 2 else "cache")

    def pids(self) -> list[int]:
        try:
            with open(self.procs_file) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def kill_all(self) -> None:
        """SIGKILL every process still in the group (all of them were started by the command run in it), and
        wait until they are gone."""
        deadline = time.monotonic() + EMPTY_WAIT_S
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def close(self) -> None:
        self.kill_all()
        deadline = time.monotonic() + EMPTY_WAIT_S
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY while the last exiting process is still charged
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def candidate_parents() -> list[tuple[str, int]]:
    """Where a child memory cgroup may go, in order: this process's own v2 cgroup (delegated), the v2 root,
    the v1 memory root."""
    parents = []
    unified = CGROUP_ROOT if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else None
    if unified is None and os.path.exists(os.path.join(CGROUP_ROOT, "unified", "cgroup.controllers")):
        unified = os.path.join(CGROUP_ROOT, "unified")
    if unified is not None:
        own = _own_v2_cgroup()
        for parent in dict.fromkeys([os.path.join(unified, own.lstrip("/")) if own else None, unified]):
            if parent and _v2_memory_enabled(parent):
                parents.append((parent, 2))
    if os.path.isdir(CGROUP_V1_MEMORY_ROOT):
        parents.append((CGROUP_V1_MEMORY_ROOT, 1))
    return parents


def _own_v2_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _v2_memory_enabled(parent: str) -> bool:
    """Children of `parent` get the memory controller (it is in its cgroup.subtree_control)."""
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def cgroup_available() -> str | None:
    """None when a memory cgroup can be made here, else why not (for a test's skip reason)."""
    try:
        MemoryCgroup.create().close()
        return None
    except CgroupUnavailable as exc:
        return str(exc)


def drop_page_cache(paths: list[str]) -> None:
    """Evict the files' clean pages from the page cache, so the next reader starts from the disk and its cgroup
    is charged for the pages it reads (warm pages stay charged to whoever read them first: an undercount)."""
    from flashllm.workers.store_reader import drop_file_cache

    for path in paths:
        drop_file_cache(path)


# ---------------------------------------------------------------------- the fallback: summed PSS


def process_tree_pids(root_pid: int) -> list[int]:
    """root_pid and all its descendants (from /proc/PID/task/*/children)."""
    pids, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    frontier.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # exited meanwhile
    return pids


def process_pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages divided among their users); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree_pss_bytes(root_pid: int) -> int:
    return sum(process_pss_bytes(pid) for pid in process_tree_pids(root_pid))


def _kill_tree(root_pid: int) -> None:
    """SIGKILL the command's session and every descendant still found under it."""
    pids = process_tree_pids(root_pid)
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------- the runner


def measure_command(argv: list[str], limit_bytes: int | None = None, timeout_s: float = 600.0,
                    env: dict[str, str] | None = None, method: str = "auto") -> MeasuredRun:
    """Run argv (and everything it starts) to completion and return its peak memory, all its processes together,
    with its exit status and output. A command still running after timeout_s is killed with every process it
    started (timed_out in the result, not an exception).

    method: "auto" (a cgroup where one is writable, else PSS sampling), "cgroup" (CgroupUnavailable where none
    is) or "pss". limit_bytes caps the cgroup (the kernel OOM-kills above it); it needs a cgroup."""
    if method not in ("auto", "cgroup", "pss"):
        raise ValueError(f"method {method!r}: use 'auto', 'cgroup' or 'pss'")
    cgroup = None
    if method != "pss":
        try:
            cgroup = MemoryCgroup.create()
        except CgroupUnavailable:
            if method == "cgroup" or limit_bytes is not None:
                raise
    if cgroup is None:
        if limit_bytes is not None:
            raise CgroupUnavailable("a memory cap needs a memory cgroup; method 'pss' only measures")
        return _measure_by_pss_sampling(argv, env, timeout_s)
    with cgroup:
        if limit_bytes is not None:
            cgroup.set_limit(limit_bytes)
        procs_file = cgroup.procs_file

        def enter_group() -> None:  # runs in the child between fork and exec: it and all it starts are charged
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                   env=env, preexec_fn=enter_group, start_new_session=True)
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            cgroup.kill_all()
            stdout, stderr = process.communicate()
        wall_s = time.perf_counter() - started
        cgroup.kill_all()  # children that outlived the command (daemonized workers)
        return MeasuredRun(argv=list(argv), pid=process.pid, method=f"cgroup-v{cgroup.version}",
                           limit_bytes=limit_bytes, returncode=process.returncode, peak_bytes=cgroup.peak_bytes(),
                           oom_kills=cgroup.oom_kills(), cache_bytes_after_exit=cgroup.cache_bytes(), wall_s=wall_s,
                           timed_out=timed_out, stdout=stdout, stderr=stderr)


def _measure_by_pss_sampling(argv: list[str], env: dict[str, str] | None, timeout_s: float) -> MeasuredRun:
    # output to files, not pipes: this loop samples instead of reading, and a full pipe would stall the command
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        peak_bytes, timed_out = 0, False
        while process.poll() is None:
            peak_bytes = max(peak_bytes, process_tree_pss_bytes(process.pid))
            if time.monotonic() > deadline:
                timed_out = True
                _kill_tree(process.pid)
                process.wait()
                break
            time.sleep(PSS_SAMPLE_INTERVAL_S)
        wall_s = time.perf_counter() - started
        try:
            os.killpg(process.pid, signal.SIGKILL)  # children that outlived the command, in its session
        except (ProcessLookupError, PermissionError):
            pass
        out.seek(0)
        err.seek(0)
        return MeasuredRun(argv=list(argv), pid=process.pid, method="pss-sampling", limit_bytes=None,
                           returncode=process.returncode, peak_bytes=peak_bytes, oom_kills=0,
                           cache_bytes_after_exit=None, wall_s=wall_s, timed_out=timed_out,
                           stdout=out.read(), stderr=err.read())


# ---------------------------------------------------------------------- baselines and the bound


@dataclass
class ProcessBaselines:
    """Peak memory of a process that imported what it imports before loading a store (measured like a run)."""

    torch_process_bytes: int  # Python + torch + the engine's modules
    light_process_bytes: int  # Python + numpy + the prefetcher's modules (no torch)
    method: str
    compiled_loops_bytes: int = 0  # what loading the kernel-row loops adds to a process that loads them


def measure_baselines(python: str = sys.executable, compiled_loops: bool = False) -> ProcessBaselines:
    """compiled_loops: the store's caches hold kernel rows (flash_io/kernel_rows.holds_kernel_rows), so the
    processes that write and multiply them load their compiled loops: measured as what they add to the
    torch-free prefetcher's imports."""
    torch_run = measure_command([python, "-c", TORCH_PROCESS_IMPORTS])
    light_check = "; import sys; sys.exit(1 if 'torch' in sys.modules else 0)"
    runs = [(torch_run, TORCH_PROCESS_IMPORTS)]
    light_run = measure_command([python, "-c", LIGHT_PROCESS_IMPORTS + light_check])
    runs.append((light_run, LIGHT_PROCESS_IMPORTS))
    loops_run = None
    if compiled_loops:
        loops_run = measure_command([python, "-c", f"{LIGHT_PROCESS_IMPORTS}; {COMPILED_LOOPS}{light_check}"])
        runs.append((loops_run, COMPILED_LOOPS))
    for run, what in runs:
        if not run.ok:
            raise RuntimeError(f"baseline `{what}` failed ({run.failure()}; a torch-free process that "
                               f"imported torch fails too): {run.stderr.strip()[-500:]}")
    loops_bytes = max(0, loops_run.peak_bytes - light_run.peak_bytes) if loops_run is not None else 0
    return ProcessBaselines(torch_run.peak_bytes, light_run.peak_bytes, torch_run.method, loops_bytes)


def store_has_compiled_loops(store_dir: str) -> bool:
    """Whether a run over this store (on the CPU) loads the kernel-row loops (measure_baselines' compiled_loops)."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.kernel_rows import holds_kernel_rows

    return holds_kernel_rows(read_manifest(store_dir).ffn, "cpu")


# the processes each runtime runs: (torch processes, torch-free processes); workers: the engine, compute (which
# hosts the predictor) and the torch-free prefetcher (runtime/core/supervisor.py WORKER_PROCESSES)
RUNTIME_PROCESSES = {"inproc": (1, 0), "workers": (2, 1)}
# the processes that load the compiled loops: the prefetcher writes the caches, compute sums their down columns
COMPILED_LOOP_PROCESSES = {"inproc": 1, "workers": 2}


def _baselines_bytes(baselines: ProcessBaselines, runtime: str) -> int:
    """One baseline per process of the runtime, and the compiled loops once per process that loads them."""
    torch_processes, light_processes = RUNTIME_PROCESSES[runtime]
    return torch_processes * baselines.torch_process_bytes + light_processes * baselines.light_process_bytes + \
        COMPILED_LOOP_PROCESSES[runtime] * baselines.compiled_loops_bytes


def memory_bound_bytes(budget_bytes: int, kv_cache_bytes: int, baselines: ProcessBaselines, runtime: str) -> int:
    """What a run at --memory budget_bytes may use, all processes together: (budget + one baseline per process
    + the KV cache) plus 10%."""
    return int((budget_bytes + kv_cache_bytes + _baselines_bytes(baselines, runtime)) * (1 + BOUND_SLACK))


def budget_under_cap_bytes(cap_bytes: int, kv_cache_bytes: int, baselines: ProcessBaselines, runtime: str) -> int:
    """The largest --memory whose bound (memory_bound_bytes) stays within a whole-process cap."""
    return int(cap_bytes / (1 + BOUND_SLACK)) - kv_cache_bytes - _baselines_bytes(baselines, runtime)


# ---------------------------------------------------------------------- a real `flashllm generate`, measured

MEASURE_PROMPT = "The history of the printing press begins"


def kv_cache_bytes(store_dir: str, max_batch: int = 1, max_context: int | None = None) -> int:
    """The KV cache an engine over this store allocates (what the memory plan reports beside the budget)."""
    from flashllm.workers.engine_config import EngineConfig
    from flashllm.workers.memory_plan import MemoryInputs
    from flashllm.workers.store_reader import open_store

    manifest = open_store(store_dir)
    config = EngineConfig(max_batch=max_batch, max_context=max_context)
    return MemoryInputs.from_config(manifest, config).kv_cache_bytes


def generate_command(store_dir: str, mode: str, runtime: str, memory: str | int, max_tokens: int = 8,
                     extra_args: list[str] | None = None) -> list[str]:
    """The `flashllm generate` command line a user would type (greedy, --ignore-eos, JSON out)."""
    return [sys.executable, "-m", "flashllm", "generate", "--store", store_dir, "--mode", mode, "--runtime", runtime,
            "--memory", str(memory), "--max-tokens", str(max_tokens), "--ignore-eos", "--json",
            *(extra_args or []), MEASURE_PROMPT]


def measure_generate(store_dir: str, mode: str, runtime: str, memory_bytes: int, max_tokens: int = 8,
                     extra_args: list[str] | None = None, baselines: ProcessBaselines | None = None,
                     timeout_s: float = 600.0) -> dict:
    """Peak memory of a real `flashllm generate` at --memory memory_bytes, beside its bound. Raises
    RuntimeError with why it failed and the command's stderr when it does."""
    baselines = baselines or measure_baselines(compiled_loops=store_has_compiled_loops(store_dir))
    argv = generate_command(store_dir, mode, runtime, memory_bytes, max_tokens, extra_args)
    drop_page_cache(store_files(store_dir))  # read cold, so the run's cgroup is charged for the pages it maps
    run = measure_command(argv, timeout_s=timeout_s)
    if not run.ok:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({run.failure()}, OOM kills {run.oom_kills}): "
                           f"{run.stderr.strip()[-2000:]}")
    kv_bytes = kv_cache_bytes(store_dir)
    bound = memory_bound_bytes(memory_bytes, kv_bytes, baselines, runtime)
    torch_processes, light_processes = RUNTIME_PROCESSES[runtime]
    return {"command": argv[2:], "mode": mode, "runtime": runtime, "memory_budget_bytes": memory_bytes,
            "peak_bytes": run.peak_bytes, "method": run.method,
            "baseline_torch_process_bytes": baselines.torch_process_bytes,
            "baseline_light_process_bytes": baselines.light_process_bytes,
            "torch_processes": torch_processes, "light_processes": light_processes,
            "kv_cache_bytes": kv_bytes, "bound_bytes": bound, "within_bound": run.peak_bytes <= bound,
            "peak_above_baselines_bytes": run.peak_bytes - torch_processes * baselines.torch_process_bytes
            - light_processes * baselines.light_process_bytes}


def store_files(store_dir: str) -> list[str]:
    """Every file under a store folder."""
    return [os.path.join(root, name) for root, _, files in os.walk(store_dir) for name in sorted(files)]
