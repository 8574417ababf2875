"""The worker runtime behind the engine: ModelExecutor's interface, the model in two processes
(prefetch; compute, which hosts the predictor).

    engine.forward ─▶ WorkerExecutor.forward ─ForwardRequest─▶ compute ⇄ predictor ⇄ prefetch
                    ◀─ logits (B, T, V) ◀─ ForwardChunk (logits buffer, shared memory)

`Engine(store, mode="sparse", runtime="workers")` builds one. Same answers as
the in-process sparse engine for the same store and settings (the workers run
SparseFlashFfn's steps in the same order); the point is the overlap: layer
l+1's predicted neurons are read from flash while layer l computes.

Per forward, `ffn_stats` (a PipelineStats) says where the time went:
io_s (the prefetcher's flash time, mostly hidden behind compute), busy_s (the
compute process working), wait_s (compute blocked on a late layer),
compute_s (FFN math), predict_s; `last_timings` has the same in ms.
`flash_read_bytes()` counts what the prefetch worker read from the device.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from flashllm.protocol.endpoints import InstanceDir, new_instance_id
from flashllm.protocol.messages import (
    ROLE_COMPUTE, ROLE_PREFETCH, Dispatcher, ForwardChunk, ForwardRequest, LogitsTaken, StepFailed,
)
from flashllm.protocol.shm import EXCHANGE_SEGMENT, exchange_layout, neuron_cache_layout
from flashllm.protocol.quant_format import down_scale_table_shape
from flashllm.protocol.store_format import Manifest
from flashllm.runtime.core.supervisor import (
    DEFAULT_MAX_RESTARTS, DEFAULT_START_TIMEOUT_S, Supervisor, WorkerCrashedError, WorkerRuntimeError, sweep_stale_instances,
)
from flashllm.workers.compute import PipelineStats
from flashllm.workers.engine_config import EngineConfig, SparseOptions
from flashllm.workers.executor import compute_dtype, default_device
from flashllm.workers.flash_io.bundle_reader import largest_chunk_rows, numpy_dtype_of_store
from flashllm.workers.flash_io.integrity import BundleChecksumError
from flashllm.workers.flash_io.kernel_rows import holds_kernel_rows, kernel_rows_arrays
from flashllm.workers.flash_io.io_counters import process_read_bytes
from flashllm.workers.interfaces import Executor
from flashllm.workers.process_entry import WorkerConfig
from flashllm.workers.predictor import require_predictors
from flashllm.workers.prefetch import neuron_cache_dtype

MIN_LOGITS_ROWS = 64


def default_compute_threads() -> int:
    """torch threads for the compute process: this process's count, i.e. what the in-process engine
    uses (Engine sets it from --threads or runtime.engine.default_threads before building us).
    Same count, same kernels, same bits: CPU scaled_dot_product_attention of one query token gives
    different low bits with 1 and 2 threads, enough to flip a near-tie in greedy decoding."""
    return torch.get_num_threads()


class WorkerStepError(WorkerRuntimeError):
    """A worker could not do its part of the step (it says why); the workers stay up."""

    client_error_code = WorkerCrashedError.client_error_code


def build_worker_config(store_dir: str, manifest: Manifest, num_slots: int, max_context: int, device: str,
                        instance: str, runtime_dir: str, verify: bool = True, sparse: SparseOptions | None = None,
                        logits_rows: int | None = None) -> WorkerConfig:
    """The workers' shared settings and shared-memory layouts for this store (what SparseFlashFfn would use);
    sparse: --mode sparse's options (None: the defaults)."""
    sparse = sparse or SparseOptions()
    arch, layout = manifest.arch, manifest.ffn
    dtype = compute_dtype(device)
    store_dtype = numpy_dtype_of_store(layout.dtype)
    cache_dtype = neuron_cache_dtype(layout.dtype, device)
    num_neurons = max(region.num_neurons for region in layout.layers)
    capacity_rows = list(sparse.capacity_rows or [region.num_neurons for region in layout.layers])
    max_tokens = max(max_context, num_slots)
    logits_rows = logits_rows or max(num_slots, MIN_LOGITS_ROWS)
    hidden_dtype = np.float32 if dtype == torch.float32 else np.float16
    return WorkerConfig(
        instance=instance, runtime_dir=runtime_dir, store_dir=store_dir, num_slots=num_slots, max_context=max_context,
        max_tokens=max_tokens, logits_rows=logits_rows, device=device, cache_dtype=cache_dtype.str,
        capacity_rows=capacity_rows,
        cache_layout=neuron_cache_layout(capacity_rows, layout.stored_row_width, cache_dtype, **kernel_cache_arrays(
            layout, capacity_rows, device)),
        exchange_layout=exchange_layout(max_tokens, arch.hidden_size, num_neurons, layout.stored_row_width, store_dtype,
                                        hidden_dtype, arch.vocab_size, logits_rows,
                                        chunk_rows=largest_chunk_rows(layout), max_sequences=num_slots),
        sparse=sparse, verify=verify)


