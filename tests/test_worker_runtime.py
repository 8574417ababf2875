"""The worker runtime: the sparse FFN pipelined over prefetch, predictor and compute processes.

What a user sees: `--runtime workers` gives exactly the tokens of the
in-process sparse engine; three worker processes run, the prefetcher is the
one that reads the FFN from the device and compute reads none of it; a worker
killed mid-generation fails the request with a clear error within 5 s, the
next request gets fresh workers; whatever way the runtime ends, no process
and no /dev/shm segment is left behind.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from flashllm.protocol.endpoints import instance_dir, new_instance_id
from flashllm.protocol.messages import (
    ROLE_COMPUTE, ROLE_PREDICTOR, ROLE_PREFETCH, ROLE_SUPERVISOR, ChunkDone, ForwardChunk, ForwardRequest, LayerReady,
    LayerStaged,
)
from flashllm.protocol.shm import SharedSegment, list_segments
from tests.cli_run import run_flashllm
from tests.conftest import tight_budget
from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.runtime.core.supervisor import WorkerStartError
from flashllm.runtime.core.worker_executor import WorkerCrashedError, WorkerRuntimeError, build_worker_config
from flashllm.workers.compute import ComputeWorker, PipelineStats
from flashllm.workers.engine_config import SparseOptions
from flashllm.workers.executor import ModelExecutor, default_device
from flashllm.workers.flash_io import bundle_reader
from flashllm.workers.flash_io.bundle_reader import layer_chunks
from flashllm.workers.flash_io.io_counters import process_read_bytes
from flashllm.workers.interfaces import Executor
from flashllm.workers.predictor import PredictorWorker
from flashllm.workers.prefetch import PrefetchWorker
from flashllm.workers.process_entry import LocalBus
from flashllm.workers.store_reader import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "1 2 3 4"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# small caches, few neurons per token: evictions, LRU and (batch 3) the masked fallback all happen
TIGHT = {"keep_fraction": 0.25, "capacity_rows": [100, 100], "window_tokens": 2}


def _direct_reads(store: str) -> bool:
    """O_DIRECT works on the store's filesystem (not tmpfs): /proc read_bytes then sees every FFN read."""
    try:
        os.close(os.open(os.path.join(store, "ffn.bin"), os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _instance_leftovers(instance: str) -> list[str]:
    left = [path for owner, path in list_segments() if owner == instance]
    if os.path.exists(instance_dir(instance)):
        left.append(instance_dir(instance))
    return left


def _alive(pid: int) -> bool:
    """Running (not merely a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


# ---------------------------------------------------------------------- the pipeline's cores, in one process


class LocalPipelineExecutor(Executor):
    """The three worker cores in this process on a LocalBus: every message and shared-memory
    hand-over of the real runtime, without processes (fast, and failures show a plain traceback)."""

    runtime = "inproc"  # every core in this process

    def __init__(self, store: str, num_slots: int, max_context: int, ffn_options: dict, device: str = "cpu"):
        manifest = open_store(store)
        self.instance = new_instance_id()
        self.device = device
        self.config = build_worker_config(store, manifest, num_slots, max_context, device, self.instance, "",
                                          sparse=SparseOptions.from_dict(ffn_options),
                                          logits_rows=max(num_slots, max_context))
        self.config.predictor_threads = torch.get_num_threads()  # from_config sets it for the whole process
        self.segments = {layout.kind: SharedSegment.create(self.instance, layout)
                         for layout in (self.config.cache_layout, self.config.exchange_layout)}
        self.bus = LocalBus()
        for role, core in ((ROLE_PREFETCH, PrefetchWorker.from_config), (ROLE_PREDICTOR, PredictorWorker.from_config),
                           (ROLE_COMPUTE, ComputeWorker)):
            self.bus.cores[role] = core(self.config, self.bus.channel(role))
        self.stats = PipelineStats()
        self.step = 0

    @property
    def ffn_stats(self):
        return self.stats

    def forward(self, token_ids, slots, positions, logit_steps=None):
        batch, steps = token_ids.shape
        self.step += 1
        self.bus.deliver(ROLE_COMPUTE, ForwardRequest(
            step=self.step, batch=batch, steps=steps, token_ids=token_ids.reshape(-1).numpy(), slots=slots.numpy(),
            positions=positions.reshape(-1).numpy(),
            logit_steps=np.zeros(0, np.int64) if logit_steps is None else logit_steps.numpy()))
        reply = self.bus.queues[ROLE_SUPERVISOR].popleft()
        assert type(reply) is ForwardChunk, reply
        assert reply.num_rows == reply.total_rows
        self.stats.add(reply.stats)
        logits = self.segments["exchange"].arrays["logits"][: reply.num_rows].copy()
        return torch.from_numpy(logits).reshape(batch, steps, -1) if logit_steps is None else torch.from_numpy(logits)

    def flash_read_bytes(self) -> int:
        return process_read_bytes()  # every core reads in this process

    def release_slot(self, slot: int) -> None:
        pass

    def close(self) -> None:
        for core in self.bus.cores.values():
            core.close()
        self.bus.cores = {}
        for segment in self.segments.values():
            segment.close()
            segment.unlink()


def _record_uncached_hand_overs(bus: LocalBus) -> collections.Counter:
    """Counts, over the bus's traffic, how compute got each decode step's uncached layer: "staged" when it
    multiplied a LayerStaged's rows (its ChunkDone came with no LayerReady for the layer), "read" when a
    LayerReady followed the LayerStaged."""
    counts: collections.Counter = collections.Counter()
    staged: dict[tuple[int, int], int] = {}  # (step, layer) → slot of a LayerStaged not yet settled
    deliver = bus.deliver

    def recording(role, msg):
        if type(msg) is LayerStaged:
            staged[(msg.step, msg.layer)] = msg.staging
        elif type(msg) is LayerReady and staged.pop((msg.step, msg.layer), None) is not None:
            counts["read"] += 1
        elif type(msg) is ChunkDone:
            for key, slot in list(staged.items()):
                if key[0] == msg.step and slot == msg.staging:
                    del staged[key]
                    counts["staged"] += 1
        deliver(role, msg)

    bus.deliver = recording
    return counts


def _greedy_with_logits(engine: Engine, prompts: list[str]) -> tuple[list[list[int]], list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    engine.logits_hook = lambda request_id, logits: seen.append(logits.clone())
    results = engine.generate(prompts, GREEDY)
    engine.logits_hook = None
    return [r.tokens for r in results], seen


@pytest.mark.parametrize("kind, options, batch, chunks", [
    ("llama", {}, 1, 1),
    ("llama", TIGHT, 1, 1),
    ("llama", TIGHT, 3, 1),
    ("llama", TIGHT, 3, 4),
    ("llama", dict(TIGHT, missing_policy="skip"), 1, 1),
    ("llama", dict(TIGHT, missing_policy="skip"), 2, 1),
    ("llama", dict(TIGHT, compute_set="window"), 2, 1),
    ("opt", {"capacity_rows": [200, 200], "window_tokens": 3}, 2, 1),
    ("opt", {"capacity_rows": [200, 200], "window_tokens": 3}, 2, 3),
    ("llama", dict(TIGHT, capacity_rows=[0, 100]), 2, 4),
    ("opt", {"capacity_rows": [200, 0], "window_tokens": 3}, 1, 3),
    ("opt", {"capacity_rows": [200, 0], "window_tokens": 3}, 1, 1),
    ("llama", dict(TIGHT, capacity_rows=[100, 0]), 2, 1),
], ids=["llama-full", "llama-tight", "llama-tight-batch3", "llama-tight-batch3-chunks4", "llama-skip-ready-early",
        "llama-skip-batch2", "llama-window-compute-batch2", "opt-relu", "opt-relu-chunks3",
        "llama-uncached-layer-batch2-chunks4", "opt-relu-uncached-layer-chunks3", "opt-relu-uncached-last-layer",
        "llama-uncached-last-layer-batch2"])
def test_pipeline_steps_reproduce_the_inprocess_sparse_ffn(calibrated_stores, kind, options, batch, chunks, monkeypatch):
    """Same messages and buffers as the processes use; every logit bitwise equal to SparseFlashFfn's.
    chunks: the whole-layer reads (prefill, and decode batches that fall back) go in that many chunks
    (one, by default, on tiny layers): the slots pass each layer through a chunk at a time. A layer of
    capacity 0 has no cache: its decode steps read their tokens' sets through the chunk slots."""
    store = calibrated_stores(kind)
    manifest = open_store(store)
    if chunks > 1:
        rows = -(-manifest.ffn.layers[0].num_neurons // chunks)  # the last chunk is shorter where n is not a multiple
        monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", rows * manifest.ffn.bundle_bytes)
    assert len(layer_chunks(manifest.ffn.layers[0].num_neurons, manifest.ffn.bundle_bytes)) == chunks
    reference = ModelExecutor(store, manifest, "sparse", batch, 128, device="cpu",
                              sparse=SparseOptions.from_dict(options))
    with Engine(store, mode="sparse", max_batch=batch, max_context=128, executor=reference) as engine:
        tokens, logits = _greedy_with_logits(engine, PROMPTS)
        reference_stats = engine.token_stats
    pipeline = LocalPipelineExecutor(store, batch, 128, dict(options))
    handed = _record_uncached_hand_overs(pipeline.bus)
    with Engine(store, mode="sparse", max_batch=batch, max_context=128, executor=pipeline) as engine:
        pipeline_tokens, pipeline_logits = _greedy_with_logits(engine, PROMPTS)
        pipeline_stats = engine.token_stats
    assert pipeline_tokens == tokens
    assert len(pipeline_logits) == len(logits)
    for ours, theirs in zip(pipeline_logits, logits):
        assert torch.equal(ours, theirs)
    # an uncached layer after the first (it has a lookahead) whose read-ahead fits a chunk slot is handed to
    # compute at its Lookahead: taken as read where it holds the layer's whole read, else read on (both seen here)
    if chunks == 1 and 0 in options.get("capacity_rows", [1])[1:]:
        assert handed["staged"] and handed["read"], handed
    else:
        assert not handed, handed
    for name in ("neurons_computed", "neurons_predicted", "cache_hits", "neurons_read"):
        assert [s[name] for s in pipeline_stats] == [s[name] for s in reference_stats], name
    # read-ahead for a layer that then falls back to the whole-layer read is the only extra I/O
    for ours, theirs in zip(pipeline_stats, reference_stats):
        assert ours["reader_read_bytes"] >= theirs["reader_read_bytes"]
        if batch == 1:
            assert ours["reader_read_bytes"] == theirs["reader_read_bytes"]
    assert not _instance_leftovers(pipeline.instance)
    if options.get("compute_set") == "window":  # the option reached both runtimes: it changes what they compute
        predicted = ModelExecutor(store, manifest, "sparse", batch, 128, device="cpu",
                                  sparse=SparseOptions.from_dict(dict(options, compute_set="predicted")))
        with Engine(store, mode="sparse", max_batch=batch, max_context=128, executor=predicted) as engine:
            _, predicted_logits = _greedy_with_logits(engine, PROMPTS)
        assert any(not torch.equal(a, b) for a, b in zip(predicted_logits, logits))


def _inproc_and_pipeline_runs(store: str, options: dict) -> dict:
    """runtime → (greedy tokens, logits per step, per-token counters) for PROMPTS at batch 1."""
    runs = {}
    for runtime in ("inproc", "workers"):
        executor = (ModelExecutor(store, open_store(store), "sparse", 1, 128, device="cpu",
                                  sparse=SparseOptions.from_dict(dict(options)))
                    if runtime == "inproc" else LocalPipelineExecutor(store, 1, 128, dict(options)))
        with Engine(store, mode="sparse", max_batch=1, max_context=128, executor=executor) as engine:
            tokens, logits = _greedy_with_logits(engine, PROMPTS)
            runs[runtime] = (tokens, logits, [(s["neurons_computed"], s["neurons_read"]) for s in engine.token_stats])
    return runs


def test_a_policy_changed_in_one_place_is_followed_by_both_runtimes(calibrated_stores, monkeypatch):
    """The sparse step's rules live in workers/sparse_policy.py alone: a cached-path rule changed there
    (no set fits any more) sends every decode layer to the masked path in both runtimes alike, which reads
    just the token's set. Each token still computes its own set, summed alone: the same logits, bit for bit,
    on the other path."""
    from flashllm.workers import sparse_policy

    store = calibrated_stores("llama")
    arch = open_store(store).arch
    whole_model = arch.intermediate_size * arch.num_hidden_layers
    before = _inproc_and_pipeline_runs(store, TIGHT)
    monkeypatch.setattr(sparse_policy.SparseStepPlanner, "fits", lambda planner, layer, ids: False)
    after = _inproc_and_pipeline_runs(store, TIGHT)
    for runs in (before, after):
        (tokens, logits, counters), (worker_tokens, worker_logits, worker_counters) = runs["inproc"], runs["workers"]
        assert worker_tokens == tokens and worker_counters == counters
        assert len(worker_logits) == len(logits)
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(worker_logits, logits))
    assert all(torch.equal(a, b) for a, b in zip(after["inproc"][1], before["inproc"][1]))
    assert any(computed < whole_model for computed, _ in before["inproc"][2])  # decode tokens used the caches
    # now every token reads what it computes: a prompt every neuron, a decode token its set alone
    assert all(computed == read for computed, read in after["inproc"][2])
    assert all(read < whole_model for _, read in after["inproc"][2][1:])


# ---------------------------------------------------------------------- the real processes


@pytest.fixture(scope="module")
def worker_engine(calibrated_stores):
    """One worker-runtime engine (tight caches, batch 2) shared by the process tests; they run in file order."""
    with Engine(calibrated_stores("llama"), mode="sparse", max_batch=2, max_context=128, ffn_options=dict(TIGHT),
                runtime="workers") as engine:
        yield engine
    assert not _instance_leftovers(engine.executor.instance)


def test_workers_give_the_inprocess_greedy_tokens(calibrated_stores, worker_engine):
    with Engine(calibrated_stores("llama"), mode="sparse", max_batch=2, max_context=128, ffn_options=dict(TIGHT)) as engine:
        expected = [r.tokens for r in engine.generate(PROMPTS, GREEDY)]
    assert [r.tokens for r in worker_engine.generate(PROMPTS, GREEDY)] == expected


def test_a_prompt_step_returns_only_the_logits_asked_for(calibrated_stores, worker_engine):
    """A prompt's forward is asked for each sequence's last real token only (the head is a prompt's largest
    product): both runtimes return those rows, the ones a forward returning every step's logits holds."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 10, 10]])  # the second prompt is 2 tokens, right-padded
    slots, positions, last_steps = torch.tensor([0, 1]), torch.arange(4).repeat(2, 1), torch.tensor([3, 1])
    with Engine(calibrated_stores("llama"), mode="sparse", max_batch=2, max_context=128,
                ffn_options=dict(TIGHT)) as inproc:
        for engine in (inproc, worker_engine):
            every_step = engine.forward(ids, slots, positions)  # (2, 4, V)
            last = engine.forward(ids, slots, positions, last_steps)  # (2, V)
            assert last.shape == (2, every_step.shape[-1])
            torch.testing.assert_close(last, every_step[[0, 1], [3, 1]], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(last[1], every_step[1, 3])  # the padding's logits differ: the right row


def test_the_compute_worker_holds_resident_matrices_in_the_dtype_asked(calibrated_stores):
    """--resident-dtype reaches the compute process: its logits are the in-process float16-resident ones."""
    runs = {}
    for runtime in ("inproc", "workers"):
        with Engine(calibrated_stores("llama"), mode="sparse", max_batch=1, max_context=128, ffn_options=dict(TIGHT),
                    runtime=runtime, resident_dtype="float16") as engine:
            runs[runtime] = _greedy_with_logits(engine, PROMPTS[:1])
    assert runs["workers"][0] == runs["inproc"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["workers"][1], runs["inproc"][1]))


def test_three_workers_run_and_only_the_prefetcher_reads_the_ffn(worker_engine):
    executor = worker_engine.executor
    pids = executor.worker_pids
    assert sorted(pids) == sorted([ROLE_PREFETCH, ROLE_PREDICTOR, ROLE_COMPUTE])
    # the compute process multiplies with the engine's thread count (same kernels, same bits as in-process)
    assert executor.supervisor.worker_info[ROLE_COMPUTE]["torch_threads"] == worker_engine.threads
    # two processes: the predictor runs inside compute (one torch import fewer)
    assert pids[ROLE_PREDICTOR] == pids[ROLE_COMPUTE] != pids[ROLE_PREFETCH]
    for role, pid in pids.items():
        assert _alive(pid) and pid != os.getpid()
        with open(f"/proc/{pid}/comm", encoding="ascii") as f:
            assert f.read().strip() == f"fl-{ROLE_COMPUTE if role == ROLE_PREDICTOR else role}"[:15]
    before = executor.worker_read_bytes()
    engine_before = process_read_bytes()
    results = worker_engine.generate(PROMPTS[:2], GREEDY)
    after = executor.worker_read_bytes()
    reported = sum(s["reader_read_bytes"] for s in results[0].token_stats)
    assert reported > 0, "tight caches must read bundles while decoding"
    assert after[ROLE_COMPUTE] == before[ROLE_COMPUTE]
    assert after[ROLE_PREDICTOR] == before[ROLE_PREDICTOR]
    assert process_read_bytes() == engine_before
    ffn_file = os.path.realpath(os.path.join(worker_engine.store_dir, "ffn.bin"))
    for role in (ROLE_COMPUTE, ROLE_PREDICTOR):
        fds = os.listdir(f"/proc/{pids[role]}/fd")
        assert not any(os.path.realpath(f"/proc/{pids[role]}/fd/{fd}") == ffn_file for fd in fds), role
    if executor.supervisor.worker_info[ROLE_PREFETCH]["direct_reads"]:
        # decode reads plus the prefills' whole layers: all of it reached the device from the prefetcher
        assert after[ROLE_PREFETCH] - before[ROLE_PREFETCH] >= reported


def test_per_token_timings_for_bench(worker_engine):
    worker_engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    timings = worker_engine.executor.last_timings
    assert set(timings) >= {"ms", "io_ms", "compute_ms", "wait_ms"}
    assert timings["ms"] >= timings["compute_ms"] > 0 and timings["wait_ms"] >= 0
    last = worker_engine.token_stats[-1]
    assert last["wait_ms"] >= 0
    # the compute worker's own busy time, not the engine's wall time less the prefetcher's (overlapped) I/O
    assert last["compute_ms"] == timings["compute_ms"] and 0 < last["compute_ms"] <= last["ms"]


def test_decode_steps_count_the_prefetchers_device_reads(worker_engine):
    """The engine process reads nothing under workers: flash_read_bytes is the prefetch worker's /proc/<pid>/io."""
    if not _direct_reads(worker_engine.store_dir):
        pytest.skip("the store's filesystem refuses O_DIRECT: reads come from the page cache")
    prefetch_pid = worker_engine.executor.worker_pids[ROLE_PREFETCH]
    worker_engine.token_stats.clear()
    before = process_read_bytes(prefetch_pid)
    [result] = worker_engine.generate(PROMPTS[1:2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    after = process_read_bytes(prefetch_pid)
    per_token = [s["flash_read_bytes"] for s in result.token_stats]
    assert len(per_token) == 7 and sum(per_token) > 0, "tight caches must read bundles while decoding"
    assert result.flash_read_bytes == after - before  # prefill and decode
    assert sum(per_token) <= result.flash_read_bytes


@pytest.mark.parametrize("role", [ROLE_PREFETCH, ROLE_PREDICTOR, ROLE_COMPUTE])
def test_a_killed_worker_fails_the_request_quickly_then_workers_restart(calibrated_stores, worker_engine, role):
    executor = worker_engine.executor
    old_pids = dict(executor.worker_pids)
    killed_at = []

    def kill_after_three_tokens(request_id, logits):
        if len(killed_at) == 0 and len(worker_engine.token_stats) >= 3:
            os.kill(old_pids[role], signal.SIGKILL)
            killed_at.append(time.monotonic())

    worker_engine.token_stats.clear()
    counted = executor.flash_read_bytes()
    worker_engine.logits_hook = kill_after_three_tokens
    try:
        process = ROLE_COMPUTE if role == ROLE_PREDICTOR else role  # the predictor runs inside compute
        with pytest.raises(WorkerCrashedError, match=f"the {process} worker .*killed by SIGKILL"):
            worker_engine.generate(PROMPTS[:1], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    finally:
        worker_engine.logits_hook = None
    assert killed_at and time.monotonic() - killed_at[0] < 5.0
    assert _wait_gone(old_pids.values(), timeout_s=2.0) == [], "no orphan workers"
    for request_id in list(worker_engine._running) + [s.request_id for s in worker_engine._waiting]:
        worker_engine.abort(request_id)  # the engine keeps the failed request; the caller aborts it
    # the next request restarts the workers, which start with empty caches like a fresh engine
    with Engine(calibrated_stores("llama"), mode="sparse", max_batch=2, max_context=128, ffn_options=dict(TIGHT)) as fresh:
        expected = [r.tokens for r in fresh.generate(PROMPTS[2:], GREEDY)]
    assert [r.tokens for r in worker_engine.generate(PROMPTS[2:], GREEDY)] == expected
    new_pids = executor.worker_pids
    assert set(new_pids.values()).isdisjoint(old_pids.values())
    assert executor.flash_read_bytes() >= counted  # a counter across worker generations, never back
    assert not [p for p in list_segments() if p[0] != executor.instance and p[0].startswith(f"{os.getpid()}-")]


def test_a_restart_that_fails_is_an_error_and_leaves_nothing_behind(calibrated_stores, tmp_path):
    store = str(tmp_path / "store")
    shutil.copytree(calibrated_stores("llama"), store)
    with Engine(store, mode="sparse", max_batch=1, max_context=128, ffn_options=dict(TIGHT), runtime="workers") as engine:
        short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        engine.generate(PROMPTS[:1], short)
        instance, pids = engine.executor.instance, dict(engine.executor.worker_pids)
        os.kill(pids[ROLE_COMPUTE], signal.SIGKILL)
        os.rename(os.path.join(store, "resident.safetensors"), os.path.join(store, "moved.safetensors"))
        with pytest.raises(WorkerCrashedError, match="compute worker"):
            engine.generate(PROMPTS[:1], short)
        for request_id in list(engine._running):
            engine.abort(request_id)
        with pytest.raises(WorkerStartError, match="failed to start.*resident.safetensors"):
            engine.generate(PROMPTS[:1], short)
    assert _wait_gone(pids.values(), timeout_s=2.0) == []
    assert _instance_leftovers(instance) == []


SUPERVISOR_SCRIPT = """
import json, sys
from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams
engine = Engine(sys.argv[1], mode="sparse", max_batch=1, max_context=128, runtime="workers",
                ffn_options={"keep_fraction": 0.25, "capacity_rows": [100, 100], "window_tokens": 2})
print(json.dumps({"instance": engine.executor.instance, "pids": engine.executor.worker_pids}), flush=True)
while True:
    engine.generate(["The quick brown fox"], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    print("generated", flush=True)
"""


def _start_supervisor(store: str) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen([sys.executable, "-c", SUPERVISOR_SCRIPT, store], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    started = json.loads(process.stdout.readline())
    assert process.stdout.readline().strip() == "generated"  # mid-generation from here on
    return process, started


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_supervisor_leaves_no_processes_or_segments(calibrated_stores, how):
    """SIGTERM: staged shutdown and cleanup in the supervisor; SIGKILL: the workers notice and sweep."""
    process, started = _start_supervisor(calibrated_stores("llama"))
    try:
        assert all(_alive(pid) for pid in started["pids"].values())
        assert _instance_leftovers(started["instance"])  # segments exist while it runs
        process.send_signal(getattr(signal, how))
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert _wait_gone(started["pids"].values(), timeout_s=10.0) == []
    deadline = time.monotonic() + 5.0
    while _instance_leftovers(started["instance"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _instance_leftovers(started["instance"]) == []


def test_worker_runtime_refuses_what_it_cannot_run(tiny_stores, calibrated_stores):
    with pytest.raises(ValueError, match="--runtime workers"):
        Engine(calibrated_stores("llama"), mode="dense", runtime="workers")
    with pytest.raises(Exception, match="calibrate"):
        Engine(tiny_stores("llama"), mode="sparse", runtime="workers")
    with pytest.raises(ValueError, match="--runtime"):
        Engine(calibrated_stores("llama"), mode="sparse", runtime="threads")


def test_a_slot_whose_kv_cache_was_lost_is_refused(worker_engine):
    executor = worker_engine.executor
    with pytest.raises(WorkerRuntimeError, match="KV cache"):
        executor.forward(torch.tensor([[5]]), torch.tensor([1]), torch.tensor([[40]]))


def test_bench_of_the_worker_runtime_measures_reads_and_compute(calibrated_stores, tmp_path):
    """`flashllm bench --runtimes workers` at a budget that forces reads: the bytes are the prefetcher's,
    and compute_ms is the compute worker's busy time (it came out 0 bytes and negative ms before)."""
    store = calibrated_stores("llama")
    if not _direct_reads(store):
        pytest.skip("the store's filesystem refuses O_DIRECT: reads come from the page cache")
    budget = tight_budget(store, 0.25, 20)
    out = str(tmp_path / "bench.json")
    done = run_flashllm("bench", "--store", store, "--modes", "sparse", "--runtimes", "workers", "--memory", str(budget),
                        "--tokens", "6", "--keep-fraction", "0.25", "--no-read-baseline", "--json", out)
    assert done.returncode == 0, done.stderr
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    workers = report["modes"]["sparse-workers"]
    assert workers["runtime"] == "workers" and workers["device"] == default_device()  # the compute worker's
    assert sum(workers["memory_plan"]["capacity_rows"]) < sum(r.num_neurons for r in open_store(store).ffn.layers)
    assert workers["flash_read_bytes_per_token"] > 0
    assert 0 < workers["compute_ms"] <= workers["ms_per_token"]
    assert workers["io_ms"] >= 0 and workers["wait_ms"] >= 0
    # the same run's peak memory, all processes, beside its bound (runtime/tools/memory_cgroup.py)
    peak = report["peak_memory"]["runs"]["workers"]
    assert "error" not in peak, peak
    assert peak["baseline_torch_process_bytes"] < peak["peak_bytes"] <= peak["bound_bytes"]
    assert "peak memory, all processes" in done.stdout


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_give_the_inprocess_greedy_tokens(calibrated_stores):
    store = calibrated_stores("llama")
    with Engine(store, mode="sparse", max_batch=2, max_context=128, device="cuda", ffn_options=dict(TIGHT)) as engine:
        expected = [r.tokens for r in engine.generate(PROMPTS, GREEDY)]
    with Engine(store, mode="sparse", max_batch=2, max_context=128, device="cuda", ffn_options=dict(TIGHT),
                runtime="workers") as engine:
        assert engine.executor.supervisor.worker_info[ROLE_COMPUTE]["device"] == "cuda"
        assert [r.tokens for r in engine.generate(PROMPTS, GREEDY)] == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_matches_and_copies_only_changed_rows(calibrated_stores):
    """On CUDA the compute core mirrors each layer cache on the device and copies only rows whose id changed."""
    store = calibrated_stores("llama")
    reference = ModelExecutor(store, open_store(store), "sparse", 2, 128, device="cuda",
                              sparse=SparseOptions.from_dict(TIGHT))
    with Engine(store, mode="sparse", max_batch=2, max_context=128, executor=reference) as engine:
        tokens, logits = _greedy_with_logits(engine, PROMPTS)
    pipeline = LocalPipelineExecutor(store, 2, 128, dict(TIGHT), device="cuda")
    with Engine(store, mode="sparse", max_batch=2, max_context=128, executor=pipeline) as engine:
        pipeline_tokens, pipeline_logits = _greedy_with_logits(engine, PROMPTS)
        view = pipeline.bus.cores[ROLE_COMPUTE].ffn.view
        rows_used = sum(s["neurons_computed"] for s in engine.token_stats)
        assert not view.zero_copy and 0 < view.rows_copied < rows_used
    assert pipeline_tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(pipeline_logits, logits))
