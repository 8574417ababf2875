"""The memory plan: what a `--memory` budget holds, decided before anything is loaded.

The budget bounds the bytes the engine keeps in DRAM, counted as held: resident
weights (float ones in the compute dtype or --resident-dtype; a quantized
store's in its integer kernels' layouts), predictors, the per-layer neuron
caches (a quantized store's: its bundles' bytes, plus the compute side's
kernel-layout copy of the same slots on a CPU) and the reader's staging
buffers. The KV cache is
reported beside it (it grows with batch and context, not with the model's
FFN). Each layer's cache must hold its pinned hot neurons plus one token's
predicted set (top-k); whatever the budget leaves above that minimum widens
every layer's cache equally, which is what the sliding window reuses.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from flashllm.protocol import quant_format as qf
from flashllm.protocol.shm import CHUNK_SLOTS
from flashllm.protocol.store_format import DTYPE_ITEMSIZE, FfnLayout, Manifest
from flashllm.workers.activation_trace import TraceSpec
from flashllm.workers.ffn_providers import NAIVE_LAYERS_IN_FLIGHT
from flashllm.workers.models.ffn import HALF_ROWS_CHUNK
from flashllm.workers.models.resident import HALF_STORE_DTYPES
from flashllm.workers.flash_io.bundle_reader import largest_chunk_rows, largest_span_bytes, neuron_read_staging_bytes
from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

MIB = 2**20


class MemoryPlanError(ValueError):
    """The budget cannot hold the minimum; the message names it."""


@dataclass
class MemoryPlan:
    budget_bytes: int
    resident_bytes: int
    predictor_bytes: int
    staging_bytes: int
    cache_bytes: int
    kv_cache_bytes: int
    capacity_rows: list[int] = field(default_factory=list)
    min_capacity_rows: list[int] = field(default_factory=list)
    ffn_bytes: int = 0
    total_neurons: int = 0

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.predictor_bytes + self.staging_bytes + self.cache_bytes

    def describe(self) -> str:
        rows = [("resident weights (embeddings, attention, norms, head)", self.resident_bytes),
                ("sparsity predictors", self.predictor_bytes),
                ("read staging (neuron reads, dense-read chunks)", self.staging_bytes),
                (f"neuron caches ({min(self.capacity_rows)}..{max(self.capacity_rows)} rows/layer)", self.cache_bytes)]
        lines = [f"memory plan for a budget of {self.budget_bytes / MIB:.1f} MiB:"]
        lines += [f"  {name:<58} {size / MIB:9.1f} MiB" for name, size in rows]
        lines.append(f"  {'total':<58} {self.total_bytes / MIB:9.1f} MiB")
        lines.append(f"  {'KV cache (beside the budget)':<58} {self.kv_cache_bytes / MIB:9.1f} MiB")
        lines.append(f"  FFN on flash: {self.ffn_bytes / MIB:.1f} MiB; the caches hold "
                     f"{100 * sum(self.capacity_rows) / max(1, self.total_neurons):.0f}% of its neurons")
        return "\n".join(lines)


def held_rows_bytes(layout: FfnLayout, rows: int, compute_itemsize: int, device: str, whole_layer: bool = False
                    ) -> int:
    """Bytes of `rows` bundles once turned into what compute multiplies (ffn_providers.held_rows);
    whole_layer: the rows are a whole layer in neuron order (dense, naive)."""
    if layout.is_quantized and device == "cpu":
        return QuantNeuronMatrix.bytes_for(layout, rows, whole_layer)
    if device == "cpu" and layout.dtype in HALF_STORE_DTYPES:  # held half (HalfRows)
        return rows * layout.bundle_elements * min(compute_itemsize, HALF_ITEMSIZE)
    return rows * layout.bundle_elements * compute_itemsize


def cache_bytes_of(layout: FfnLayout, capacity_rows: list[int], cache_itemsize: int, device: str) -> int:
    """Bytes the neuron caches of these capacities hold: the prefetcher's rows (a quantized store's bytes as
    stored, else cache_itemsize per element) and, for a quantized store on a CPU, the compute side's copy of
    the same slots in the kernels' layouts (CacheView)."""
    if not layout.is_quantized:
        return sum(capacity_rows) * layout.bundle_elements * cache_itemsize
    raw = sum(capacity_rows) * layout.bundle_bytes + down_scale_tables_bytes(layout)
    return raw + (sum(QuantNeuronMatrix.bytes_for(layout, c) for c in capacity_rows) if device == "cpu" else 0)