def kernel_cache_arrays(layout, capacity_rows: list[int], device: str) -> dict:
    """neuron_cache_layout's kernel_arrays and down_table_shapes where the caches hold kernel rows (a quantized
    store, compute on the CPU; flash_io/kernel_rows.py), else nothing."""
    if not holds_kernel_rows(layout, device):
        return {}
    d = dict((name, n) for name, n, _ in layout.bundle_parts)["down"]
    kind = layout.part_kinds()["down"]
    tables = [down_scale_table_shape(kind, d, region.num_neurons) for region in layout.layers]  # (d, n_ff/32, c)
    return {"kernel_arrays": [kernel_rows_arrays(layout, capacity) for capacity in capacity_rows],
            "down_table_shapes": [(groups, channels, rows) for rows, groups, channels in tables]}  # group-major


class WorkerExecutor(Executor):
    """The Executor of the worker runtime (workers/interfaces.py), like workers.executor.ModelExecutor in-process."""

    runtime = "workers"

    def __init__(self, store_dir: str, manifest: Manifest, mode: str, num_slots: int, max_context: int,
                 device: str | None = None, verify: bool = True, sparse: SparseOptions | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S, logits_rows: int | None = None,
                 runtime_root: str | None = None, handle_sigterm: bool = True, compute_threads: int | None = None,
                 resident_dtype: str | None = None, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 head_precision: str = "stored"):
        if mode != "sparse":
            raise ValueError(f"--runtime workers runs the pipelined sparse FFN (--mode sparse); use --runtime inproc "
                             f"for --mode {mode}")
        require_predictors(store_dir, manifest, sparse)
        self.arch = manifest.arch
        self.device = device or default_device()
        sweep_stale_instances(runtime_root)
        instance = new_instance_id()
        instance_dir = InstanceDir(instance, runtime_root).create()
        try:
            self.config = build_worker_config(store_dir, manifest, num_slots, max_context, self.device, instance,
                                              instance_dir.path, verify, sparse, logits_rows)
            self.config.compute_threads = compute_threads or default_compute_threads()
            self.config.resident_dtype = resident_dtype
            self.config.head_precision = head_precision
        except BaseException:
            instance_dir.remove()
            raise
        self.supervisor = Supervisor(self.config, instance_dir, start_timeout_s, handle_sigterm,
                                     max_restarts=max_restarts).start()
        self.stats = PipelineStats()
        self.last_timings: dict[str, float] = {}
        self._step = 0
        self._slot_lengths: dict[int, int] = {}  # tokens of KV cache each slot holds in this worker generation
        self._replies = Dispatcher({ForwardChunk: self._on_chunk, StepFailed: self._on_step_failed},
                                   owner="the worker executor")
        self._pending: dict = {}
        self._prefetcher_read: tuple[int, int] | None = None  # (pid, read_bytes) at the last look
        self._past_prefetchers_read_bytes = 0  # what prefetchers before a restart had read

    @classmethod
    def from_config(cls, store_dir: str, manifest: Manifest, config: EngineConfig) -> "WorkerExecutor":
        restarts = DEFAULT_MAX_RESTARTS if config.worker_restarts is None else config.worker_restarts
        return cls(store_dir, manifest, config.mode, config.max_batch, config.max_context, device=config.device,
                   verify=config.verify, sparse=config.sparse_options, resident_dtype=config.resident_dtype,
                   max_restarts=restarts, head_precision=config.head_precision)

    @property
    def instance(self) -> str:
        return self.config.instance

    @property
    def worker_pids(self) -> dict[str, int]:
        return self.supervisor.pids

    def worker_read_bytes(self) -> dict[str, int]:
        """/proc/<pid>/io read_bytes of each worker: what really reached the storage device."""
        return {role: process_read_bytes(pid) for role, pid in self.worker_pids.items()}

    def flash_read_bytes(self) -> int:
        """Bytes the prefetch worker has read from the device (/proc/<pid>/io read_bytes; it is the
        only worker that opens the FFN file), summed over restarts: a counter like the in-process
        ModelExecutor.flash_read_bytes(), so a step's delta means the same in both runtimes.
        A crashed prefetcher's count stays as last seen (its final reads cannot be known)."""
        pid = self.worker_pids.get(ROLE_PREFETCH)
        seen_pid, seen_bytes = self._prefetcher_read or (None, 0)
        if pid != seen_pid:
            self._past_prefetchers_read_bytes += seen_bytes
            seen_bytes = 0
        if pid is not None:
            try:
                seen_bytes = process_read_bytes(pid)
            except OSError:  # it died since the supervisor last looked: keep its last count
                pass
        self._prefetcher_read = (pid, seen_bytes) if pid is not None else None
        return self._past_prefetchers_read_bytes + seen_bytes

    @property
    def ffn_stats(self) -> PipelineStats:
        """PipelineStats summed since the last reset (the engine resets it per decode step)."""
        return self.stats

    def forward(self, token_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                logit_steps: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids/positions (B, T), slots (B,) → logits float32: (B, T, V), or (B, V) at logit_steps (B,).
        Writes the KV cache of those slots."""
        batch, steps = token_ids.shape
        if batch * steps > self.config.max_tokens:
            raise ValueError(f"{batch * steps} tokens in one forward but the worker runtime holds at most "
                             f"{self.config.max_tokens} (max_context); split the input")
        self.check_workers()  # a worker that died since the last step is replaced before this one, not after
        slot_list = [int(s) for s in slots.tolist()]
        position_rows = positions.reshape(batch, steps)
        for b, slot in enumerate(slot_list):
            first = int(position_rows[b].min())
            if first > self._slot_lengths.get(slot, 0):
                raise WorkerRuntimeError(
                    f"slot {slot} continues at position {first} but its KV cache holds "
                    f"{self._slot_lengths.get(slot, 0)} tokens (lost when the workers restarted); abort the "
                    "request and submit it again")
        self._step += 1
        step = self._step
        start = time.perf_counter()
        self.supervisor.send(ROLE_COMPUTE, ForwardRequest(
            step=step, batch=batch, steps=steps, token_ids=token_ids.reshape(-1).to(torch.int64).numpy(),
            slots=np.asarray(slot_list, dtype=np.int64), positions=position_rows.reshape(-1).to(torch.int64).numpy(),
            logit_steps=np.zeros(0, np.int64) if logit_steps is None else logit_steps.to(torch.int64).numpy()))
        logit_rows = batch * steps if logit_steps is None else batch
        logits = torch.empty((logit_rows, self.arch.vocab_size), dtype=torch.float32)  # (B*T or B, V)
        self._pending = {"step": step, "logits": logits, "done": False}
        while not self._pending["done"]:
            self._replies.dispatch(self.supervisor.recv(what=f"step {step}"))
        for b, slot in enumerate(slot_list):
            self._slot_lengths[slot] = max(self._slot_lengths.get(slot, 0), int(position_rows[b].max()) + 1)
        wall_s = time.perf_counter() - start
        stats = self._pending["stats"]
        self.stats.add(stats)
        self.last_timings = {"ms": wall_s * 1e3, "io_ms": stats["io_s"] * 1e3, "compute_ms": stats["busy_s"] * 1e3,
                             "wait_ms": stats["wait_s"] * 1e3, "ffn_compute_ms": stats["compute_s"] * 1e3,
                             "predict_ms": stats["predict_s"] * 1e3, "critical_io_ms": stats["critical_io_s"] * 1e3}
        return logits.reshape(batch, steps, -1) if logit_steps is None else logits  # (B, T, V) or (B, V)

    def _restart_if_broken(self) -> None:
        if self.supervisor.broken:
            restarts = self.supervisor.restarts
            self.supervisor.ensure_running()
            if self.supervisor.restarts != restarts:
                self._slot_lengths.clear()  # the new compute worker starts with an empty KV cache

    def recover(self, error: BaseException) -> bool:
        """After a step failed with `error` (its sequences aborted): restart the workers if it was theirs.
        True when the runtime can take the next step; raises RestartBudgetSpent / WorkerStartError if not."""
        if not isinstance(error, WorkerRuntimeError):
            return False
        self.supervisor.mark_broken(str(error))  # a worker that failed a step may hold half-updated caches
        self._restart_if_broken()
        return True

    def check_workers(self) -> bool:
        """Restart the workers now if one died between steps (or a crash left them down); True if restarted."""
        dead = self.supervisor.dead_worker_reason()
        if dead is not None:
            self.supervisor.mark_broken(f"{dead} between steps")
        if not self.supervisor.broken:
            return False
        self._restart_if_broken()
        return True

    def interrupt(self) -> None:
        """Unblock a step waiting on a stuck (stopped) worker, from another thread: the workers are killed and
        the step fails with WorkerCrashedError."""
        self.supervisor.kill_workers()

    def _on_chunk(self, msg: ForwardChunk) -> None:
        pending = self._pending
        if msg.step != pending.get("step"):
            return  # a reply to a step that already failed
        logits_buffer = self.supervisor.segments[EXCHANGE_SEGMENT].arrays["logits"]  # (R, V)
        pending["logits"][msg.first_row:msg.first_row + msg.num_rows] = torch.from_numpy(logits_buffer[:msg.num_rows])
        if msg.first_row + msg.num_rows < msg.total_rows:
            self.supervisor.send(ROLE_COMPUTE, LogitsTaken(step=msg.step, next_row=msg.first_row + msg.num_rows))
            return
        pending["stats"], pending["done"] = msg.stats, True

    def _on_step_failed(self, msg: StepFailed) -> None:
        if msg.step != self._pending.get("step"):
            return
        self._pending["done"] = True
        corrupt = f"{BundleChecksumError.__name__}: "
        if msg.error.startswith(corrupt):  # the store's fault, not the worker's: no restart, the message as is
            raise BundleChecksumError(msg.error.removeprefix(corrupt))
        raise WorkerStepError(f"step {msg.step} failed in the {msg.role} worker: {msg.error}")

    def release_slot(self, slot: int) -> None:
        """A sequence left its slot (its KV rows are simply overwritten by the next user)."""
        self._slot_lengths.pop(slot, None)

    def close(self) -> None:
        self.supervisor.close()


__all__ = ["WorkerExecutor", "WorkerCrashedError", "WorkerRuntimeError", "WorkerStepError", "build_worker_config"]
