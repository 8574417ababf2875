"""A real `flashllm generate` at --memory M, all its processes measured together as a memory cgroup counts
them, stays within (M + one baseline per process + KV cache) + 10% (runtime/tools/memory_cgroup.py)."""
from __future__ import annotations

import time

import pytest

from flashllm.runtime.tools.memory_cgroup import (
    CgroupUnavailable, cgroup_available, measure_baselines, measure_command, measure_generate,
)

NO_CGROUP = cgroup_available()


def test_peak_counts_every_process_of_a_command():
    """Two children each touching 64 MiB: the peak holds both (the largest process's RSS would say one)."""
    child = "import time; b = bytearray(64 << 20); time.sleep(1.0)"
    script = (f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]; "
              "[p.wait() for p in ps]")
    peak = measure_command(["python3", "-c", script])
    assert peak.ok, peak.stderr
    assert peak.peak_bytes >= 2 * 64 << 20


def test_pss_fallback_counts_every_process_and_kills_them_all_at_the_timeout(tmp_path):
    """Where no cgroup is writable: the summed PSS sees a child's 64 MiB, and at the timeout the command's
    background child is killed too, not left running."""
    pid_file = tmp_path / "child.pid"
    child = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    script = f"python3 -c {child!r} & echo $! > {pid_file}; sleep 60"
    run = measure_command(["bash", "-c", script], timeout_s=3, method="pss")
    assert run.method == "pss-sampling" and run.timed_out and run.failure() == "timed out"
    assert run.peak_bytes >= 64 << 20
    child_pid = int(pid_file.read_text())
    for _ in range(100):  # killed; reaped by whoever inherited it
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the background child {child_pid} outlived the timeout")


def test_a_cap_without_a_cgroup_is_refused():
    if NO_CGROUP is None:
        pytest.skip("a memory cgroup is writable here")
    with pytest.raises(CgroupUnavailable, match="no writable memory cgroup"):
        measure_command(["true"], limit_bytes=64 << 20)


@pytest.fixture(scope="module")
def baselines():
    """One torch process's and one torch-free process's peak, measured once for both runtimes' bounds."""
    return measure_baselines()


@pytest.mark.skipif(NO_CGROUP is not None, reason=f"no writable memory cgroup: {NO_CGROUP}")
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["inproc", "workers"])
def test_generate_stays_within_the_memory_bound(calibrated_stores, baselines, runtime):
    store = calibrated_stores("llama")
    assert baselines.light_process_bytes < baselines.torch_process_bytes  # the prefetcher has no torch
    result = measure_generate(store, "sparse", runtime, memory_bytes=2 << 20, max_tokens=6, baselines=baselines)
    assert result["peak_bytes"] <= result["bound_bytes"], result
    assert result["peak_bytes"] > baselines.torch_process_bytes  # it measured the run, not an empty cgroup


def test_too_small_budget_names_every_knob_with_what_it_saves(calibrated_stores, monkeypatch):
    from flashllm.runtime.core.engine import Engine
    from flashllm.workers.flash_io import bundle_reader
    from flashllm.workers.memory_plan import MemoryPlanError

    from flashllm.workers.memory_plan import (MIB, ResidentSavings, naive_minimum_bytes, plan_for_store,
                                              resident_bytes_of, sparse_minimum_knobs)
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores("llama")
    manifest = open_store(store)
    # chunks of a few rows, as a large model's are to its layers: its read-ahead is below its smallest caches
    monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", 16 * manifest.ffn.bundle_bytes)
    with pytest.raises(MemoryPlanError) as refused:
        Engine(store, mode="sparse", ffn_options={"memory_budget_bytes": 4096})
    message = str(refused.value)
    for knob in ("--resident-dtype float16", "--max-context", "--max-batch"):
        assert knob in message, (knob, message)
    assert message.count("MiB") >= 6  # each knob says how much it saves
    # the minimum holds no neuron cache, and the message says what every layer's cache would take
    plan = plan_for_store(store, manifest, None, "sparse", 4, 0)
    assert f"is {plan.minimum_bytes / MIB:.1f} MiB" in message and "with no neuron cache" in message
    assert f"at its smallest needs {plan.cached_minimum_bytes / MIB:.1f} MiB" in message
    # naive is offered exactly where it needs less than sparse's minimum, with both figures
    naive = naive_minimum_bytes(manifest, resident_bytes_of(store, manifest, 4, "cpu"), 4, "cpu")
    assert ("--mode naive" in message) == (naive < plan.minimum_bytes)
    knobs = sparse_minimum_knobs(manifest, naive + MIB, ResidentSavings(), plan.predictor_bytes, 0, naive)
    assert f"--mode naive (every layer read whole for each token, no predictors): needs {naive / MIB:.1f} MiB, " \
           "1.0 MiB less" in knobs


