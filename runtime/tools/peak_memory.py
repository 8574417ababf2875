"""Peak memory of a command and every process it starts, counted as a memory cgroup counts it.

The largest process's RSS (`/usr/bin/time`'s %M) misses the other processes of
the worker runtime, and summed RSS counts shared memory and shared libraries
once per process. A memory cgroup charges each page once, to whoever touched it
first, and keeps the high-water mark: that is what an OOM killer, a container
or systemd's `MemoryMax=` holds a service to. So:

    measure_command(argv, cap_bytes=None)
      1. a fresh child cgroup under a writable memory hierarchy (v2: memory.peak;
         v1: memory.max_usage_in_bytes), the command moved into it before exec,
         so every process it starts is charged there;
      2. where no cgroup is writable (not root, no delegation): the summed PSS
         (/proc/PID/smaps_rollup) of the process tree, sampled every few ms, which
         counts shared pages once too but can miss a spike between samples.

`measure_baselines()` measures what a process costs before any store is loaded:
a Python that imported what the engine's torch processes import, and one that
imported what the torch-free prefetcher imports. The bound on a run at
`--memory M` is (M + one baseline per process + KV cache) x 1.10
(`memory_bound_bytes`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
PSS_SAMPLE_INTERVAL_S = 0.005
BOUND_SLACK = 0.10  # the bound's headroom over budget + baselines + KV cache

# What a process imports before it loads a store. The torch processes (the engine, the compute and the
# predictor workers) import the engine; the prefetcher imports only numpy-level modules.
TORCH_PROCESS_IMPORTS = "import flashllm.runtime.core.engine, flashllm.workers.compute, flashllm.workers.predictor"
LIGHT_PROCESS_IMPORTS = "import flashllm.workers.prefetch"


class CgroupUnavailable(OSError):
    """No memory cgroup this process may create a child in."""


@dataclass
class PeakMemory:
    peak_bytes: int
    method: str  # "cgroup-v2", "cgroup-v1" or "pss-sampling"
    exit_code: int
    oom_kills: int = 0
    stdout: str = ""
    stderr: str = ""

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("stdout", "stderr")}


class MemoryCgroup:
    """A fresh child memory cgroup (v2 where the memory controller is on, else v1), removed on close."""

    def __init__(self, parent: str, version: int):
        self.version = version
        self.path = os.path.join(parent, f"flashllm-peak-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)

    @classmethod
    def create(cls) -> "MemoryCgroup":
        errors = []
        for parent, version in _candidate_parents():
            try:
                return cls(parent, version)
            except OSError as exc:
                errors.append(f"{parent}: {exc.strerror or exc}")
        raise CgroupUnavailable("no writable memory cgroup (" + ("; ".join(errors) or "none mounted") + ")")

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def set_limit(self, limit_bytes: int) -> None:
        with open(self._file("memory.max" if self.version == 2 else "memory.limit_in_bytes"), "w") as f:
            f.write(str(int(limit_bytes)))

    def add_process(self, pid: int) -> None:
        with open(self._file("cgroup.procs"), "w") as f:
            f.write(str(pid))

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with open(self._file(name)) as f:
            return int(f.read())

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

    def close(self) -> None:
        # the processes have exited; an empty cgroup can be removed (a zombie's charge can take a moment to go)
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _candidate_parents() -> list[tuple[str, int]]:
    """Where a child memory cgroup may go: this process's own v2 cgroup (delegated), the v2 root, the v1 root."""
    parents = []
    unified = CGROUP_ROOT if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else None
    if unified is None and os.path.exists(os.path.join(CGROUP_ROOT, "unified", "cgroup.controllers")):
        unified = os.path.join(CGROUP_ROOT, "unified")
    if unified is not None:
        own = _own_v2_cgroup()
        for parent in dict.fromkeys([os.path.join(unified, own.lstrip("/")) if own else None, unified]):
            if parent and _v2_memory_enabled(parent):
                parents.append((parent, 2))
    if os.path.isdir(CGROUP_V1_MEMORY):
        parents.append((CGROUP_V1_MEMORY, 1))
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


