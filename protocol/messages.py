"""What the worker processes say to each other: typed internal messages.

Only ids, offsets, counts, versions and timings travel in a message; tensors
(hidden states, masks, neuron rows, logits) stay in shared memory
(protocol/shm.py) and a message names where. Every frame carries
PROTOCOL_VERSION (see protocol/codec.py), so processes from two different
installs refuse each other instead of misreading fields.

Who sends what (the pipeline is a ring: compute → predictor → prefetch → compute):

    supervisor ──ForwardRequest──▶ compute ──StepBegin, FfnInput(l)──▶ predictor
    predictor  ──StepBegin, Prediction(l), Lookahead(l+1)──▶ prefetch
    predictor  ──PredictionStats(l)──▶ compute                        (counters, off the critical path)
    prefetch   ──LayerReady(l)──▶ compute   (masked path: one per chunk of the layer)
    prefetch   ──LayerStaged(l)──▶ compute  (a decode step's uncached layer, read ahead at its Lookahead)
    compute    ──ChunkDone──▶ prefetch                                (a chunk-staging slot is free again)
    compute    ──ForwardChunk──▶ supervisor ──LogitsTaken──▶ compute   (logits in chunks)
    any worker ──StepFailed──▶ the next in the ring, compute ──▶ supervisor
    workers    ──WorkerReady / WorkerFailed──▶ supervisor ──Shutdown──▶ workers

Dispatch is by type through a table (`Dispatcher`), never by isinstance chains.
Pure Python + numpy: every process may import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

PROTOCOL_VERSION = 7

# a layer's FFN path for one step: through the neuron cache, or the whole layer read with per-token masks
PATH_CACHED = "cached"
PATH_MASKED = "masked"

ROLE_SUPERVISOR = "supervisor"
ROLE_COMPUTE = "compute"
ROLE_PREDICTOR = "predictor"
ROLE_PREFETCH = "prefetch"
WORKER_ROLES = (ROLE_PREFETCH, ROLE_PREDICTOR, ROLE_COMPUTE)


def _ids() -> Any:
    return field(default_factory=lambda: np.zeros(0, np.int64))


# ---------------------------------------------------------------------- control (supervisor ↔ workers)


@dataclass
class WorkerReady:
    """A worker finished loading and serves its inbox."""

    tag: ClassVar[int] = 1
    role: str  # one of WORKER_ROLES
    pid: int
    info: dict = field(default_factory=dict)  # e.g. {"device": "cpu", "direct_reads": True}


@dataclass
class WorkerFailed:
    """A worker is about to exit on an unexpected error (sent by process_entry before it dies)."""

    tag: ClassVar[int] = 2
    role: str
    pid: int
    error: str  # one line: exception type and message
    traceback: str = ""


@dataclass
class Shutdown:
    """Asks a worker to exit cleanly (the first stage of a staged shutdown)."""

    tag: ClassVar[int] = 3
    reason: str = ""


# ---------------------------------------------------------------------- one forward pass (engine ↔ compute)


@dataclass
class ForwardRequest:
    """Run the model on B sequences × T new tokens; logits come back through the logits buffer."""

    tag: ClassVar[int] = 10
    step: int  # increasing per forward; every pipeline message of this pass carries it
    batch: int  # B
    steps: int  # T
    token_ids: np.ndarray = _ids()  # (B*T,) int64, row-major (B, T)
    slots: np.ndarray = _ids()  # (B,) KV-cache slot per sequence
    positions: np.ndarray = _ids()  # (B*T,) int64, position of each token
    logit_steps: np.ndarray = _ids()  # (B,) int64: logits of each sequence's step here only; empty: of every step


@dataclass
class ForwardChunk:
    """Logits rows [first_row, first_row + num_rows) of the (B*T, V) result are in the logits buffer.

    Not the last chunk: the compute worker waits for LogitsTaken before reusing the buffer.
    The last chunk carries the pass's timings and counters."""

    tag: ClassVar[int] = 11
    step: int
    first_row: int
    num_rows: int
    total_rows: int  # B*T
    vocab: int
    stats: dict = field(default_factory=dict)  # last chunk only: PipelineStats fields


@dataclass
class LogitsTaken:
    """The supervisor copied a chunk out; the logits buffer may be overwritten."""

    tag: ClassVar[int] = 12
    step: int
    next_row: int


@dataclass
class StepFailed:
    """A worker could not do its part of a step; the step fails with this error, the workers stay up."""

    tag: ClassVar[int] = 13
    step: int
    role: str
    error: str


# ---------------------------------------------------------------------- the pipeline (per step and layer)


@dataclass
class StepBegin:
    """A forward pass starts: B sequences × T tokens (T > 1: every layer takes the masked path)."""

    tag: ClassVar[int] = 20
    step: int
    batch: int
    steps: int
    slots: np.ndarray = _ids()  # (B,) each sequence's KV slot, its identity while it runs (its window history)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # (B,) 1: the sequence starts now


@dataclass
class FfnInput:
    """Layer `layer`'s FFN input h (num_tokens, d) is in hidden buffer `buffer` (= layer % 2)."""

    tag: ClassVar[int] = 21
    step: int
    layer: int
    num_tokens: int
    buffer: int


