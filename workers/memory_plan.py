"""The memory plan: what a `--memory` budget holds, decided before anything is loaded.

`plan_memory_for` is the one place that sizes memory: every part (resident weights, predictors, staging,
neuron caches or naive's held layers, KV cache, and what an executor puts on its device) for a store, a
mode, a budget and a device. The engine's refusal and `--mode auto`, the executor's device check,
calibrate's dense-or-naive choice and the memory benchmarks read its result; `MemoryInputs.from_config`
is the one place the itemsizes and the KV cache follow from an engine's config.

The budget bounds the bytes the engine keeps in DRAM, counted as held: resident
weights (float ones in the compute dtype or --resident-dtype; a quantized
store's in its integer kernels' layouts), predictors, the per-layer neuron
caches (a quantized store's: its bundles' bytes, plus the compute side's
kernel-layout copy of the same slots on a CPU) and the reader's staging
buffers. The KV cache is
reported beside it (it grows with batch and context, not with the model's
FFN). A layer's cache, when it has one, holds its pinned hot neurons plus one
token's predicted set (top-k); a budget too small for every layer's leaves some
layers without (they read their tokens' sets each step), and whatever is left
above every layer's smallest widens every cache equally, which is what the
sliding window reuses.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from flashllm.protocol import quant_format as qf
from flashllm.protocol.shm import CHUNK_SLOTS
from flashllm.protocol.store_format import DTYPE_ITEMSIZE, FfnLayout, Manifest
from flashllm.workers.activation_trace import TraceSpec
from flashllm.workers.engine_config import DEFAULT_MAX_CONTEXT, FFN_MODES, EngineConfig
from flashllm.workers.ffn_providers import NAIVE_LAYERS_IN_FLIGHT, naive_converted_layers, naive_multiplies_bundles
from flashllm.workers.models.attention import KVCache
from flashllm.workers.models.ffn import HALF_ROWS_CHUNK
from flashllm.workers.models.resident import HALF_STORE_DTYPES, resident_dtype_of
from flashllm.workers.flash_io.bundle_reader import largest_chunk_rows, largest_span_bytes, neuron_read_staging_bytes
from flashllm.workers.flash_io.kernel_rows import holds_kernel_rows, kernel_rows_bytes, kernel_slots
from flashllm.workers.models.quant_ffn import QuantNeuronMatrix
from flashllm.workers.sparse_policy import keep_neurons_of

MIB = 2**20


class MemoryPlanError(ValueError):
    """The budget cannot hold the minimum; the message names it."""


BENCH_RECORD_FIELDS = ("budget_bytes", "resident_bytes", "predictor_bytes", "staging_bytes", "cache_bytes",
                       "kv_cache_bytes", "capacity_rows", "min_capacity_rows", "ffn_bytes", "total_neurons")


@dataclass
class MemoryPlan:
    budget_bytes: int | None  # None: no --memory, nothing bounds memory
    resident_bytes: int
    predictor_bytes: int
    staging_bytes: int
    cache_bytes: int
    kv_cache_bytes: int
    capacity_rows: list[int] = field(default_factory=list)
    min_capacity_rows: list[int] = field(default_factory=list)
    ffn_bytes: int = 0
    total_neurons: int = 0
    minimum_bytes: int = 0  # the smallest budget this mode runs in on this store and settings
    cached_minimum_bytes: int = 0  # sparse: the smallest budget that gives every layer its cache (below: uncached)
    row_bytes: int = 0  # sparse: what each neuron-cache row above the minimum costs (0 for dense, naive)
    device_bytes: dict[str, int] = field(default_factory=dict)  # what an executor allocates on its device

    @property
    def total_bytes(self) -> int:
        """What the budget holds (the KV cache is beside it)."""
        return self.resident_bytes + self.predictor_bytes + self.staging_bytes + self.cache_bytes

    def as_record(self) -> dict:
        """The plan as `flashllm bench` writes it in its JSON (the fields it has always had)."""
        return {name: getattr(self, name) for name in BENCH_RECORD_FIELDS}

    def budget_for_spare_rows(self, spare_rows: int) -> int:
        """The sparse budget whose neuron caches hold spare_rows rows above their smallest, all layers together."""
        return self.cached_minimum_bytes + spare_rows * self.row_bytes

    @property
    def uncached_layers(self) -> int:
        """Sparse: layers the budget leaves without a neuron cache (each reads its tokens' sets every step)."""
        return sum(1 for rows in self.capacity_rows if rows == 0)

    def describe(self) -> str:
        rows = [("resident weights (embeddings, attention, norms, head)", self.resident_bytes),
                ("sparsity predictors", self.predictor_bytes),
                ("read staging (neuron reads, dense-read chunks)", self.staging_bytes),
                (f"neuron caches ({min(self.capacity_rows)}..{max(self.capacity_rows)} rows/layer)", self.cache_bytes)]
        lines = [f"memory plan for a budget of {self.budget_bytes / MIB:.1f} MiB:" if self.budget_bytes is not None
                 else "memory plan (no --memory: nothing bounds it):"]
        lines += [f"  {name:<58} {size / MIB:9.1f} MiB" for name, size in rows]
        lines.append(f"  {'total':<58} {self.total_bytes / MIB:9.1f} MiB")
        lines.append(f"  {'KV cache (beside the budget)':<58} {self.kv_cache_bytes / MIB:9.1f} MiB")
        lines.append(f"  FFN on flash: {self.ffn_bytes / MIB:.1f} MiB; the caches hold "
                     f"{100 * sum(self.capacity_rows) / max(1, self.total_neurons):.0f}% of its neurons")
        if self.cached_minimum_bytes and self.uncached_layers:
            lines.append(f"  {self.uncached_layers} of {len(self.capacity_rows)} layers have no neuron cache (they "
                         f"read each token's set every step); every layer's cache needs "
                         f"{self.cached_minimum_bytes / MIB:.1f} MiB")
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
    """Bytes the neuron caches of these capacities hold: rows as read (a quantized store's bytes as stored, else
    cache_itemsize per element), or for a quantized store on a CPU the kernels' layouts only (kernel_rows.py),
    plus the one buffer its inserts land in as read (arrival_bytes)."""
    if not layout.is_quantized:
        return sum(capacity_rows) * layout.bundle_elements * cache_itemsize
    if holds_kernel_rows(layout, device):
        return sum(kernel_rows_bytes(layout, c) for c in capacity_rows) + down_scale_tables_bytes(layout) + \
            arrival_bytes(layout, capacity_rows, device)
    return sum(capacity_rows) * layout.bundle_bytes + down_scale_tables_bytes(layout)


def arrival_bytes(layout: FfnLayout, capacity_rows: list[int], device: str) -> int:
    """Caches of kernel rows share one buffer an insert's bundles land in as read: at most a cache's capacity."""
    return max(capacity_rows, default=0) * layout.bundle_bytes if holds_kernel_rows(layout, device) else 0


def _down_table_bytes(layout: FfnLayout, num_neurons: int) -> int:
    """One layer's down scale table as stored, (d, num_neurons/32, c) float16."""
    kind, d = layout.part_kinds()["down"], dict((name, n) for name, n, _ in layout.bundle_parts)["down"]
    return math.prod(qf.down_scale_table_shape(kind, d, num_neurons)) * 2


def down_scale_tables_bytes(layout: FfnLayout) -> int:
    """A quantized store's resident down scale tables (d, n_ff/32, c) float16, one per layer, as the FFN holds them."""
    if layout.down_group_scales is None:
        return 0
    return sum(_down_table_bytes(layout, region.num_neurons) for region in layout.layers)


def whole_layer_tables_bytes(layout: FfnLayout, held_rows: list[int], device: str) -> int:
    """The down scale tables dense or naive keeps beside its whole layers (held_rows: per layer, 0 where it is
    streamed). On a CPU, where a whole layer holds 4-bit down blocks with their own scales
    (QuantNeuronMatrix.holds_own_down_scales), a held layer keeps no table and a streamed one its table in the
    int4 kernel's form, a bfloat16 (scale, zero) per 32 neurons and output, or as stored where a decode step
    multiplies its bundles directly (ffn_providers.NaiveFlashFfn, flash_io/bundle_products); else every layer
    keeps its float16 table."""
    if layout.down_group_scales is None or not (device == "cpu" and QuantNeuronMatrix.holds_own_down_scales(layout)):
        return down_scale_tables_bytes(layout)
    as_stored = naive_multiplies_bundles(layout, device)
    d = dict((name, n) for name, n, _ in layout.bundle_parts)["down"]
    return sum(_down_table_bytes(layout, region.num_neurons) if as_stored
               else region.num_neurons // qf.BLOCK_ELEMENTS * d * 2 * 2  # bfloat16 (scale, zero) pairs
               for region, rows in zip(layout.layers, held_rows) if not rows)


def sparse_staging_bytes(layout: FfnLayout, compute_itemsize: int, device: str = "cpu") -> int:
    """What the sparse mode's reads stage beside the caches: a read of neurons a round of requests (at most a
    layer), and the dense-read path (prefill), which goes through a layer in chunks: the worker runtime's
    prefetcher fills CHUNK_SLOTS shared-memory chunk slots that compute multiplies, the in-process engine one
    chunk as read; both one chunk converted to the compute dtype where it differs (plan_memory adds an uncached
    layer's read-ahead where its plan has one). One plan serves both runtimes (in process, a chunk of it stays
    free), so the same budget gives the same caches, and so the same tokens, whichever runtime runs."""
    largest_chunk_bytes = largest_chunk_rows(layout) * layout.bundle_bytes
    same_dtype = not layout.is_quantized and compute_itemsize == DTYPE_ITEMSIZE[layout.dtype]
    converted_chunk_bytes = 0 if same_dtype else held_rows_bytes(layout, largest_chunk_rows(layout),
                                                                 compute_itemsize, device)
    # a half-precision cache is widened HALF_ROWS_CHUNK rows at a time as the CPU multiplies it
    widened_cache_bytes = HALF_ROWS_CHUNK * layout.bundle_elements * compute_itemsize \
        if device == "cpu" and not layout.is_quantized and not same_dtype else 0
    return neuron_read_staging_bytes(layout) + CHUNK_SLOTS * largest_chunk_bytes + converted_chunk_bytes + \
        widened_cache_bytes


def plan_memory(manifest: Manifest, resident_bytes: int, budget_bytes: int | None, compute_itemsize: int,
                keep_neurons: int, hot_counts: list[int], predictor_bytes: int, kv_cache_bytes: int,
                cache_itemsize: int | None = None, device: str = "cpu",
                resident_savings: "ResidentSavings | None" = None,
                capacity_rows: list[int] | None = None) -> MemoryPlan:
    """--mode sparse's plan. budget_bytes None: nothing bounds memory, the caches are capacity_rows as given
    (every neuron when None). resident_savings: what the resident weights' knobs would save (for the
    too-small message; none by default).

    The smallest budget holds no neuron cache (every layer uncached, sparse_policy); above it, layers get
    their smallest caches (keep_neurons plus the pinned) one by one, spread over the depth
    (cached_layers_that_fit); once all have theirs, what is left widens every cache equally."""
    layout = manifest.ffn
    cache_itemsize = cache_itemsize or compute_itemsize
    def held_bytes(capacity: list[int]) -> int:  # without the arrival buffer, which grows with the largest cache
        return cache_bytes_of(layout, capacity, cache_itemsize, device) - arrival_bytes(layout, capacity, device)

    # bytes one more row costs; a quantized CPU cache's kernel rows round each layer up to whole int4 tiles,
    # which `slack` (per cached layer) reserves, so the exact figure below never passes the budget
    row_bytes = (held_bytes([128]) - held_bytes([64])) // 64
    tables_bytes = down_scale_tables_bytes(layout)  # once, not per layer
    slack = held_bytes([1]) - tables_bytes if layout.is_quantized else 0
    num_neurons = [region.num_neurons for region in layout.layers]
    staging_bytes = sparse_staging_bytes(layout, compute_itemsize, device)
    # an uncached layer's read-ahead (Prefetcher.stage): its next set and the spans around it, up to a chunk;
    # held where the plan leaves a layer uncached
    read_ahead_bytes = min(max(num_neurons), max(keep_neurons, largest_chunk_rows(layout))) * layout.bundle_bytes

    def staging_for(capacity: list[int]) -> int:
        return staging_bytes + (read_ahead_bytes if 0 in capacity else 0)

    def total_bytes(capacity: list[int]) -> int:  # what the plan holds with caches of these capacities
        return resident_bytes + predictor_bytes + staging_for(capacity) + cache_bytes_of(layout, capacity,
                                                                                         cache_itemsize, device)

    # a cached layer holds one predictor's top-k plus the pinned rows; a token whose lookahead ∪ same-layer
    # union does not fit takes the masked path (correct, slower), so the union need not be reserved
    min_rows = [min(n, hot + keep_neurons) for n, hot in zip(num_neurons, hot_counts)]
    base = resident_bytes + predictor_bytes + staging_bytes + tables_bytes
    fixed = base + slack * len(num_neurons)
    cached_min_total = fixed + sum(min_rows) * row_bytes + arrival_bytes(layout, min_rows, device)
    # the smallest budget holds no cache at all: every layer reads its tokens' sets each step (sparse_policy's
    # uncached layers), through the read-ahead staging (a tiny model's smallest caches may take less)
    min_total = min(base + read_ahead_bytes, cached_min_total)
    if budget_bytes is None:
        capacity = list(capacity_rows or num_neurons)
    elif budget_bytes < min_total:
        naive_bytes = naive_minimum_bytes(manifest, resident_bytes, compute_itemsize, device)
        knobs = sparse_minimum_knobs(manifest, min_total, resident_savings or ResidentSavings(), predictor_bytes,
                                     kv_cache_bytes, naive_bytes)
        tables = f" + FFN scale tables {tables_bytes / MIB:.1f}" if tables_bytes else ""
        caches = (f" + every layer's smallest neuron cache {(cached_min_total - base) / MIB:.1f} MiB"
                  if min_total == cached_min_total else
                  f" + read-ahead {read_ahead_bytes / MIB:.1f} MiB, with no neuron cache; every layer's cache at its "
                  f"smallest needs {cached_min_total / MIB:.1f} MiB")
        raise MemoryPlanError(
            f"--memory {budget_bytes / MIB:.1f} MiB is too small: the minimum for this store and settings is "
            f"{min_total / MIB:.1f} MiB (resident {resident_bytes / MIB:.1f} + predictors {predictor_bytes / MIB:.1f} "
            f"+ staging {staging_bytes / MIB:.1f}{tables}{caches}); raise --memory, or lower the minimum:\n"
            + "\n".join(f"  {knob}" for knob in knobs)
        )
    elif budget_bytes < cached_min_total:
        capacity = cached_layers_that_fit(min_rows, budget_bytes, total_bytes)
    else:
        # a spare row also widens the arrival buffer by its share of a bundle; the exact total decides
        per_row = row_bytes + -(-arrival_bytes(layout, [1], device) // len(num_neurons))
        spare_rows = (budget_bytes - cached_min_total) // per_row
        capacity = widen_equally(min_rows, num_neurons, spare_rows)
        while spare_rows > 0 and total_bytes(capacity) > budget_bytes:
            spare_rows -= len(num_neurons)
            capacity = widen_equally(min_rows, num_neurons, max(0, spare_rows))
        if holds_kernel_rows(layout, device):  # kernel rows hold whole int4 tiles: use every slot held
            whole_tiles = [min(n, kernel_slots(c)) for n, c in zip(num_neurons, capacity)]
            capacity = whole_tiles if total_bytes(whole_tiles) <= budget_bytes else capacity
    return MemoryPlan(budget_bytes=budget_bytes, resident_bytes=resident_bytes, predictor_bytes=predictor_bytes,
                      staging_bytes=staging_for(capacity),
                      cache_bytes=cache_bytes_of(layout, capacity, cache_itemsize, device),
                      kv_cache_bytes=kv_cache_bytes, capacity_rows=capacity, min_capacity_rows=min_rows,
                      ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(num_neurons), minimum_bytes=min_total,
                      cached_minimum_bytes=cached_min_total, row_bytes=row_bytes)


def evenly_spread_layers(count: int, num_layers: int) -> set[int]:
    """`count` of num_layers layers, spread evenly over the depth (a held layer between streamed ones gives the
    reader time)."""
    return {int(i * num_layers / count) for i in range(count)} if count else set()


def cached_layers_that_fit(min_rows: list[int], budget_bytes: int, total_bytes: Callable[[list[int]], int]
                           ) -> list[int]:
    """Below every layer's smallest cache: as many layers as fit get theirs (min_rows), spread evenly; the
    rest none (0: uncached, sparse_policy). A cache smaller than one token's set would serve no token."""
    num_layers = len(min_rows)
    for count in range(num_layers, -1, -1):
        cached = evenly_spread_layers(count, num_layers)
        capacity = [rows if layer in cached else 0 for layer, rows in enumerate(min_rows)]
        if total_bytes(capacity) <= budget_bytes:
            return capacity
    return [0] * num_layers


def widen_equally(min_rows: list[int], num_neurons: list[int], spare_rows: int) -> list[int]:
    """Every layer's cache widened equally by spare_rows in all (water-filling: layers already whole drop out)."""
    capacity = list(min_rows)
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
    return capacity


HALF_ITEMSIZE = 2  # float16/bfloat16
SMALL_PREDICTOR_RANK = 64  # the low-rank predictor the too-small message offers in place of a sketch


def naive_staging_bytes(layout: FfnLayout, compute_itemsize: int, device: str) -> int:
    """--mode naive's staging: its pipeline holds two layers as read and one or two converted for the kernels
    (ffn_providers.NaiveFlashFfn, naive_converted_layers)."""
    largest = max(r.num_neurons for r in layout.layers)
    held = held_rows_bytes(layout, largest, compute_itemsize, device, whole_layer=True)
    return NAIVE_LAYERS_IN_FLIGHT * largest_span_bytes(layout) + naive_converted_layers(layout, device) * held


def naive_held_rows(layout: FfnLayout, spare_bytes: int, compute_itemsize: int, device: str) -> list[int]:
    """Rows per layer --mode naive holds with spare_bytes beside its minimum: as many whole layers as fit,
    spread evenly over the depth (a held layer between streamed ones gives the reader time), 0 for the rest.
    The minimum counts every layer's down scale table; a held layer that no longer needs its own gives it back."""
    num_layers = len(layout.layers)
    table_freed = (whole_layer_tables_bytes(layout, [0] * num_layers, device) - whole_layer_tables_bytes(
        layout, [region.num_neurons for region in layout.layers], device)) // num_layers
    per_layer = max(held_rows_bytes(layout, region.num_neurons, compute_itemsize, device, whole_layer=True)
                    for region in layout.layers) - table_freed
    held = evenly_spread_layers(max(0, min(num_layers, spare_bytes // per_layer)), num_layers)
    return [region.num_neurons if layer in held else 0 for layer, region in enumerate(layout.layers)]


def naive_minimum_bytes(manifest: Manifest, resident_bytes: int, compute_itemsize: int, device: str) -> int:
    """--mode naive holds the resident weights, ffn_down's scale tables and one layer at a time."""
    layout = manifest.ffn
    return resident_bytes + whole_layer_tables_bytes(layout, [0] * len(layout.layers), device) + \
        naive_staging_bytes(layout, compute_itemsize, device)


def sparse_minimum_knobs(manifest: Manifest, min_total: int, resident_savings: "ResidentSavings",
                         predictor_bytes: int, kv_cache_bytes: int, naive_bytes: int) -> list[str]:
    """Every setting that lowers --mode sparse's minimum (which holds no neuron cache: resident weights,
    predictors, staging), each with what it saves (for MemoryPlanError's message)."""
    arch = manifest.arch
    knobs = resident_savings.knobs()
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
        knobs.append(f"--mode naive (every layer read whole for each token, no predictors): needs "
                     f"{naive_bytes / MIB:.1f} MiB, {(min_total - naive_bytes) / MIB:.1f} MiB less")
    knobs.append(f"beside the budget, the KV cache takes {kv_cache_bytes / MIB:.1f} MiB: --max-context and "
                 "--max-batch lower it in proportion")
    return knobs


def flash_mode_knobs(store_dir: str, manifest: Manifest, mode: str, plan: MemoryPlan,
                     resident_savings: "ResidentSavings", kv_cache_bytes: int, compute_itemsize: int,
                     device: str) -> list[str]:
    """What lowers --mode dense's or naive's need, each with what it saves (for MemoryPlanError's message)."""
    knobs = resident_savings.knobs()
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


def head_sketch_applies(manifest: Manifest, device: str) -> bool:
    """Whether --head-precision 4bit changes anything: the head (or tied embedding) is q8_0 and held on a CPU
    (a GPU holds it dequantized)."""
    from flashllm.workers.models.resident import EMBEDDING_NAME, HEAD_NAME

    name = EMBEDDING_NAME if manifest.arch.tie_word_embeddings else HEAD_NAME
    info = manifest.resident_quantized.get(name)
    return torch_device_type(device) == "cpu" and info is not None and info.kind == "q8_0"


def resident_bytes_of(store_dir: str, manifest: Manifest, resident_itemsize: int, device: str,
                      head_4bit: bool = False) -> int:
    """Bytes the resident weights take as held, from the safetensors header alone (nothing loaded); head_4bit:
    a q8_0 head held as a 4-bit sketch (--head-precision 4bit)."""
    from safetensors import safe_open

    from flashllm.workers.models.resident import resident_held_bytes

    with safe_open(os.path.join(store_dir, manifest.resident_file), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for layer in range(len(manifest.ffn.layers) if manifest.ffn.down_group_scales else 0):
        shapes.pop(manifest.ffn.down_group_scales_name(layer))  # the FFN's, counted with it (down_scale_tables_bytes)
    return resident_held_bytes(shapes, manifest.resident_quantized, resident_itemsize,
                               manifest.arch.num_hidden_layers, device, manifest.arch.tie_word_embeddings, head_4bit)


@dataclass(frozen=True)
class ResidentSavings:
    """What the resident weights' knobs would save against a plan's settings (for MemoryPlanError's message)."""

    half_dtype_bytes: int = 0  # --resident-dtype float16: the float matrices held at half width
    head_4bit_bytes: int = 0  # --head-precision 4bit: a q8_0 head held as a 4-bit sketch

    @classmethod
    def of(cls, store_dir: str, manifest: Manifest, inputs: "MemoryInputs", resident_bytes: int) -> "ResidentSavings":
        device = torch_device_type(inputs.device)
        itemsize = inputs.resident_itemsize or inputs.compute_itemsize
        return cls(half_dtype_bytes=max(0, resident_bytes - resident_bytes_of(store_dir, manifest, HALF_ITEMSIZE,
                                                                              device, inputs.head_4bit)),
                   head_4bit_bytes=max(0, resident_bytes - resident_bytes_of(store_dir, manifest, itemsize, device,
                                                                             head_4bit=True)))

    def knobs(self) -> list[str]:
        knobs = []
        if self.half_dtype_bytes > 0:
            knobs.append(f"--resident-dtype float16 (or bfloat16): saves {self.half_dtype_bytes / MIB:.1f} MiB")
        if self.head_4bit_bytes > 0:
            knobs.append(f"--head-precision 4bit (or auto): saves {self.head_4bit_bytes / MIB:.1f} MiB (the head "
                         "as a 4-bit sketch, its top 32 logits still exact)")
        return knobs


@dataclass(frozen=True)
class MemoryInputs:
    """What sizes memory for one mode, as counts and itemsizes; `from_config` derives them from an engine's
    config (the one place its device, dtypes, batch and context become bytes)."""

    mode: str  # dense, naive, sparse
    budget_bytes: int | None  # --memory; None: nothing bounds memory (the caches are as given)
    compute_itemsize: int
    kv_cache_bytes: int = 0  # reported beside the budget and counted on the device
    device: str = "cpu"  # where compute runs: decides how rows are held
    resident_itemsize: int | None = None  # float resident matrices; None: compute_itemsize
    cache_itemsize: int | None = None  # a float store's neuron-cache rows; None: compute_itemsize
    keep_fraction: float | None = None  # sparse: neurons kept per token; None: the calibration's
    capacity_rows: tuple[int, ...] | None = None  # sparse without a budget: rows per layer (None: every neuron)
    naive_held_rows: tuple[int, ...] | None = None  # naive without a budget: rows held per layer (None: none)
    trace: TraceSpec | None = None  # sparse: sets replayed from a trace (its predictor's bytes, no hot neurons)
    head_4bit: bool = False  # a q8_0 head held as a 4-bit sketch (EngineConfig.head_precision "4bit")

    @classmethod
    def from_config(cls, manifest: Manifest, config: EngineConfig, mode: str | None = None) -> "MemoryInputs":
        """mode: the one to plan (default config.mode; --mode auto plans each candidate)."""
        from flashllm.workers.executor import compute_dtype, default_device
        from flashllm.workers.prefetch import neuron_cache_dtype

        device = torch_device_type(config.device or default_device())
        dtype = compute_dtype(device)
        # on a GPU the caches hold rows as stored (a float32 store's take twice the compute dtype's bytes)
        cache_itemsize = neuron_cache_dtype(manifest.ffn.dtype, device).itemsize
        resident_itemsize = resident_dtype_of(config.resident_dtype, dtype, manifest.ffn.dtype).itemsize
        sparse = config.sparse_options
        return cls(mode=mode or config.mode, budget_bytes=config.memory_budget_bytes, compute_itemsize=dtype.itemsize,
                   kv_cache_bytes=kv_cache_bytes_of(manifest, config.max_batch,
                                                    max_context_of(manifest, config.max_context), dtype.itemsize),
                   device=device, resident_itemsize=resident_itemsize, cache_itemsize=cache_itemsize,
                   keep_fraction=sparse.keep_fraction, capacity_rows=sparse.capacity_rows,
                   naive_held_rows=config.naive_held_rows, trace=sparse.trace,
                   head_4bit=config.head_precision == "4bit")


def max_context_of(manifest: Manifest, max_context: int | None) -> int:
    """KV-cache tokens per slot: --max-context (DEFAULT_MAX_CONTEXT when not given), capped by the model."""
    return min(max_context or DEFAULT_MAX_CONTEXT, manifest.arch.max_position_embeddings)


def kv_cache_bytes_of(manifest: Manifest, max_batch: int, max_context: int, itemsize: int) -> int:
    """The KV cache an executor allocates: keys and values of every layer, slot and position."""
    arch = manifest.arch
    return KVCache.bytes_needed(arch.num_hidden_layers, max_batch, arch.num_key_value_heads, max_context,
                                arch.head_dim, itemsize)


def plan_memory_for(store_dir: str, manifest: Manifest, inputs: MemoryInputs) -> MemoryPlan:
    """What each part holds running inputs.mode on this store: resident weights, predictors, staging, neuron
    caches (naive: its held layers), the KV cache beside them, and what an executor puts on its device
    (device_bytes). With a budget, the caches are what it leaves above the minimum, and MemoryPlanError names
    what to change when it cannot hold the minimum; without, they are the inputs' (or every neuron)."""
    mode, device, budget_bytes = inputs.mode, torch_device_type(inputs.device), inputs.budget_bytes
    if mode not in FFN_MODES:
        raise ValueError(f"a memory plan is for one of {', '.join(FFN_MODES)}, not --mode {mode} (choose_mode "
                         "plans each candidate)")
    compute_itemsize, kv_cache_bytes = inputs.compute_itemsize, inputs.kv_cache_bytes
    resident_bytes = resident_bytes_of(store_dir, manifest, inputs.resident_itemsize or compute_itemsize, device,
                                       inputs.head_4bit)
    resident_savings = ResidentSavings.of(store_dir, manifest, inputs, resident_bytes)
    if mode != "sparse":
        plan = _whole_layer_plan(manifest, mode, budget_bytes, resident_bytes, inputs, device)
        if budget_bytes is not None and plan.total_bytes > budget_bytes:
            raise MemoryPlanError(f"--memory {budget_bytes / MIB:.1f} MiB is too small for --mode {mode}: it needs "
                                  f"{plan.total_bytes / MIB:.1f} MiB; raise --memory, or lower the minimum:\n"
                                  + "\n".join(f"  {knob}" for knob in flash_mode_knobs(
                                      store_dir, manifest, mode, plan, resident_savings, kv_cache_bytes,
                                      compute_itemsize, device)))
    elif inputs.trace is not None:
        from flashllm.workers.activation_trace import ActivationTrace
        from flashllm.workers.trace_predictor import trace_predictor_held_bytes

        arch = manifest.arch
        keep_neurons = ActivationTrace(inputs.trace, arch.num_hidden_layers, arch.intermediate_size, 1).max_active
        plan = plan_memory(manifest, resident_bytes, budget_bytes, compute_itemsize, keep_neurons,
                           [0] * arch.num_hidden_layers, trace_predictor_held_bytes(manifest), kv_cache_bytes,
                           cache_itemsize=inputs.cache_itemsize, device=device,
                           resident_savings=resident_savings,
                           capacity_rows=list(inputs.capacity_rows) if inputs.capacity_rows else None)
    else:
        from flashllm.workers.predictor import load_sparsity_tensors, predictor_held_bytes

        tensors = load_sparsity_tensors(store_dir, manifest)
        # vectors (biases, the lookahead's input map) are held in the compute dtype
        predictor_bytes = predictor_held_bytes(tensors, manifest.sparsity.predictor, manifest.arch.num_hidden_layers,
                                               compute_itemsize)
        hot_counts = [int(tensors[f"layers.{layer}.hot_ids"].numel()) if f"layers.{layer}.hot_ids" in tensors else 0
                      for layer in range(manifest.arch.num_hidden_layers)]
        keep_neurons = keep_neurons_of(inputs.keep_fraction, manifest.sparsity.target_sparsity,
                                       manifest.arch.intermediate_size)
        plan = plan_memory(manifest, resident_bytes, budget_bytes, compute_itemsize, keep_neurons, hot_counts,
                           predictor_bytes, kv_cache_bytes, cache_itemsize=inputs.cache_itemsize, device=device,
                           resident_savings=resident_savings,
                           capacity_rows=list(inputs.capacity_rows) if inputs.capacity_rows else None)
    plan.device_bytes = device_bytes_of(store_dir, manifest, mode, plan.capacity_rows, inputs)
    return plan


def estimated_sparse_plan(store_dir: str, manifest: Manifest, inputs: MemoryInputs) -> MemoryPlan | None:
    """--mode sparse's plan, nothing bounding it, on a store not calibrated yet: with what `flashllm calibrate`'s
    defaults will add (a sketch predictor of every layer, sets of its default sparsity, nothing pinned). Its
    cached_minimum_bytes says whether calibrating could make sparse fit a budget. None where calibrate's default
    predictor is not a sketch (a low-rank one's bytes follow its training options)."""
    from flashllm.workers.predictor import DEFAULT_TARGET_SPARSITY, default_predictor_type, estimated_sketch_bytes

    arch = manifest.arch
    if default_predictor_type(arch) != "sketch":
        return None
    device = torch_device_type(inputs.device)
    resident_bytes = resident_bytes_of(store_dir, manifest, inputs.resident_itemsize or inputs.compute_itemsize,
                                       device, inputs.head_4bit)
    keep_neurons = keep_neurons_of(inputs.keep_fraction, DEFAULT_TARGET_SPARSITY, arch.intermediate_size)
    return plan_memory(manifest, resident_bytes, None, inputs.compute_itemsize, keep_neurons,
                       [0] * arch.num_hidden_layers, estimated_sketch_bytes(arch, inputs.compute_itemsize),
                       inputs.kv_cache_bytes, cache_itemsize=inputs.cache_itemsize, device=device)


def _whole_layer_plan(manifest: Manifest, mode: str, budget_bytes: int | None, resident_bytes: int,
                      inputs: MemoryInputs, device: str) -> MemoryPlan:
    """dense holds every bundle; naive streams layers through its staging and holds the whole layers the
    budget has room for beside it (without a budget: the inputs' held layers)."""
    layout, compute_itemsize = manifest.ffn, inputs.compute_itemsize
    naive_minimum = naive_minimum_bytes(manifest, resident_bytes, compute_itemsize, device)
    if mode == "dense":
        ffn_rows = [region.num_neurons for region in layout.layers]
    elif budget_bytes is not None:
        ffn_rows = naive_held_rows(layout, budget_bytes - naive_minimum, compute_itemsize, device)
    else:
        ffn_rows = list(inputs.naive_held_rows or [0] * len(layout.layers))
    plan = MemoryPlan(budget_bytes=budget_bytes, resident_bytes=resident_bytes, predictor_bytes=0,
                      staging_bytes=0 if mode == "dense" else naive_staging_bytes(layout, compute_itemsize, device),
                      cache_bytes=sum(held_rows_bytes(layout, rows, compute_itemsize, device, whole_layer=True)
                                      for rows in ffn_rows if rows)
                      + whole_layer_tables_bytes(layout, ffn_rows, device),
                      kv_cache_bytes=inputs.kv_cache_bytes, capacity_rows=ffn_rows, min_capacity_rows=ffn_rows,
                      ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(r.num_neurons for r in layout.layers))
    plan.minimum_bytes = plan.total_bytes if mode == "dense" else naive_minimum
    return plan


def device_bytes_of(store_dir: str, manifest: Manifest, mode: str, capacity_rows: list[int],
                    inputs: MemoryInputs) -> dict[str, int]:
    """What an executor allocates on its device before any activation: resident weights, KV cache, FFN rows.

    FFN rows: dense holds every layer; naive one layer at a time; sparse its neuron-cache mirrors
    (capacity_rows) plus one whole layer for prefill."""
    from flashllm.workers.store_reader import resident_tensor_elements

    layout = manifest.ffn
    layer_rows = [region.num_neurons for region in layout.layers]
    ffn_rows = {"dense": sum(layer_rows), "naive": max(layer_rows),
                "sparse": sum(capacity_rows or layer_rows) + max(layer_rows)}[mode]
    return {
        "resident weights": resident_tensor_elements(store_dir, manifest) * (inputs.resident_itemsize
                                                                            or inputs.compute_itemsize),
        "KV cache": inputs.kv_cache_bytes,
        "FFN rows": ffn_rows * layout.bundle_elements * inputs.compute_itemsize,
    }


def plan_for_store(store_dir: str, manifest: Manifest, budget_bytes: int | None, mode: str, compute_itemsize: int,
                   kv_cache_bytes: int, keep_fraction: float | None = None,
                   resident_itemsize: int | None = None, cache_itemsize: int | None = None,
                   device: str = "cpu") -> MemoryPlan:
    """plan_memory_for with the itemsizes given one by one (raises MemoryPlanError when it cannot fit).
    cache_itemsize: bytes per element of a float store's neuron cache rows (default: compute_itemsize)."""
    return plan_memory_for(store_dir, manifest, MemoryInputs(
        mode=mode, budget_bytes=budget_bytes, compute_itemsize=compute_itemsize, kv_cache_bytes=kv_cache_bytes,
        device=device, resident_itemsize=resident_itemsize, cache_itemsize=cache_itemsize,
        keep_fraction=keep_fraction))


def torch_device_type(device: str) -> str:
    """'cuda:1' → 'cuda'; what decides how rows are held."""
    return device.split(":")[0]