# ---------------------------------------------------------------------- measuring a command


def measure_command(argv: list[str], cap_bytes: int | None = None, env: dict | None = None,
                    timeout_s: float | None = None, method: str = "auto") -> PeakMemory:
    """Run argv to completion and return its peak memory (all its processes together), its exit code and output.

    method: "auto" (a cgroup where one is writable, else PSS sampling), "cgroup" or "pss".
    cap_bytes: a memory limit on the cgroup (the command is OOM-killed above it); cgroup methods only."""
    cgroup = None
    if method in ("auto", "cgroup"):
        try:
            cgroup = MemoryCgroup.create()
        except CgroupUnavailable:
            if method == "cgroup":
                raise
    if cgroup is None and cap_bytes is not None:
        raise CgroupUnavailable("a memory cap needs a writable memory cgroup")
    if cgroup is None:
        return _measure_by_pss_sampling(argv, env, timeout_s)
    with cgroup:
        if cap_bytes is not None:
            cgroup.set_limit(cap_bytes)
        procs_file = os.path.join(cgroup.path, "cgroup.procs")

        def join_cgroup() -> None:  # in the child, before exec: every process it starts is charged there
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s,
                                   preexec_fn=join_cgroup)
        return PeakMemory(peak_bytes=cgroup.peak_bytes(), method=f"cgroup-v{cgroup.version}",
                          exit_code=completed.returncode, oom_kills=cgroup.oom_kills(),
                          stdout=completed.stdout, stderr=completed.stderr)


def _measure_by_pss_sampling(argv: list[str], env: dict | None, timeout_s: float | None) -> PeakMemory:
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        peak = 0
        while process.poll() is None:
            peak = max(peak, process_tree_pss_bytes(process.pid))
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(argv, timeout_s)
            time.sleep(PSS_SAMPLE_INTERVAL_S)
        out.seek(0)
        err.seek(0)
        return PeakMemory(peak_bytes=peak, method="pss-sampling", exit_code=process.returncode,
                          stdout=out.read(), stderr=err.read())


# ---------------------------------------------------------------------- baselines and the bound


@dataclass
class ProcessBaselines:
    """Peak memory of a process that imported what it imports before loading a store (measured like a run)."""

    torch_process_bytes: int  # Python + torch + the engine's modules
    light_process_bytes: int  # Python + numpy + the prefetcher's modules (no torch)
    method: str


def measure_baselines(python: str = sys.executable) -> ProcessBaselines:
    torch_peak = measure_command([python, "-c", TORCH_PROCESS_IMPORTS])
    light_peak = measure_command([python, "-c", LIGHT_PROCESS_IMPORTS + "; import sys; "
                                  "sys.exit(1 if 'torch' in sys.modules else 0)"])
    for peak, what in ((torch_peak, TORCH_PROCESS_IMPORTS), (light_peak, LIGHT_PROCESS_IMPORTS)):
        if peak.exit_code != 0:
            raise RuntimeError(f"baseline `{what}` failed (status {peak.exit_code}; a torch-free process that "
                               f"imported torch fails too): {peak.stderr.strip()[-500:]}")
    return ProcessBaselines(torch_peak.peak_bytes, light_peak.peak_bytes, torch_peak.method)


# the processes each runtime runs: (torch processes, torch-free processes); workers: the engine, compute (which
# hosts the predictor) and the torch-free prefetcher (runtime/core/supervisor.py WORKER_PROCESSES)
RUNTIME_PROCESSES = {"inproc": (1, 0), "workers": (2, 1)}


