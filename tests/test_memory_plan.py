"""One function sizes memory: its parts add up, and the engine's refusal, --mode auto and the executor's device
check all read it."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.mode_choice import AUTO_MODE_ORDER
from flashllm.workers.engine_config import EngineConfig
from flashllm.workers.executor import device_bytes_needed
from flashllm.workers.memory_plan import MemoryInputs, MemoryPlanError, plan_memory_for
from flashllm.workers.store_reader import open_store

MIB = 2**20
SLOTS, CONTEXT = 2, 128


def engine_config(mode: str, budget_bytes: int | None) -> EngineConfig:
    return EngineConfig(mode=mode, runtime="inproc", memory_budget_bytes=budget_bytes, max_batch=SLOTS,
                        max_context=CONTEXT, device="cpu")


def planned(store: str, mode: str, budget_bytes: int | None):
    manifest = open_store(store)
    return plan_memory_for(store, manifest, MemoryInputs.from_config(manifest, engine_config(mode, budget_bytes)))


@pytest.mark.parametrize("mode", ["dense", "naive", "sparse"])
def test_the_plans_parts_add_up_to_its_total(calibrated_stores, mode):
    store = calibrated_stores("llama")
    manifest, arch = open_store(store), open_store(store).arch
    plan = planned(store, mode, 1 << 40)
    assert plan.total_bytes == plan.resident_bytes + plan.predictor_bytes + plan.staging_bytes + plan.cache_bytes
    assert plan.minimum_bytes <= plan.total_bytes <= plan.budget_bytes
    # a float32 store on the CPU: resident weights held as stored, float32 keys and values
    stored = load_file(f"{store}/resident.safetensors")
    stored_resident_bytes = sum(tensor.numel() * tensor.element_size() for tensor in stored.values())
    assert plan.resident_bytes == plan.device_bytes["resident weights"] == stored_resident_bytes
    kv_bytes = 2 * arch.num_hidden_layers * SLOTS * arch.num_key_value_heads * CONTEXT * arch.head_dim * 4
    assert plan.kv_cache_bytes == plan.device_bytes["KV cache"] == kv_bytes
    assert (plan.predictor_bytes > 0) == (mode == "sparse")
    if mode != "naive":  # a roomy budget holds every neuron, as stored
        assert plan.cache_bytes == manifest.ffn.total_bundle_bytes
        assert plan.capacity_rows == [region.num_neurons for region in manifest.ffn.layers]


def test_the_engine_refuses_picks_and_sizes_by_the_plan(calibrated_stores):
    store = calibrated_stores("llama")
    sparse_minimum = planned(store, "sparse", None).minimum_bytes
    # one byte below the minimum: the engine's refusal is the plan's, and names the minimum
    with pytest.raises(MemoryPlanError) as plan_refusal:
        planned(store, "sparse", sparse_minimum - 1)
    with pytest.raises(MemoryPlanError) as engine_refusal:
        Engine(store, config=engine_config("sparse", sparse_minimum - 1))
    assert str(engine_refusal.value) == str(plan_refusal.value)
    assert f"the minimum for this store and settings is {sparse_minimum / MIB:.1f} MiB" in str(engine_refusal.value)
    # twenty rows above the minimum: the engine runs the plan's caches
    budget = planned(store, "sparse", None).budget_for_spare_rows(20)
    plan = planned(store, "sparse", budget)
    assert sum(plan.capacity_rows) == sum(plan.min_capacity_rows) + 20
    with Engine(store, config=engine_config("sparse", budget)) as engine:
        assert engine.memory_plan == plan
        assert engine.config.sparse.capacity_rows == tuple(plan.capacity_rows)
        assert [cache.capacity_rows for cache in engine.executor.ffn.prefetcher.caches] == plan.capacity_rows
    # the executor's device check counts the plan's device bytes for the same caches
    assert device_bytes_needed(store, open_store(store), "sparse", SLOTS, CONTEXT, torch.float32, torch.float32,
                               capacity_rows=plan.capacity_rows, device="cpu") == plan.device_bytes
    # --mode auto: dense, sparse with every layer's cache, naive, sparse with uncached layers, the first whose
    # plan fits, at budgets where each candidate starts or stops fitting; when none does, sparse's refusal
    minimums = {mode: planned(store, mode, None).minimum_bytes for mode in AUTO_MODE_ORDER}
    minimums["sparse, every layer cached"] = planned(store, "sparse", None).cached_minimum_bytes
    outcomes = set()
    for budget in sorted({size + delta for size in minimums.values() for delta in (-1, 0)}):
        fitting = [mode for mode in AUTO_MODE_ORDER if _fits(store, mode, budget)]
        if "sparse" in fitting and "naive" in fitting and planned(store, "sparse", budget).uncached_layers:
            fitting.remove("sparse")  # naive holds whole layers with the bytes sparse would leave uncached
        if fitting:
            with Engine(store, config=engine_config("auto", budget)) as engine:
                assert engine.mode == fitting[0], budget
                assert engine.memory_plan == planned(store, fitting[0], budget)
        else:
            with pytest.raises(MemoryPlanError) as plan_refusal:
                planned(store, "sparse", budget)
            with pytest.raises(MemoryPlanError) as auto_refusal:
                Engine(store, config=engine_config("auto", budget))
            assert str(auto_refusal.value) == str(plan_refusal.value)
        outcomes.add(fitting[0] if fitting else "refused")
    assert {"dense", "refused"} <= outcomes  # a tiny model's dense need is below the others' minimums


def _fits(store: str, mode: str, budget_bytes: int) -> bool:
    try:
        planned(store, mode, budget_bytes)
    except MemoryPlanError:
        return False
    return True


def test_below_the_model_a_q8_0_head_is_planned_at_4_bits_and_its_bytes_hold_ffn_layers(demo_default_store):
    """--head-precision auto: the demo's q8_0 head is held as stored where the whole model fits, else as a 4-bit
    sketch, whose saving the plan counts and naive spends on whole layers; a plan that cannot fit with the
    head as stored names the knob."""
    from dataclasses import replace

    from flashllm.runtime.core.mode_choice import budget_from_percent, resolve_head_precision
    from flashllm.workers.memory_plan import head_sketch_applies
    from flashllm.workers.models.quant_linear import SKETCH_KIND, held_matrix_bytes

    store, _ = demo_default_store
    manifest = open_store(store)

    def plan(mode: str, budget_bytes: int | None, head_precision: str):
        config = replace(engine_config(mode, budget_bytes), head_precision=head_precision)
        return plan_memory_for(store, manifest, MemoryInputs.from_config(manifest, config))

    head_shape = (manifest.arch.vocab_size, manifest.arch.hidden_size)
    saving = held_matrix_bytes("q8_0", head_shape) - held_matrix_bytes(SKETCH_KIND, head_shape)
    dense_as_stored = plan("dense", None, "stored")
    assert dense_as_stored.resident_bytes - plan("dense", None, "4bit").resident_bytes == saving > 9 * MIB

    def fits_as_stored(budget_bytes: int):
        return lambda: dense_as_stored.total_bytes <= budget_bytes

    assert head_sketch_applies(manifest, "cpu") and not head_sketch_applies(manifest, "cuda")
    for budget, expected in ((None, "stored"), (dense_as_stored.total_bytes, "stored"),
                             (dense_as_stored.total_bytes - 1, "4bit")):
        assert resolve_head_precision("auto", budget, True, fits_as_stored(budget or 0)) == expected
    assert resolve_head_precision("auto", 1, False, fits_as_stored(1)) == "stored"  # nothing to sketch
    assert resolve_head_precision("4bit", 1, False, fits_as_stored(1)) == "stored"
    assert resolve_head_precision("stored", 1, True, fits_as_stored(1)) == "stored"  # as asked
    # at 60% of the weights naive holds the layers the head's bytes pay for
    budget = budget_from_percent("60%", store)
    held = {head: sum(1 for rows in plan("naive", budget, head).capacity_rows if rows) for head in ("stored", "4bit")}
    layer_bytes = dense_as_stored.cache_bytes // len(manifest.ffn.layers)
    assert held["4bit"] - held["stored"] >= saving // layer_bytes - 1 > 4, held
    naive_minimum = plan("naive", None, "stored").minimum_bytes
    with pytest.raises(MemoryPlanError, match=r"--head-precision 4bit \(or auto\): saves 11\.\d MiB"):
        plan("naive", naive_minimum - 1, "stored")
