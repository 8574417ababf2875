"""The engine's settings as one typed, frozen object that checks itself when made.

`EngineConfig` is what a user asks of an engine (mode, memory budget, runtime,
dtypes, threads, batch and context sizes, the sparse FFN's options); the
engine resolves what it leaves open (--mode auto, --runtime auto, the neuron
caches' sizes from the memory plan) into a copy and hands that copy whole to
its executor. `SparseOptions` crosses into the worker processes inside their
WorkerConfig (pickled), so this module imports neither torch nor protocol/:
the prefetch process stays torch-free.

Every default lives here once; a bad value raises ValueError naming the
command-line flag and what it accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from numbers import Integral

from flashllm.workers.activation_trace import TraceSpec
from flashllm.workers.flash_io.neuron_cache import DEFAULT_WINDOW_TOKENS

FFN_MODES = ("dense", "naive", "sparse")
MODES = ("auto", *FFN_MODES)
RUNTIMES = ("auto", "inproc", "workers")
DEFAULT_MAX_CONTEXT = 2048  # KV-cache tokens per slot when --max-context is not given (capped by the model)
RESIDENT_DTYPES = ("float32", "float16", "bfloat16")
# how a q8_0 head is held (--head-precision): as stored (int8 rows), or as a 4-bit sketch in ~56% of the bytes
# whose top logits are still recomputed exactly (resident.StoreBackedMatrix); auto: as stored where the whole
# model fits the budget that way, else the sketch (mode_choice.resolve_head_precision)
HEAD_PRECISIONS = ("auto", "stored", "4bit")
# neurons the same-layer check adds to the lookahead's set: read before the layer runs, or left out this token
MISSING_POLICIES = ("read", "skip")
# what each token's FFN sums: its predicted neurons (the paper's rule: the window is a cache of reads, and the
# output does not depend on --memory), or also its window's earlier tokens' neurons the cache holds (closer to
# dense where the sets leave out nonzero contributions; the compute grows with the budget); auto: window where
# the predictor's sets leave out nonzero contributions (a SwiGLU model's threshold), else predicted (a ReLU
# model's other neurons are zeros, a trace's sets are the neurons each token uses)
COMPUTE_SETS = ("auto", "predicted", "window")

# the options a user sets on the command line → their flags
SPARSE_FLAGS = {"keep_fraction": "--keep-fraction", "window_tokens": "--neuron-window",
                "missing_policy": "--missing-policy", "compute_set": "--compute-set", "trace": "--trace"}
# what a refusal names when every sparse option given equals its default
ANY_SPARSE_FLAG = f"a sparse option ({', '.join(SPARSE_FLAGS.values())})"


@dataclass(frozen=True)
class SparseOptions:
    """How --mode sparse predicts, caches and reads neurons (both runtimes)."""

    keep_fraction: float | None = None  # neurons computed per layer and token; None: 1 - the calibrated sparsity
    window_tokens: int = DEFAULT_WINDOW_TOKENS  # the sliding window: neurons of the last K tokens stay cached
    missing_policy: str = "read"  # late neurons of the same-layer check: read before the layer runs, or skip
    compute_set: str = "auto"  # a token's FFN sums its predicted neurons, or also its window's (COMPUTE_SETS)
    pin_hot: bool = True  # keep each layer's calibrated hot neurons in its cache for good
    reader_threads: int = 4  # flash reader threads (or in-flight requests of the AIO backend)
    capacity_rows: tuple[int, ...] | None = None  # cache rows per layer (the memory plan's; 0: uncached); None: all
    trace: TraceSpec | None = None  # active sets replayed from a trace instead of the store's predictors
    # each sequence computes only its own computed set (compute_set), so a temperature-0 request decodes the
    # same tokens whatever runs beside it; False: every sequence computes every cached row (the batch's union)
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"--keep-fraction {self.keep_fraction} is outside (0, 1]: give the fraction of each "
                             "layer's neurons to compute per token, e.g. 0.25")
        _check_at_least("--neuron-window", self.window_tokens, 1)
        if self.missing_policy not in MISSING_POLICIES:
            raise ValueError(f"--missing-policy {self.missing_policy!r} is not one of {', '.join(MISSING_POLICIES)}")
        if self.compute_set not in COMPUTE_SETS:
            raise ValueError(f"--compute-set {self.compute_set!r} is not one of {', '.join(COMPUTE_SETS)}")
        _check_at_least("reader_threads", self.reader_threads, 1)
        if self.trace is not None and self.keep_fraction is not None:
            raise ValueError("--keep-fraction does not apply with --trace: the trace's sets are the neurons each "
                             "token uses (paper:active=A sets their share)")
        if self.capacity_rows is not None:
            rows = tuple(int(n) for n in self.capacity_rows)
            if any(n < 0 for n in rows):
                raise ValueError(f"capacity_rows {list(rows)}: a layer's neuron cache cannot hold fewer than 0 rows")
            object.__setattr__(self, "capacity_rows", rows)  # a list given stays hashable and immutable

    def flags_set(self) -> list[str]:
        """The command-line flags whose options differ from their defaults (for 'applies to --mode sparse')."""
        default = SparseOptions()
        return [flag for name, flag in SPARSE_FLAGS.items() if getattr(self, name) != getattr(default, name)]

    @classmethod
    def from_dict(cls, options: dict) -> "SparseOptions":
        """From the keyword dict of `Engine(..., ffn_options=...)`; an unknown key is refused by name."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown sparse FFN option(s) {', '.join(unknown)}; known: {', '.join(known)} "
                             "(and memory_budget_bytes)")
        return cls(**{name: options[name] for name in known if name in options})