def down_scale_tables_bytes(layout: FfnLayout) -> int:
    """A quantized store's resident down scale tables (d, n_ff/32, c) float16, one per layer, as the FFN holds them."""
    if layout.down_group_scales is None:
        return 0
    kind, d = layout.part_kinds()["down"], dict((name, n) for name, n, _ in layout.bundle_parts)["down"]
    return sum(math.prod(qf.down_scale_table_shape(kind, d, region.num_neurons)) * 2 for region in layout.layers)


def sparse_staging_bytes(layout: FfnLayout, compute_itemsize: int, device: str = "cpu") -> int:
    """What the sparse mode's reads stage beside the caches: a read of neurons a round of requests (at most a
    layer), and the dense-read path (prefill), which goes through a layer in chunks: the worker runtime's
    prefetcher fills CHUNK_SLOTS shared-memory chunk slots that compute multiplies, the in-process engine one
    chunk as read; both one chunk converted to the compute dtype where it differs. One plan serves both
    runtimes (in process, a chunk of it stays free), so the same budget gives the same caches, and so the
    same tokens, whichever runtime runs."""
    largest_chunk_bytes = largest_chunk_rows(layout) * layout.bundle_bytes
    same_dtype = not layout.is_quantized and compute_itemsize == DTYPE_ITEMSIZE[layout.dtype]
    converted_chunk_bytes = 0 if same_dtype else held_rows_bytes(layout, largest_chunk_rows(layout),
                                                                 compute_itemsize, device)
    # a half-precision cache is widened HALF_ROWS_CHUNK rows at a time as the CPU multiplies it
    widened_cache_bytes = HALF_ROWS_CHUNK * layout.bundle_elements * compute_itemsize \
        if device == "cpu" and not layout.is_quantized and not same_dtype else 0
    return neuron_read_staging_bytes(layout) + CHUNK_SLOTS * largest_chunk_bytes + converted_chunk_bytes + \
        widened_cache_bytes