@pytest.mark.slow
def test_auto_mode_picks_dense_then_sparse_then_naive_by_budget(calibrated_stores, demo_store):
    from flashllm.runtime.core.engine import Engine
    from flashllm.workers.memory_plan import (MemoryInputs, MemoryPlan, MemoryPlanError, estimated_sparse_plan,
                                              naive_minimum_bytes, plan_for_store, resident_bytes_of)
    from flashllm.runtime.core.mode_choice import choose_mode
    from flashllm.workers.store_reader import open_store

    def picked(store_dir: str, budget_bytes: int | None) -> tuple[str, str]:
        options = {} if budget_bytes is None else {"memory_budget_bytes": budget_bytes}
        with Engine(store_dir, mode="auto", runtime="inproc", ffn_options=options) as engine:
            return engine.mode, engine.mode_reason

    store = calibrated_stores("llama")
    assert picked(store, None)[0] == "dense"
    assert picked(store, 1 << 30)[0] == "dense"
    # an uncalibrated store cannot run sparse: with dense too big, naive, and the reason names the command
    manifest = open_store(demo_store)
    dense = plan_for_store(demo_store, manifest, 1 << 40, "dense", 4, 0).total_bytes
    naive = naive_minimum_bytes(manifest, resident_bytes_of(demo_store, manifest, 4, "cpu"), 4, "cpu")
    assert naive < dense
    # naive holds whole layers with what a budget leaves beside its minimum, and streams the rest
    half_way = plan_for_store(demo_store, manifest, (naive + dense) // 2, "naive", 4, 0)
    held = [rows for rows in half_way.capacity_rows if rows]
    assert 0 < len(held) < len(manifest.ffn.layers) and half_way.total_bytes <= (naive + dense) // 2
    # calibrating would not make sparse fit there (its predictors and every layer's cache): the reason says so
    calibrated_need = estimated_sparse_plan(demo_store, manifest, MemoryInputs(
        mode="sparse", budget_bytes=None, compute_itemsize=4)).cached_minimum_bytes
    assert (naive + dense) // 2 < calibrated_need < dense
    mode, reason = picked(demo_store, (naive + dense) // 2)
    assert mode == "naive" and "calibrating would not change that" in reason and "flashllm calibrate" not in reason
    assert f"sparse would need about {calibrated_need / 2**20:.1f} MiB" in reason
    # where it would, the reason names the command
    mode, reason = picked(demo_store, (calibrated_need + dense) // 2)
    assert mode == "naive" and "calibrated, sparse would fit" in reason
    assert f"flashllm calibrate --store {demo_store}" in reason
    # the order itself (a tiny model's sparse minimum, all staging, is above its dense need, so by plans):
    # dense, sparse with every layer's cache, naive, sparse with uncached layers
    asked = []

    def plans_only(allowed: set, uncached_layers: int = 0):
        def plan_of(mode: str) -> MemoryPlan:
            asked.append(mode)
            if mode not in allowed:
                raise MemoryPlanError(f"{mode} does not fit")
            rows = [0] * uncached_layers + [8] * (4 - uncached_layers) if mode == "sparse" else [8] * 4
            return MemoryPlan(budget_bytes=1, resident_bytes=0, predictor_bytes=0, staging_bytes=0, cache_bytes=0,
                              kv_cache_bytes=0, capacity_rows=rows, cached_minimum_bytes=3 << 20)
        return plan_of

    calibrated_manifest = open_store(store)
    assert choose_mode(calibrated_manifest, store, 1, plans_only({"dense", "sparse", "naive"})).mode == "dense"
    assert asked == ["dense"]  # nothing else is planned (sparse's plan reads the predictors) once dense fits
    assert choose_mode(calibrated_manifest, store, 1, plans_only({"sparse", "naive"})).mode == "sparse"
    below_caches = choose_mode(calibrated_manifest, store, 1, plans_only({"sparse", "naive"}, uncached_layers=2))
    assert below_caches.mode == "naive" and "every layer's neuron cache for sparse (it needs 3.0 MiB)" in \
        below_caches.reason
    only_sparse = choose_mode(calibrated_manifest, store, 1, plans_only({"sparse"}, uncached_layers=2))
    assert only_sparse.mode == "sparse" and "2 of 4 layers" in only_sparse.reason
    assert choose_mode(calibrated_manifest, store, 1, plans_only({"naive"})).mode == "naive"
    with pytest.raises(MemoryPlanError, match="sparse does not fit"):  # nothing fits: sparse's error
        choose_mode(calibrated_manifest, store, 1, plans_only(set()))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_the_plan_estimated_before_calibrating_is_the_one_calibrating_gives(kind, tiny_stores, calibrated_stores):
    """What --mode auto tells about calibrating an uncalibrated store rests on estimated_sparse_plan: for a SwiGLU
    model (a sketch predictor by default) its predictors and every layer's smallest caches are what calibrate's
    defaults then hold, within 5%; for a ReLU model (a trained low-rank classifier) there is no estimate."""
    from flashllm.workers.memory_plan import MemoryInputs, estimated_sparse_plan, plan_for_store
    from flashllm.workers.store_reader import open_store

    store = tiny_stores(kind)
    estimate = estimated_sparse_plan(store, open_store(store), MemoryInputs(mode="sparse", budget_bytes=None,
                                                                            compute_itemsize=4))
    if kind == "opt":
        assert estimate is None
        return
    calibrated = calibrated_stores(kind)
    actual = plan_for_store(calibrated, open_store(calibrated), None, "sparse", 4, 0)
    assert abs(estimate.predictor_bytes - actual.predictor_bytes) <= 0.05 * actual.predictor_bytes
    assert abs(estimate.cached_minimum_bytes - actual.cached_minimum_bytes) <= 0.05 * actual.cached_minimum_bytes


def test_memory_as_a_share_of_the_models_bytes_in_the_store(calibrated_stores):
    import os

    from flashllm.runtime.core.engine_config import parse_memory

    store = calibrated_stores("llama")
    weights = [os.path.join(store, name) for name in ("resident.safetensors", "ffn.bin")]
    assert os.path.exists(os.path.join(store, "sparsity.safetensors"))  # the predictors are not part of the share
    assert parse_memory("60%", store) == int(sum(os.path.getsize(path) for path in weights) * 0.6)
    assert parse_memory("2MiB", store) == 2 << 20
    with pytest.raises(ValueError, match="above 0"):
        parse_memory("0%", store)


def test_naive_holds_the_layers_its_budget_has_room_for_and_reads_only_the_others(tiny_stores):
    from flashllm import SamplingParams
    from flashllm.runtime.core.engine import Engine
    from flashllm.workers.memory_plan import naive_minimum_bytes, resident_bytes_of
    from flashllm.workers.store_reader import open_store

    store = tiny_stores("llama")
    manifest = open_store(store)
    minimum = naive_minimum_bytes(manifest, resident_bytes_of(store, manifest, 4, "cpu"), 4, "cpu")
    layer_bytes = manifest.ffn.layers[0].length_bytes  # a float32 store's layer is held as read
    params = SamplingParams(max_tokens=6, temperature=0)
    runs = {}
    for name, budget in (("streamed", minimum), ("one held", minimum + layer_bytes + layer_bytes // 2)):
        with Engine(store, mode="naive", runtime="inproc", ffn_options={"memory_budget_bytes": budget}) as engine:
            held = [rows for rows in engine.memory_plan.capacity_rows if rows]
            result = engine.generate([[1, 5, 9, 13]], params)[0]
            runs[name] = (len(held), result.tokens, engine.executor.ffn.reader.stats.read_bytes)
    with Engine(store, mode="dense", runtime="inproc") as engine:
        dense_tokens = engine.generate([[1, 5, 9, 13]], params)[0].tokens
    assert runs["streamed"][0] == 0 and runs["one held"][0] == 1
    assert runs["streamed"][1] == runs["one held"][1] == dense_tokens
    assert runs["one held"][2] < runs["streamed"][2]  # the held layer is read once, at load, not every step