@dataclass(frozen=True)
class EngineConfig:
    """What an engine runs: everything `flashllm generate/eval/serve/batch/bench` can set.

    sparse: None when no sparse option was asked for (the defaults then apply to --mode sparse); a
    SparseOptions given with --mode dense or naive, or with an --mode auto that picks them, is an error."""

    mode: str = "dense"  # auto, dense, naive, sparse
    runtime: str = "inproc"  # auto, inproc, workers
    memory_budget_bytes: int | None = None  # --memory: what the memory plan sizes everything within
    max_batch: int = 8  # KV-cache slots: sequences decoded together
    max_context: int | None = None  # KV-cache tokens per slot; None: the engine's default, capped by the model
    device: str | None = None  # None: cuda if available, else cpu
    verify: bool = True  # check the resident weights against the store's checksums when loading
    resident_dtype: str | None = None  # dtype embeddings, attention and head are held in; None: the compute dtype
    head_precision: str = "auto"  # a q8_0 head held as stored or as a 4-bit sketch; auto: the memory plan decides
    threads: int | None = None  # torch threads of the model's compute; None: the engine's per-mode default
    worker_restarts: int | None = None  # --runtime workers: restarts after crashes; None: the supervisor's default
    sparse: SparseOptions | None = None
    naive_held_rows: tuple[int, ...] | None = None  # --mode naive: rows each layer holds (the plan's: all or 0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"--runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.memory_budget_bytes is not None:
            _check_at_least("--memory (bytes)", self.memory_budget_bytes, 1)
        _check_at_least("max_batch", self.max_batch, 1)
        if self.max_context is not None:
            _check_at_least("--max-context", self.max_context, 1)
        if self.resident_dtype is not None and self.resident_dtype not in RESIDENT_DTYPES:
            raise ValueError(f"--resident-dtype {self.resident_dtype!r} is not one of {', '.join(RESIDENT_DTYPES)}")
        if self.head_precision not in HEAD_PRECISIONS:
            raise ValueError(f"--head-precision {self.head_precision!r} is not one of {', '.join(HEAD_PRECISIONS)}")
        if self.threads is not None:
            _check_at_least("--threads", self.threads, 1)
        if self.worker_restarts is not None:
            _check_at_least("--worker-restarts", self.worker_restarts, 0)
        if self.naive_held_rows is not None:
            if self.mode != "naive":
                raise ValueError(f"naive_held_rows applies to --mode naive, not --mode {self.mode}")
            object.__setattr__(self, "naive_held_rows", tuple(int(n) for n in self.naive_held_rows))
        if self.sparse is not None and self.mode in ("dense", "naive"):
            flag = (self.sparse.flags_set() or [ANY_SPARSE_FLAG])[0]
            raise ValueError(f"{flag} applies to --mode sparse, not --mode {self.mode}")

    @property
    def sparse_options(self) -> SparseOptions:
        """The sparse FFN's options, defaults where none were given."""
        return self.sparse if self.sparse is not None else SparseOptions()

    @property
    def batch_invariant(self) -> bool:
        """--mode sparse (unless SparseOptions(batch_invariant=False), the bench's comparison): a temperature-0
        request decodes the same tokens whatever runs beside it. Prompts are then prefilled one per forward
        pass (padded into a group, a prompt is computed in other shapes than alone, which CPU kernels round
        differently) and each sequence computes its own neurons (workers/sparse_policy.py). Dense and naive
        prefill admitted prompts together: one pass over a flash FFN instead of one per prompt."""
        return self.mode == "sparse" and self.sparse_options.batch_invariant


def _check_at_least(flag: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise ValueError(f"{flag} must be a whole number ≥ {least}, got {value!r}")