def memory_bound_bytes(budget_bytes: int, kv_cache_bytes: int, baselines: ProcessBaselines, runtime: str) -> int:
    """What a run at --memory budget_bytes may use, all processes together: (budget + one baseline per process
    + the KV cache) plus 10%."""
    torch_processes, light_processes = RUNTIME_PROCESSES[runtime]
    base = (budget_bytes + kv_cache_bytes + torch_processes * baselines.torch_process_bytes
            + light_processes * baselines.light_process_bytes)
    return int(base * (1 + BOUND_SLACK))


# ---------------------------------------------------------------------- a real `flashllm generate`, measured

MEASURE_PROMPT = "The history of the printing press begins"


def kv_cache_bytes(store_dir: str, max_batch: int = 1, max_context: int | None = None) -> int:
    """The KV cache an engine over this store allocates (what the memory plan reports beside the budget)."""
    from flashllm.runtime.core.engine import DEFAULT_MAX_CONTEXT
    from flashllm.workers.executor import compute_dtype, default_device
    from flashllm.workers.models.attention import KVCache
    from flashllm.workers.store_reader import open_store

    arch = open_store(store_dir).arch
    context = min(max_context or DEFAULT_MAX_CONTEXT, arch.max_position_embeddings)
    return KVCache.bytes_needed(arch.num_hidden_layers, max_batch, arch.num_key_value_heads, context, arch.head_dim,
                                compute_dtype(default_device()).itemsize)


def generate_command(store_dir: str, mode: str, runtime: str, memory: str | int, max_tokens: int = 8,
                     extra_args: list[str] | None = None) -> list[str]:
    """The `flashllm generate` command line a user would type (greedy, --ignore-eos, JSON out)."""
    return [sys.executable, "-m", "flashllm", "generate", "--store", store_dir, "--mode", mode, "--runtime", runtime,
            "--memory", str(memory), "--max-tokens", str(max_tokens), "--ignore-eos", "--json",
            *(extra_args or []), MEASURE_PROMPT]


def measure_generate(store_dir: str, mode: str, runtime: str, memory_bytes: int, max_tokens: int = 8,
                     extra_args: list[str] | None = None, baselines: ProcessBaselines | None = None,
                     timeout_s: float | None = 600) -> dict:
    """Peak memory of a real `flashllm generate` at --memory memory_bytes, beside its bound. Raises
    RuntimeError with the command's stderr when it fails."""
    baselines = baselines or measure_baselines()
    argv = generate_command(store_dir, mode, runtime, memory_bytes, max_tokens, extra_args)
    drop_store_page_cache(store_dir)
    peak = measure_command(argv, timeout_s=timeout_s)
    if peak.exit_code != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited with status {peak.exit_code} "
                           f"(OOM kills {peak.oom_kills}): {peak.stderr.strip()[-2000:]}")
    kv_bytes = kv_cache_bytes(store_dir)
    bound = memory_bound_bytes(memory_bytes, kv_bytes, baselines, runtime)
    torch_processes, light_processes = RUNTIME_PROCESSES[runtime]
    return {"command": argv[2:], "mode": mode, "runtime": runtime, "memory_budget_bytes": memory_bytes,
            "peak_bytes": peak.peak_bytes, "method": peak.method,
            "baseline_torch_process_bytes": baselines.torch_process_bytes,
            "baseline_light_process_bytes": baselines.light_process_bytes,
            "torch_processes": torch_processes, "light_processes": light_processes,
            "kv_cache_bytes": kv_bytes, "bound_bytes": bound, "within_bound": peak.peak_bytes <= bound,
            "peak_above_baselines_bytes": peak.peak_bytes - torch_processes * baselines.torch_process_bytes
            - light_processes * baselines.light_process_bytes}


def drop_store_page_cache(store_dir: str) -> None:
    """Evict the store's files from the page cache, so a measured run reads them cold and its cgroup is
    charged for the pages it maps (warm pages stay charged to whoever read them first: an undercount)."""
    from flashllm.workers.store_reader import drop_file_cache

    for root, _, files in os.walk(store_dir):
        for name in files:
            drop_file_cache(os.path.join(root, name))