def plan_memory(manifest: Manifest, resident_bytes: int, budget_bytes: int, compute_itemsize: int, keep_neurons: int,
                hot_counts: list[int], predictor_bytes: int, kv_cache_bytes: int,
                cache_itemsize: int | None = None, device: str = "cpu",
                resident_half_saving_bytes: int = 0) -> MemoryPlan:
    """resident_half_saving_bytes: what holding the float resident matrices in float16 would save (for the
    too-small message; 0 when they are half precision or quantized already)."""
    layout = manifest.ffn
    cache_itemsize = cache_itemsize or compute_itemsize
    # bytes one more row costs; a quantized CPU cache's kernel copy rounds each layer up to whole int4 tiles,
    # which `slack` (per layer) reserves, so the exact figure below never passes the budget
    row_bytes = cache_bytes_of(layout, [128], cache_itemsize, device) - cache_bytes_of(layout, [64], cache_itemsize,
                                                                                        device)
    row_bytes //= 64
    tables_bytes = down_scale_tables_bytes(layout)  # once, not per layer
    slack = cache_bytes_of(layout, [1], cache_itemsize, device) - tables_bytes if layout.is_quantized else 0
    staging_bytes = sparse_staging_bytes(layout, compute_itemsize, device)
    num_neurons = [region.num_neurons for region in layout.layers]
    # one predictor's top-k plus the pinned rows; a token whose lookahead ∪ same-layer union does not
    # fit takes the dense-read path (correct, slower), so the union need not be reserved
    min_rows = [min(n, hot + keep_neurons) for n, hot in zip(num_neurons, hot_counts)]
    fixed = resident_bytes + predictor_bytes + staging_bytes + slack * len(num_neurons) + tables_bytes
    min_total = fixed + sum(min_rows) * row_bytes
    if budget_bytes < min_total:
        knobs = sparse_minimum_knobs(
            manifest, budget_bytes, min_total, resident_half_saving_bytes, row_bytes, hot_counts, keep_neurons, predictor_bytes, kv_cache_bytes, naive_minimum_bytes(
                manifest, resident_bytes, compute_itemsize, device))
        raise MemoryPlanError(
            f"--memory {budget_bytes / MIB:.1f} MiB is too small: the minimum for this store and settings is "
            f"{min_total / MIB:.1f} MiB (resident {resident_bytes / MIB:.1f} + predictors {predictor_bytes / MIB:.1f} "
            f"+ staging {staging_bytes / MIB:.1f} + smallest neuron caches "
            f"{(sum(min_rows) * row_bytes + slack * len(num_neurons)) / MIB:.1f} MiB); "
            "raise --memory, or lower the minimum:\n" + "\n".join(f"  {knob}" for knob in knobs)
        )
    spare_rows = (budget_bytes - min_total) // row_bytes
    capacity = list(min_rows)
    # widen every layer equally (water-filling: layers already at n_ff drop out)
    while spare_rows > 0:
        open_layers = [i for i in range(len(capacity)) if capacity[i] < num_neurons[i]]
        if not open_layers:
            break
        share = max(1, spare_rows // len(open_layers))
        for i in open_layers:
            grow = min(share, num_neurons[i] - capacity[i], spare_rows)
            capacity[i] += grow
            spare_rows -= grow
            if spare_rows <= 0:
                break
    plan = MemoryPlan(budget_bytes=budget_bytes, resident_bytes=resident_bytes, predictor_bytes=predictor_bytes,
                      staging_bytes=staging_bytes, cache_bytes=cache_bytes_of(layout, capacity, cache_itemsize, device),
                      kv_cache_bytes=kv_cache_bytes, capacity_rows=capacity, min_capacity_rows=min_rows,
                      ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(num_neurons))
    return plan


HALF_ITEMSIZE = 2  # float16/bfloat16
SMALL_PREDICTOR_RANK = 64  # the low-rank predictor the too-small message offers in place of a sketch


def naive_staging_bytes(layout: FfnLayout, compute_itemsize: int, device: str) -> int:
    """--mode naive's staging: its pipeline holds two layers as read and two as held for the product
    (ffn_providers.NaiveFlashFfn)."""
    largest = max(r.num_neurons for r in layout.layers)
    held = held_rows_bytes(layout, largest, compute_itemsize, device, whole_layer=True)
    return NAIVE_LAYERS_IN_FLIGHT * (largest_span_bytes(layout) + held)


def naive_held_rows(layout: FfnLayout, spare_bytes: int, compute_itemsize: int, device: str) -> list[int]:
    """Rows per layer --mode naive holds with spare_bytes beside its minimum: as many whole layers as fit,
    spread evenly over the depth (a held layer between streamed ones gives the reader time), 0 for the rest."""
    num_layers = len(layout.layers)
    per_layer = max(held_rows_bytes(layout, region.num_neurons, compute_itemsize, device, whole_layer=True)
                    for region in layout.layers)
    held_count = max(0, min(num_layers, spare_bytes // per_layer))
    held = {int(i * num_layers / held_count) for i in range(held_count)} if held_count else set()
    return [region.num_neurons if layer in held else 0 for layer, region in enumerate(layout.layers)]


def naive_minimum_bytes(manifest: Manifest, resident_bytes: int, compute_itemsize: int, device: str) -> int:
    """--mode naive holds the resident weights, ffn_down's scale tables and one layer at a time."""
    return resident_bytes + down_scale_tables_bytes(manifest.ffn) + naive_staging_bytes(manifest.ffn, compute_itemsize,
                                                                                      device)


def sparse_minimum_knobs(manifest: Manifest, budget_bytes: int, min_total: int, resident_half_saving_bytes: int,
                         row_bytes: int, hot_counts: list[int], keep_neurons: int,
                         predictor_bytes: int, kv_cache_bytes: int, naive_bytes: int) -> list[str]:
    """Every setting that lowers --mode sparse's minimum, each with what it saves (for MemoryPlanError's message).

    The arithmetic is the plan's own: rows of row_bytes per kept neuron and layer, resident elements times their
    itemsize, the predictors' held bytes."""
    arch = manifest.arch
    shortfall = min_total - budget_bytes
    num_neurons = [region.num_neurons for region in manifest.ffn.layers]
    knobs = []
    # --keep-fraction: one neuron fewer per token saves a row in every layer not already whole
    open_layers = sum(1 for n, hot in zip(num_neurons, hot_counts) if hot + keep_neurons <= n)
    if keep_neurons > 1 and open_layers:
        fewer = min(keep_neurons - 1, -(-shortfall // (row_bytes * open_layers)))
        fitting = (keep_neurons - fewer) / arch.intermediate_size
        saved = fewer * row_bytes * open_layers
        now = keep_neurons / arch.intermediate_size
        if saved >= shortfall:
            knobs.append(f"--keep-fraction {fitting:.3f} (now {now:.3f}): saves {saved / MIB:.1f} MiB, enough "
                         "(fewer neurons per token, some quality)")
        else:
            knobs.append(f"--keep-fraction down to {fitting:.3f} (now {now:.3f}): saves at most {saved / MIB:.1f} MiB, "
                         "not enough alone (fewer neurons per token, some quality)")
    if resident_half_saving_bytes > 0:
        knobs.append(f"--resident-dtype float16 (or bfloat16): saves {resident_half_saving_bytes / MIB:.1f} MiB")
    sparsity = manifest.sparsity
    if sparsity is not None and predictor_bytes:
        gated = len(manifest.ffn.bundle_parts) > 2
        outputs = (2 if gated else 1) * arch.intermediate_size
        # a low-rank pair per layer: two (r, d) input maps and one shared (outputs, r) matrix, float16
        small = arch.num_hidden_layers * SMALL_PREDICTOR_RANK * (2 * arch.hidden_size + outputs) * HALF_ITEMSIZE
        if sparsity.predictor != "sketch" and sparsity.rank:
            small = predictor_bytes // 2
            what = f"`flashllm calibrate --rank {max(1, sparsity.rank // 2)}` (now {sparsity.rank})"
        else:
            what = f"`flashllm calibrate --predictor regression --rank {SMALL_PREDICTOR_RANK}` (now a 4-bit sketch)"
        if small < predictor_bytes:
            knobs.append(f"a smaller predictor, {what}: saves about {(predictor_bytes - small) / MIB:.1f} MiB "
                         "(less precise predictions)")
    if naive_bytes < min_total:
        knobs.append(f"--mode naive (every layer read whole for each token, slower): needs {naive_bytes / MIB:.1f} MiB, "
                     f"{(min_total - naive_bytes) / MIB:.1f} MiB less")
    knobs.append(f"beside the budget, the KV cache takes {kv_cache_bytes / MIB:.1f} MiB: --max-context and "
                 "--max-batch lower it in proportion")
    return knobs


def flash_mode_knobs(store_dir: str, manifest: Manifest, mode: str, plan: MemoryPlan, resident_half_saving_bytes: int,
                     kv_cache_bytes: int, compute_itemsize: int, device: str) -> list[str]:
    """What lowers --mode dense's or naive's need, each with what it saves (for MemoryPlanError's message)."""
    knobs = []
    if resident_half_saving_bytes > 0:
        knobs.append(f"--resident-dtype float16 (or bfloat16): saves {resident_half_saving_bytes / MIB:.1f} MiB")
    if mode == "dense":
        naive = naive_minimum_bytes(manifest, plan.resident_bytes, compute_itemsize, device)
        knobs.append(f"--mode naive (the FFN read from flash for each token): needs {naive / MIB:.1f} MiB")
    calibrated = ("" if manifest.sparsity is not None
                  else f" after `flashllm calibrate --store {store_dir} --text FILE` (or --generate-tokens 4000)")
    knobs.append(f"--mode sparse{calibrated} (only predicted neurons held and read): its minimum is printed when "
                 "--memory is below it")
    knobs.append(f"beside the budget, the KV cache takes {kv_cache_bytes / MIB:.1f} MiB: --max-context and "
                 "--max-batch lower it in proportion")
    return knobs


def resident_bytes_of(store_dir: str, manifest: Manifest, resident_itemsize: int, device: str) -> int:
    """Bytes the resident weights take as held, from the safetensors header alone (nothing loaded)."""
    from safetensors import safe_open

    from flashllm.workers.models.resident import resident_held_bytes

    with safe_open(os.path.join(store_dir, manifest.resident_file), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for layer in range(len(manifest.ffn.layers) if manifest.ffn.down_group_scales else 0):
        shapes.pop(manifest.ffn.down_group_scales_name(layer))  # the FFN's, counted with it (down_scale_tables_bytes)
    return resident_held_bytes(shapes, manifest.resident_quantized, resident_itemsize,
                               manifest.arch.num_hidden_layers, device, manifest.arch.tie_word_embeddings)


def plan_for_store(store_dir: str, manifest: Manifest, budget_bytes: int, mode: str, compute_itemsize: int,
                   kv_cache_bytes: int, keep_fraction: float | None = None,
                   resident_itemsize: int | None = None, cache_itemsize: int | None = None,
                   device: str = "cpu", trace: TraceSpec | None = None) -> MemoryPlan:
    """The plan for running `mode` on this store under budget_bytes (raises MemoryPlanError when it cannot fit).
    cache_itemsize: bytes per element of a float store's neuron cache rows (default: compute_itemsize).
    trace: sparse sets replayed from a trace (--trace): its predictor's bytes and largest set, no hot neurons."""
    device = torch_device_type(device)
    resident_bytes = resident_bytes_of(store_dir, manifest, resident_itemsize or compute_itemsize, device)
    resident_half_saving_bytes = max(0, resident_bytes - resident_bytes_of(store_dir, manifest, HALF_ITEMSIZE, device))
    layout = manifest.ffn
    if mode != "sparse":
        # dense holds every bundle; naive streams layers through its staging and holds the whole layers the
        # budget has room for beside it
        ffn_rows = [region.num_neurons for region in layout.layers] if mode == "dense" else [0] * len(layout.layers)
        if mode == "naive":
            ffn_rows = naive_held_rows(layout, budget_bytes - naive_minimum_bytes(
                manifest, resident_bytes, compute_itemsize, device), compute_itemsize, device)
        plan = MemoryPlan(budget_bytes=budget_bytes, resident_bytes=resident_bytes, predictor_bytes=0,
                          staging_bytes=0 if mode == "dense" else naive_staging_bytes(layout, compute_itemsize, device),
                          cache_bytes=sum(held_rows_bytes(layout, rows, compute_itemsize, device, whole_layer=True)
                                          for rows in ffn_rows if rows) + down_scale_tables_bytes(layout),
                          kv_cache_bytes=kv_cache_bytes, capacity_rows=ffn_rows, min_capacity_rows=ffn_rows,
                          ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(r.num_neurons for r in layout.layers))
        if plan.total_bytes > budget_bytes:
            raise MemoryPlanError(f"--memory {budget_bytes / MIB:.1f} MiB is too small for --mode {mode}: it needs "
                                  f"{plan.total_bytes / MIB:.1f} MiB; raise --memory, or lower the minimum:\n"
                                  + "\n".join(f"  {knob}" for knob in flash_mode_knobs(
                                      store_dir, manifest, mode, plan, resident_half_saving_bytes, kv_cache_bytes, compute_itemsize, device)))
        return plan
    if trace is not None:
        from flashllm.workers.activation_trace import ActivationTrace
        from flashllm.workers.trace_predictor import trace_predictor_held_bytes

        arch = manifest.arch
        keep_neurons = ActivationTrace(trace, arch.num_hidden_layers, arch.intermediate_size, 1).max_active
        return plan_memory(manifest, resident_bytes, budget_bytes, compute_itemsize, keep_neurons,
                           [0] * arch.num_hidden_layers, trace_predictor_held_bytes(manifest), kv_cache_bytes,
                           cache_itemsize=cache_itemsize, device=device,
                           resident_half_saving_bytes=resident_half_saving_bytes)
    from flashllm.workers.predictor import load_sparsity_tensors, predictor_held_bytes

    tensors = load_sparsity_tensors(store_dir, manifest)
    # vectors (biases, the lookahead's input map) are held in the compute dtype
    predictor_bytes = predictor_held_bytes(tensors, manifest.sparsity.predictor, manifest.arch.num_hidden_layers,
                                           compute_itemsize)
    hot_counts = [int(tensors[f"layers.{layer}.hot_ids"].numel()) if f"layers.{layer}.hot_ids" in tensors else 0
                  for layer in range(manifest.arch.num_hidden_layers)]
    if keep_fraction is None:
        keep_fraction = 1.0 - manifest.sparsity.target_sparsity
    keep_neurons = max(1, int(round(keep_fraction * manifest.arch.intermediate_size)))
    return plan_memory(manifest, resident_bytes, budget_bytes, compute_itemsize, keep_neurons, hot_counts,
                       predictor_bytes, kv_cache_bytes, cache_itemsize=cache_itemsize, device=device,
                       resident_half_saving_bytes=resident_half_saving_bytes)


def torch_device_type(device: str) -> str:
    """'cuda:1' → 'cuda'; what decides how rows are held."""
    return device.split(":")[0]
