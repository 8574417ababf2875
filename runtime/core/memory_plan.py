"""The memory plan: what a `--memory` budget holds, decided before anything is loaded.

The budget bounds the bytes the engine keeps in DRAM: resident weights (in the
dtype they are held in: the compute dtype, or --resident-dtype), predictors,
the per-layer neuron caches and the reader's staging buffers. The KV cache is
reported beside it (it grows with batch and context, not with the model's
FFN). Each layer's cache must hold its pinned hot neurons plus one token's
predicted set (top-k); whatever the budget leaves above that minimum widens
every layer's cache equally, which is what the sliding window reuses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flashllm.protocol.shm import CHUNK_SLOTS
from flashllm.protocol.store_format import DTYPE_ITEMSIZE, FfnLayout, Manifest
from flashllm.workers.flash_io.bundle_reader import largest_chunk_rows, neuron_read_staging_bytes

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


def sparse_staging_bytes(layout: FfnLayout, compute_itemsize: int) -> int:
    """What the sparse mode's reads stage beside the caches: a read of neurons a round of requests (at most a
    layer), and the dense-read path (prefill), which goes through a layer in chunks: the worker runtime's
    prefetcher fills CHUNK_SLOTS shared-memory chunk slots that compute multiplies, the in-process engine one
    chunk as read; both one chunk converted to the compute dtype where it differs. One plan serves both
    runtimes (in process, a chunk of it stays free), so the same budget gives the same caches, and so the
    same tokens, whichever runtime runs."""
    largest_chunk_bytes = largest_chunk_rows(layout) * layout.bundle_bytes
    same_dtype = not layout.is_quantized and compute_itemsize == DTYPE_ITEMSIZE[layout.dtype]
    converted_chunk_bytes = 0 if same_dtype else largest_chunk_rows(layout) * layout.bundle_elements * compute_itemsize
    return neuron_read_staging_bytes(layout) + CHUNK_SLOTS * largest_chunk_bytes + converted_chunk_bytes


def plan_memory(manifest: Manifest, resident_elements: int, budget_bytes: int, compute_itemsize: int, keep_neurons: int,
                hot_counts: list[int], predictor_bytes: int, kv_cache_bytes: int,
                cache_itemsize: int | None = None, resident_itemsize: int | None = None) -> MemoryPlan:
    arch, layout = manifest.arch, manifest.ffn
    cache_itemsize = cache_itemsize or compute_itemsize
    resident_bytes = resident_elements * (resident_itemsize or compute_itemsize)
    row_bytes = layout.bundle_elements * cache_itemsize
    staging_bytes = sparse_staging_bytes(layout, compute_itemsize)
    num_neurons = [region.num_neurons for region in layout.layers]
    # one predictor's top-k plus the pinned rows; a token whose lookahead ∪ same-layer union does not
    # fit takes the dense-read path (correct, slower), so the union need not be reserved
    min_rows = [min(n, hot + keep_neurons) for n, hot in zip(num_neurons, hot_counts)]
    fixed = resident_bytes + predictor_bytes + staging_bytes
    min_total = fixed + sum(min_rows) * row_bytes
    if budget_bytes < min_total:
        raise MemoryPlanError(
            f"--memory {budget_bytes / MIB:.1f} MiB is too small: the minimum for this store and settings is "
            f"{min_total / MIB:.1f} MiB (resident {resident_bytes / MIB:.1f} + predictors {predictor_bytes / MIB:.1f} "
            f"+ staging {staging_bytes / MIB:.1f} + smallest neuron caches {sum(min_rows) * row_bytes / MIB:.1f} MiB); "
            "raise --memory or raise the sparsity (fewer neurons per token)"
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
                      staging_bytes=staging_bytes, cache_bytes=int(sum(capacity) * row_bytes),
                      kv_cache_bytes=kv_cache_bytes, capacity_rows=capacity, min_capacity_rows=min_rows,
                      ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(num_neurons))
    return plan


def plan_for_store(store_dir: str, manifest: Manifest, budget_bytes: int, mode: str, compute_itemsize: int,
                   kv_cache_bytes: int, keep_fraction: float | None = None,
                   resident_itemsize: int | None = None, cache_itemsize: int | None = None) -> MemoryPlan:
    """The plan for running `mode` on this store under budget_bytes (raises MemoryPlanError when it cannot fit).
    cache_itemsize: bytes per element of the neuron caches' rows (default: compute_itemsize)."""
    from flashllm.workers.store_reader import resident_tensor_elements

    resident_elements = resident_tensor_elements(store_dir, manifest)
    layout = manifest.ffn
    if mode != "sparse":
        # dense holds every bundle; naive holds one layer at a time (raw + converted)
        ffn_rows = [region.num_neurons for region in layout.layers] if mode == "dense" else [0] * len(layout.layers)
        plan = MemoryPlan(budget_bytes=budget_bytes,
                          resident_bytes=resident_elements * (resident_itemsize or compute_itemsize),
                          predictor_bytes=0, staging_bytes=0 if mode == "dense" else 2 * max(r.length_bytes for r in layout.layers),
                          cache_bytes=sum(ffn_rows) * layout.bundle_elements * compute_itemsize,
                          kv_cache_bytes=kv_cache_bytes, capacity_rows=ffn_rows, min_capacity_rows=ffn_rows,
                          ffn_bytes=layout.total_bundle_bytes, total_neurons=sum(r.num_neurons for r in layout.layers))
        if plan.total_bytes > budget_bytes:
            raise MemoryPlanError(f"--memory {budget_bytes / MIB:.1f} MiB is too small for --mode {mode}: it needs "
                                  f"{plan.total_bytes / MIB:.1f} MiB; raise --memory or use --mode sparse")
        return plan
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
    return plan_memory(manifest, resident_elements, budget_bytes, compute_itemsize, keep_neurons, hot_counts,
                       predictor_bytes, kv_cache_bytes, cache_itemsize=cache_itemsize,
                       resident_itemsize=resident_itemsize)
