"""Which FFN mode and runtime run when the user did not say (`--mode auto`, `--runtime auto`), and what
`--memory 60%` means. One place decides both policies; the engine and the CLI carry them out.

--mode auto, with a --memory budget: the first of dense (the whole model in memory: fastest), sparse (only
predicted neurons held and read: needs `flashllm calibrate`) with a cache in every layer, naive (every layer
read whole for each token, whole layers held with what is left), sparse with uncached layers, whose memory
plan fits (choose_mode). Without a budget nothing bounds memory, so dense.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flashllm.protocol.store_format import Manifest

if TYPE_CHECKING:
    from flashllm.workers.memory_plan import MemoryPlan

AUTO_MODE_ORDER = ("dense", "sparse", "naive")  # the modes --mode auto plans (choose_mode: in which order)


@dataclass
class ModeChoice:
    mode: str
    reason: str  # one line for the user: why this mode


def model_bytes_on_disk(store_dir: str) -> int:
    """The model's weights as the store holds them: its resident file and its FFN file (what `--memory N%` is
    a share of). Not the predictors `calibrate` adds, the tokenizer or the checksums: a store's 60% is the
    same budget before and after calibrating it."""
    from flashllm.protocol.store_format import read_manifest

    manifest = read_manifest(store_dir)
    return sum(os.path.getsize(os.path.join(store_dir, name)) for name in (manifest.resident_file, manifest.ffn.file))


def budget_from_percent(text: str, store_dir: str) -> int | None:
    """'60%' → 60% of the model's bytes in the store (model_bytes_on_disk); None when text is not a percentage."""
    stripped = text.strip()
    if not stripped.endswith("%"):
        return None
    try:
        percent = float(stripped[:-1])
    except ValueError:
        percent = -1
    if not 0 < percent:
        raise ValueError(f"--memory {text!r}: a percentage of the store must be above 0, e.g. 60%")
    return int(model_bytes_on_disk(store_dir) * percent / 100)


def choose_mode(manifest: Manifest, store_dir: str, budget_bytes: int | None,
                plan_of: Callable[[str], "MemoryPlan"], has_predictors: bool | None = None,
                estimate_sparse: Callable[[], "MemoryPlan | None"] | None = None) -> ModeChoice:
    """--mode auto. plan_of(mode) → mode's memory plan under the budget, raising MemoryPlanError when it does
    not fit. The first that fits of: dense; sparse with a neuron cache in every layer; naive; sparse with some
    layers uncached (they read each token's set every step, and naive, holding whole layers with the same
    bytes, was the faster of the two where both fit: docs/benchmarks.md, stop 31). Raises the most useful error
    when nothing fits: sparse's (it names every knob) on a calibrated store. has_predictors: sparse can run
    (default: the store is calibrated; a --trace stands in for predictors). estimate_sparse() → sparse's plan
    once calibrated with calibrate's defaults (memory_plan.estimated_sparse_plan), or None: whether naive's
    reason on a store without predictors suggests calibrating."""
    from flashllm.workers.memory_plan import MemoryPlanError

    if budget_bytes is None:
        return ModeChoice("dense", "no --memory given: the whole model in memory")
    calibrated = manifest.sparsity is not None if has_predictors is None else has_predictors
    errors: dict[str, Exception] = {}

    def planned(mode: str) -> "MemoryPlan | None":
        # each plan only when the choice gets to it: sparse's reads the store's predictors to count them
        try:
            return plan_of(mode)
        except MemoryPlanError as exc:
            errors[mode] = exc
            return None

    if planned("dense") is not None:
        return ModeChoice("dense", "the whole model fits --memory")
    sparse = planned("sparse") if calibrated else None
    if sparse is not None and not sparse.uncached_layers:
        return ModeChoice("sparse", "the whole model does not fit --memory; the store is calibrated")
    if planned("naive") is not None:
        return ModeChoice("naive", (
            f"the whole model does not fit --memory, nor every layer's neuron cache for sparse (it needs "
            f"{sparse.cached_minimum_bytes / 2**20:.1f} MiB)" if sparse is not None else
            "neither dense nor sparse fits --memory" if calibrated else
            _uncalibrated_reason(store_dir, budget_bytes, estimate_sparse() if estimate_sparse else None)))
    if sparse is not None:
        return ModeChoice("sparse", f"only sparse fits --memory, with {sparse.uncached_layers} of "
                                    f"{len(sparse.capacity_rows)} layers reading each token's set uncached")
    raise errors["sparse" if calibrated else "naive"]


def _uncalibrated_reason(store_dir: str, budget_bytes: int, calibrated_sparse: "MemoryPlan | None") -> str:
    """Why naive on a store without predictors, and whether calibrating it would change that: only where
    sparse's plan once calibrated gives every layer a cache within the budget (or none is known)."""
    calibrate = (f"run `flashllm calibrate --store {store_dir} --generate-tokens 4000` (or --text FILE with a few "
                 f"thousand tokens of your own text)")
    if calibrated_sparse is None:
        return f"dense does not fit --memory and the store has no predictors; sparse would read far less per " \
               f"token: {calibrate}"
    needs = f"{calibrated_sparse.cached_minimum_bytes / 2**20:.1f} MiB"
    if calibrated_sparse.cached_minimum_bytes <= budget_bytes:
        return f"dense does not fit --memory and the store has no predictors; calibrated, sparse would fit (it " \
               f"needs about {needs}) and read far less per token: {calibrate}"
    return (f"dense does not fit --memory; calibrating would not change that: sparse would need about {needs} for "
            f"its predictors ({calibrated_sparse.predictor_bytes / 2**20:.1f} MiB) and every layer's neuron cache")


def resolve_head_precision(requested: str, budget_bytes: int | None, sketch_applies: bool,
                           fits_as_stored: Callable[[], bool]) -> str:
    """--head-precision auto: a q8_0 head (sketch_applies: the store has one, on a CPU) is held as stored
    (int8 rows) where nothing bounds memory or the whole model fits --memory that way (fits_as_stored(): dense's
    plan with the head as stored fits), else as a 4-bit sketch. Below the model every MiB the head gives up
    holds FFN weights that would otherwise be read from flash at every token; the sketch's top 32 logits are
    still recomputed exactly, so greedy and top-k choices stand, and the rest of the distribution moves by its
    rounding (docs/benchmarks.md, stop 34: perplexity and speed both ways). Where there is no such head, "stored"
    whatever was asked: nothing would be sketched, and the engine's config says what it holds."""
    if not sketch_applies:
        return "stored"
    if requested != "auto":
        return requested
    if budget_bytes is None or fits_as_stored():
        return "stored"
    return "4bit"


def resolve_runtime(runtime: str, mode: str, device: str | None = None) -> str:
    """--runtime auto: the pipelined workers for sparse on the CPU, where reading the next layer overlaps
    computing this one and the predictor shares compute's process; in-process on a GPU, where compute is short
    and the messages cost more than the overlap saves (docs/benchmarks.md has the runs behind both); in-process
    for dense and naive, which have nothing to pipeline."""
    if runtime != "auto":
        return runtime
    from flashllm.workers.executor import default_device

    on_cpu = (device or default_device()) == "cpu"
    return "workers" if mode == "sparse" and on_cpu else "inproc"