@dataclass
class Lookahead:
    """Predicted neurons of `layer` from the previous layer's input: start reading them now.

    With `ready` nothing later changes the layer this step (the "skip" policy), so the prefetcher
    sends its LayerReady as soon as the reads are done: compute then waits only for late reads."""

    tag: ClassVar[int] = 22
    step: int
    layer: int
    ids: np.ndarray = _ids()  # sorted unique store neuron ids
    # True when ids ∪ the pinned neurons fit the cache (the same-layer check's set later takes rows from it
    # and from older tokens'): prepare it now, not just stage. The layer then takes the cached path, except
    # under batch invariance when its sequences' whole sets outgrow the cache (the prepared rows stay)
    commit: bool = False
    ready: bool = False  # commit, and no Prediction(layer) follows: hand the layer over once prepared
    resident: np.ndarray = _ids()  # with ready: as Prediction.resident


@dataclass
class Prediction:
    """The predictor's decision for `layer` now that its own input is known.

    cached: prepare(layer, first, new_token=True), then (when `same` is not empty)
            prepare(layer, same, new_token=False) — SparseFlashFfn's order.
    masked: the per-token mask is in the mask buffer; the layer is read whole in a multi-token step, only
            read_ids in a decode step (the neurons its tokens compute, chunk_ids())."""

    tag: ClassVar[int] = 23
    step: int
    layer: int
    path: str  # PATH_CACHED or PATH_MASKED
    first: np.ndarray = _ids()  # the lookahead's set if there was one, else the same-layer set
    same: np.ndarray = _ids()  # the same-layer check's set when `first` is the lookahead's (policy "read"), else empty
    first_committed: bool = False  # `first` was already prepared on its Lookahead(commit=True)
    # neurons compute needs resident besides, not the token's own (batch invariance: its sequences' window
    # neurons): prepare(layer, same, new_token=False, resident_ids=resident) when not empty
    resident: np.ndarray = _ids()
    read_ids: np.ndarray = _ids()  # masked, in a decode step: sorted unique neuron ids


@dataclass
class LayerReady:
    """Layer `layer` may be computed: its cache holds `num_rows` rows at `version` (cached path),
    or chunk `chunk` of `num_chunks` of the layer's masked read (neurons chunk_ids()[chunk], in the
    workers/flash_io/bundle_reader.py sense) is in chunk-staging slot `staging` (masked path; compute
    hands the slot back with ChunkDone). Counters are this layer's (chunk's) share of the step's flash work."""

    tag: ClassVar[int] = 24
    step: int
    layer: int
    path: str
    version: int = 0
    num_rows: int = 0
    staging: int = -1
    chunk: int = -1
    num_chunks: int = 0
    hits: int = 0
    read_neurons: int = 0
    read_bytes: int = 0
    io_s: float = 0.0
    critical_io_s: float = 0.0  # Prediction received → LayerReady sent: the flash work compute may wait for


@dataclass
class LayerStaged:
    """A decode step's uncached layer `layer` (it takes the masked path) read ahead at its Lookahead: bundles
    of neurons `ids` (sorted) are rows 0..len(ids)-1 of chunk-staging slot `staging`, sent before the layer's
    Prediction. When they hold every neuron of the layer's read (the mask's union, sparse_policy.masked_read_ids)
    compute multiplies them without waiting for the layer, and hands the slot back with ChunkDone; otherwise
    the prefetcher takes the slot back itself and sends the layer's LayerReady as for any masked layer (both
    sides test the same ids, so they agree). Counters as LayerReady's, for the read-ahead."""

    tag: ClassVar[int] = 27
    step: int
    layer: int
    staging: int
    ids: np.ndarray = _ids()
    read_bytes: int = 0
    io_s: float = 0.0


@dataclass
class PredictionStats:
    """The predictor's counters for one layer of a step, straight to compute (which sums a step's)."""

    tag: ClassVar[int] = 25
    step: int
    layer: int
    predicted: int = 0  # neurons predicted for the token(s): |ahead ∪ same|, or the masks' union
    predict_s: float = 0.0  # predictor time spent on this layer


@dataclass
class ChunkDone:
    """Compute is done with chunk-staging slot `staging` (masked path): the prefetcher may read into it."""

    tag: ClassVar[int] = 26
    step: int
    staging: int


MESSAGE_TYPES: tuple[type, ...] = (
    WorkerReady, WorkerFailed, Shutdown,
    ForwardRequest, ForwardChunk, LogitsTaken, StepFailed,
    StepBegin, FfnInput, Lookahead, Prediction, LayerReady, LayerStaged, PredictionStats, ChunkDone,
)
MESSAGE_BY_TAG: dict[int, type] = {cls.tag: cls for cls in MESSAGE_TYPES}
assert len(MESSAGE_BY_TAG) == len(MESSAGE_TYPES), "message tags must be unique"
FIELD_NAMES: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES}


class UnexpectedMessageError(RuntimeError):
    """A process received a message type it has no handler for."""


class Dispatcher:
    """type → handler table: `dispatch(msg)` calls the handler registered for type(msg).

        dispatcher = Dispatcher({FfnInput: core.on_ffn_input, StepBegin: core.on_step_begin})
        dispatcher.dispatch(msg)
    """

    def __init__(self, handlers: dict[type, Callable[[Any], Any]], owner: str = "this process"):
        unknown = [cls.__name__ for cls in handlers if cls not in FIELD_NAMES]
        if unknown:
            raise TypeError(f"not protocol messages: {', '.join(unknown)}")
        self.handlers = dict(handlers)
        self.owner = owner

    def handles(self, cls: type) -> bool:
        return cls in self.handlers

    def dispatch(self, msg: Any) -> Any:
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise UnexpectedMessageError(
                f"{self.owner} got a {type(msg).__name__} message it does not handle (handles: "
                f"{', '.join(sorted(cls.__name__ for cls in self.handlers))}); this is a flashllm bug")
        return handler(msg)
