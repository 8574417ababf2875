"""The sparse FFN's per-layer decisions, made in one place for both runtimes.

`SparseStepPlanner.plan_layer(l, h_l)` turns layer l's FFN input into a
decision that the in-process runtime (SparseFlashFfn) and the worker runtime
(PredictorWorker, whose messages the prefetch worker carries out) only carry
out, as vLLM's workers carry out a SchedulerOutput they did not decide:

    CachedLayer    decode through the neuron cache: prepare `first` as the new
                   token's set, then `late` (the same-layer check's set) in the
                   room it leaves; start reading `lookahead` (layer l+1's set)
    MaskedLayer    read the layer in chunks, each token keeping its own neurons (`mask`): the whole
                   layer in a multi-token step, only the neurons the tokens compute in a decode step
                   (`read_ids`, masked_read_ids)

The rules, per decode step and layer l:

    ahead  = lookahead[l](h_{l-1})      predicted at layer l-1 (a LookaheadRead)
    same   = same[l](h_l)               the late check; not run under "skip" when there is an ahead
    first  = ahead, else same
    first ∪ pinned fits the cache       → cached (decided with the lookahead, so the worker runtime may
                                          prepare the layer before compute reaches it); else masked
    ahead  = lookahead[l+1](h_l)        in a decode step, after either path (a masked one reads its sets)

Prefill and other multi-token steps take the masked path at every layer: the
per-token mask is same[l](h_l) ∪ lookahead[l](h_{l-1}) ∪ hot.

Uncached layers: a budget below one token's set in every layer's cache leaves
some layers no cache at all (memory_plan.plan_memory). Such a layer takes the
masked path in every decode step, its mask each token's same-layer set, and
reads just the union of those sets; its lookahead set, predicted at the layer
before, is read ahead (staged: nothing is kept), and the masked read takes
those rows and reads the rest. The layers with caches work as above. So sparse
runs at any budget that holds the resident weights, the predictors and the
read staging, reading a token's set where it cannot keep it, as naive reads
whole layers.

Batch invariance (the default): a decode step plans each sequence's own set,
from its own predictions and its own history only (one row per sequence):

    own(b)      = same[l](h_l)(b) ∪ of lookahead[l](h_{l-1})(b) as much as fits
                  the cache beside it (lowest ids first); the same check only
                  under "read" or where layer l has no lookahead, whatever path
                  the previous layer took
    computed(b) = own(b) ∪ pinned; where the window is computed (compute_set
                  "window", or "auto" with a predictor whose sets leave out
                  nonzero contributions), also the sets of its earlier
                  window_tokens - 1 tokens, newest first, as many as fit the
                  layer's cache
    needed      = ∪_b computed(b) fits the cache (and the lookahead fitted) →
                  cached: `first` as above, `late` = the sequences' own sets,
                  `resident` = needed (window neurons evicted since are read
                  back, not recorded as the token's); else masked with
                  mask = computed

and each token's FFN is summed over its computed set alone, in neuron-id order
(models/ffn.OwnNeuronSums), on either path. A sequence then computes the same
thing in a batch as alone, so a temperature-0 request gives the same tokens
whatever runs beside it. The history is kept per KV slot (SequenceWindows) and
starts afresh when a slot's sequence starts at position 0.
SparseOptions.batch_invariant=False keeps the old rule (every sequence computes
every cached row, the batch's union), for the bench's comparison.

Why "auto" decides by the predictor: the window exists to spare reads, as in
the paper, where a token computes its predicted neurons alone, which is exact
where the others are zeros (a ReLU model, or a trace's sets). Summing the
window's cached neurons too makes a token's compute grow with --memory (a larger
cache holds more of the window) and buys nothing there. A SwiGLU model's
calibrated threshold leaves out small nonzero contributions, which the window's
cached neurons add back without a read: there they are worth their compute
(docs/benchmarks.md, stop 30, has both measured).

Pure: no I/O, no process knowledge.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from flashllm.workers.engine_config import COMPUTE_SETS, MISSING_POLICIES
from flashllm.workers.flash_io.neuron_cache import DEFAULT_WINDOW_TOKENS, rows_needed
from flashllm.workers.flash_io.neuron_ids import union_ids

if TYPE_CHECKING:
    from flashllm.workers.predictor import SparsityPredictor


def keep_fraction_of(keep_fraction: float | None, target_sparsity: float) -> float:
    """The share of a layer's neurons a token keeps: --keep-fraction's, else what the predictors are calibrated
    for (1 - the store's target sparsity)."""
    fraction = keep_fraction if keep_fraction is not None else 1.0 - target_sparsity
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"keep fraction {fraction} must be in (0, 1] (sparsity in [0, 1))")
    return fraction


def keep_neurons_of(keep_fraction: float | None, target_sparsity: float, num_neurons: int) -> int:
    """A layer's neurons a token keeps: the predictor's k, and what the memory plan sizes a cache by."""
    return max(1, int(round(keep_fraction_of(keep_fraction, target_sparsity) * num_neurons)))


_NO_IDS = np.zeros(0, np.int64)


def sums_per_token(batch_invariant: bool, steps: int, slots: np.ndarray | None) -> bool:
    """Whether a forward pass of `steps` new tokens per sequence of KV slots `slots` computes each token's FFN
    by itself (models/ffn.OwnNeuronSums), on the cached and the masked path alike: in a decode step under batch
    invariance, where each token is one followed sequence's. A prompt is prefilled alone
    (EngineConfig.batch_invariant), so its masked path needs no per-token sums."""
    return batch_invariant and steps == 1 and slots is not None


def masked_read_ids(mask: "torch.Tensor", steps: int) -> np.ndarray | None:
    """What a masked layer reads, given its (N, n_ff) bool mask in a step of `steps` new tokens per sequence:
    in a decode step only the neurons its tokens compute (the union of the mask's rows); in a multi-token step
    the whole layer (None), which the worker runtime reads ahead from StepBegin on, before any mask exists.
    Both runtimes' compute and the prefetch worker go by this."""
    return _ids_of(mask) if steps == 1 else None


def check_missing_policy(missing_policy: str) -> None:
    if missing_policy not in MISSING_POLICIES:
        raise ValueError(f"missing-neuron policy {missing_policy!r} is not one of {', '.join(MISSING_POLICIES)}")


@dataclass(frozen=True)
class LookaheadRead:
    """Layer `layer`'s lookahead set, predicted from the previous layer's input: read it now."""

    layer: int
    ids: np.ndarray  # (k,) sorted unique neuron ids
    # ids ∪ the pinned neurons fit the cache, so the layer surely takes the cached path: it may be
    # prepared now, not just staged
    fits: bool
    # fits, and nothing later changes the layer this step ("skip"): hand it over as soon as it is prepared
    ready: bool
    own: "torch.Tensor | None" = None  # (B, n_ff) bool: each sequence's own lookahead set; None: not tracked
    # (B, n_ff) bool when ready and tracked: each sequence's computed set, final already (nothing is added
    # later), so the worker runtime hands it to compute with the layer
    computed: "torch.Tensor | None" = None
    # with computed: the neurons the sequences compute beyond `ids` (their windows'), made resident when the
    # layer is prepared, not recorded as the token's
    resident: np.ndarray = field(default_factory=lambda: _NO_IDS)


@dataclass(frozen=True)
class CachedLayer:
    """Decode through the layer's neuron cache."""

    layer: int
    first: np.ndarray  # (k,) prepared as the new token's set: the lookahead's, or the same-layer set without one
    first_prepared: bool  # `first` is the lookahead's, which fitted: the worker runtime prepared it at its Lookahead
    ready_at_lookahead: bool  # the layer was handed over at its Lookahead: nothing may change it now
    late: np.ndarray  # (m,) the same-layer check's set, prepared after `first`; empty when the check is not read
    predicted: np.ndarray  # (u,) first ∪ late
    lookahead: LookaheadRead | None  # the next layer's set, to start reading while this layer computes
    # (B, n_ff) bool: the neurons each sequence computes (its own sets, its own window, pinned); None: every
    # sequence computes every cached row (SparseOptions.batch_invariant=False)
    computed: "torch.Tensor | None" = None
    # batch invariance: every neuron the sequences compute (their windows' too), made resident with `late`
    # (prepare(late, new_token=False, resident_ids=resident)) though not recorded as the token's
    resident: np.ndarray = field(default_factory=lambda: _NO_IDS)

    @property
    def num_predicted(self) -> int:
        return len(self.predicted)


@dataclass(frozen=True)
class MaskedLayer:
    """Read the whole layer; each token keeps only its own predicted neurons."""

    layer: int
    # (N, n_ff) bool: each token's same ∪ lookahead ∪ hot; in a batch-invariant decode step, its computed set
    mask: "torch.Tensor"
    num_predicted: int  # neurons any token keeps
    per_token: bool = False  # each token's sum over its own neurons alone (sums_per_token)
    # the lookahead's set when it was committed (prepared into the cache at its Lookahead) before the layer
    # fell back: the runtime that has not prepared it does, so both runtimes' caches stay alike
    committed_first: np.ndarray | None = None
    read_ids: np.ndarray | None = None  # (k,) sorted: the neurons read (masked_read_ids); None: the whole layer
    lookahead: LookaheadRead | None = None  # a decode step's: the next layer's set, to start reading


class SequenceWindows:
    """Each running sequence's own sliding window, keyed by its KV slot: per layer, the neurons its last
    window_tokens - 1 tokens computed (their own predicted sets, not the batch's union). A slot's history
    starts afresh when a new sequence starts in it."""

    def __init__(self, num_layers: int, num_neurons: int, window_tokens: int):
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1 (the paper uses 4..5), got {window_tokens}")
        self.num_layers, self.num_neurons = num_layers, num_neurons
        self.earlier_tokens = window_tokens - 1  # the newest token's own set completes the window
        self._history: dict[int, list[deque]] = {}  # slot → per layer the (n_ff,) bool sets, oldest first

    def start(self, slot: int) -> None:
        """A new sequence starts in `slot`: nothing of the slot's previous sequence counts."""
        self._history[slot] = [deque(maxlen=self.earlier_tokens) for _ in range(self.num_layers)]

    def _layer_history(self, slot: int, layer: int) -> deque:
        if slot not in self._history:
            self.start(slot)
        return self._history[slot][layer]

    def widen(self, slots: np.ndarray, layer: int, sets: torch.Tensor, capacity_rows: int) -> torch.Tensor:
        """sets (B, n_ff) bool, each slot's newest token's set (pinned included) → each widened by its earlier
        tokens' sets at `layer`, newest first, as long as the whole fits capacity_rows: what a lone sequence's
        cache holds of its window (a cache too small for the window keeps its newest tokens' neurons), decided
        from the sequence's own history alone."""
        for row, slot in enumerate(slots):
            for earlier in reversed(self._layer_history(int(slot), layer)):
                wider = sets[row] | earlier  # (n_ff,)
                if int(wider.sum()) > capacity_rows:
                    break
                sets[row] = wider
        return sets

    def record(self, slots: np.ndarray, layer: int, own: torch.Tensor) -> None:
        """own (B, n_ff) bool: each slot's newest token's own set at `layer` joins its window."""
        for row, slot in enumerate(slots):
            self._layer_history(int(slot), layer).append(own[row].clone())


def computes_window(compute_set: str, predictor: "SparsityPredictor") -> bool:
    """Whether a token's FFN sums its window's cached neurons beside its predicted ones (COMPUTE_SETS): "auto"
    does where the predictor's sets leave out nonzero contributions (predictor.leaves_out_nonzero)."""
    if compute_set not in COMPUTE_SETS:
        raise ValueError(f"compute set {compute_set!r} is not one of {', '.join(COMPUTE_SETS)}")
    return compute_set == "window" or (compute_set == "auto" and predictor.leaves_out_nonzero)


class SparseStepPlanner:
    """Decides each layer of a forward pass; holds the pass's pending lookahead sets and previous input."""

    def __init__(self, predictor: "SparsityPredictor", capacity_rows: list[int], pinned: list[np.ndarray],
                 missing_policy: str = "read", window_tokens: int = DEFAULT_WINDOW_TOKENS,
                 batch_invariant: bool = True, compute_set: str = "auto"):
        """batch_invariant: decide each sequence's own computed set (`computed`); else every sequence computes
        every cached row, the batch's union (the old rule, kept for the bench). compute_set: whether a
        sequence's computed set takes in its window's cached neurons too (computes_window)."""
        check_missing_policy(missing_policy)
        self.computes_window = computes_window(compute_set, predictor)
        self.predictor = predictor
        self.capacity_rows = capacity_rows  # per layer: the neuron cache's rows
        self.pinned = pinned  # per layer: (n_ff,) bool, the neurons that stay cached
        self.reads_late = missing_policy == "read"
        self.num_layers, self.num_neurons = predictor.num_layers, predictor.num_neurons
        self.batch_invariant = batch_invariant
        # the sequences' histories serve the window's compute alone (the cache keeps its own window of reads):
        # without it, a window of one token keeps no history
        self.windows = SequenceWindows(self.num_layers, self.num_neurons,
                                       window_tokens if self.computes_window else 1)
        self._pinned_rows = [torch.from_numpy(np.asarray(p, dtype=bool)) for p in pinned]  # (n_ff,) per layer
        self._steps = 1
        self._slots: np.ndarray | None = None  # (B,) the KV slot of each sequence of this step; None: not followed
        self._ahead: dict[int, LookaheadRead] = {}
        self._prev_h: "torch.Tensor | None" = None  # (N, d) the previous layer's FFN input

    def begin_step(self, steps: int, slots: np.ndarray | None = None, starts: np.ndarray | None = None) -> None:
        """A forward pass of `steps` new tokens per sequence starts: nothing predicted yet. slots (B,): each
        sequence's KV slot; starts (B,) bool: the sequence starts in this step (its first position is 0), so
        its slot's window history starts afresh. Without slots, the step's sequences have no history."""
        self._steps = steps
        self.predictor.begin_step(steps)
        self._ahead.clear()
        self._prev_h = None
        self._slots = None if slots is None else np.asarray(slots, dtype=np.int64)
        if slots is not None and starts is not None:
            for slot in self._slots[np.asarray(starts, dtype=bool)]:
                self.windows.start(int(slot))

    def forget_inputs(self) -> None:
        """Drop the previous layer's input, which may be a view into a buffer about to be closed."""
        self._prev_h = None

    def fits(self, layer: int, ids: np.ndarray) -> bool:
        """The cached path's rule: the first set with the pinned neurons fits the layer's cache (late
        additions take what room it leaves)."""
        return rows_needed(self.pinned[layer], ids) <= self.capacity_rows[layer]

    def runs_same_check(self, ahead: LookaheadRead | None) -> bool:
        """Without a lookahead set the same-layer set is the layer's set; with one, "skip" would leave out
        whatever the check adds, so it is not run."""
        return ahead is None or self.reads_late

    def ready_at_lookahead(self, layer: int) -> bool:
        """Layer `layer` was handed over at its lookahead (compute may run past it before it is planned)."""
        ahead = self._ahead.get(layer)
        return ahead is not None and ahead.ready

    def plan_layer(self, layer: int, h: "torch.Tensor") -> CachedLayer | MaskedLayer:
        """h (N, d): layer `layer`'s FFN input → what the runtime does for this layer."""
        if self._steps > 1:
            decision = self._plan_masked(layer, h)
        elif self.capacity_rows[layer] == 0:
            decision = self._plan_uncached(layer, h)
        else:
            decision = self._plan_decode(layer, h)
        self._prev_h = h
        return decision

    def _plan_decode(self, layer: int, h: "torch.Tensor") -> CachedLayer | MaskedLayer:
        ahead = self._ahead.pop(layer, None)
        if self._tracks_sequences():
            return self._plan_decode_own_sets(layer, h, ahead)
        if ahead is not None and not ahead.fits:
            return self._plan_masked(layer, h)  # the batch's union makes the layer nearly dense
        same_own, same = None, None
        if self.runs_same_check(ahead):
            same_own = self._predict_own("same", layer, h)  # (B, n_ff) or None
            same = _ids_of(same_own) if same_own is not None else self.predictor.predict("same", layer, h)
        first = ahead.ids if ahead is not None else same
        if ahead is None and not self.fits(layer, first):
            return self._plan_masked(layer, h)
        late = same if ahead is not None and same is not None else _NO_IDS
        if ahead is not None and ahead.computed is not None:  # decided at the lookahead (handed over there)
            computed = ahead.computed
            if self._slots is not None:
                self.windows.record(self._slots, layer, ahead.own)
        else:
            computed = self._computed(layer, _either(ahead.own if ahead is not None else None, same_own))
        return CachedLayer(
            layer=layer, first=first, first_prepared=ahead is not None,
            ready_at_lookahead=ahead is not None and ahead.ready, late=late,
            predicted=union_ids(self.num_neurons, first, late) if late.size else first,
            lookahead=self._plan_lookahead(layer + 1, h), computed=computed)

    def _plan_decode_own_sets(self, layer: int, h: "torch.Tensor", ahead: LookaheadRead | None
                              ) -> CachedLayer | MaskedLayer:
        """A decode step under batch invariance: each sequence computes exactly its computed set (its own
        predictions, its own window, the pinned), whatever else runs. The cached path needs every sequence's
        whole set in the cache: what the lookahead did not read (the same-layer check's additions, window
        neurons evicted since) is read late; when the sets do not fit, the layer is read whole (masked, each
        token summed alone)."""
        if ahead is not None and ahead.computed is not None:  # decided and handed over at the lookahead
            self.windows.record(self._slots, layer, ahead.own)
            return CachedLayer(layer=layer, first=ahead.ids, first_prepared=True, ready_at_lookahead=ahead.ready,
                               late=_NO_IDS, predicted=_ids_of(ahead.own),
                               lookahead=self._plan_lookahead(layer + 1, h), computed=ahead.computed,
                               resident=ahead.resident)
        # which predictions make a sequence's set depends only on the layer and the policy, never on what the
        # previous layer did (after a masked layer nothing read ahead, but the lookahead set still counts)
        has_lookahead = self.predictor.has("lookahead", layer) and self._prev_h is not None
        ahead_own = ahead.own if ahead is not None else \
            self._predict_own("lookahead", layer, self._prev_h) if has_lookahead else None
        same_own = self._predict_own("same", layer, h) if self.reads_late or not has_lookahead else None
        own = self._own_sets(layer, ahead_own, same_own)  # (B, n_ff)
        computed = self._computed(layer, own)  # (B, n_ff), recorded in the windows
        needed = _ids_of(computed)
        # a lookahead that did not fit was only staged: the layer is read whole, as without batch invariance
        if (ahead is not None and not ahead.fits) or not self.fits(layer, needed):
            return MaskedLayer(layer=layer, mask=computed, num_predicted=len(needed), per_token=True,
                               committed_first=ahead.ids if ahead is not None and ahead.fits else None,
                               read_ids=masked_read_ids(computed, self._steps),
                               lookahead=self._plan_lookahead(layer + 1, h))
        own_ids = _ids_of(own)
        # the tokens' own sets are recorded in the cache's window; the rest of `needed` (window neurons) is made
        # resident beside them, and making room evicts only rows no sequence computes
        return CachedLayer(layer=layer, first=ahead.ids if ahead is not None else own_ids,
                           first_prepared=ahead is not None, ready_at_lookahead=False,
                           late=own_ids if ahead is not None else _NO_IDS, predicted=own_ids,
                           lookahead=self._plan_lookahead(layer + 1, h), computed=computed, resident=needed)

    def _plan_lookahead(self, layer: int, h_before: "torch.Tensor") -> LookaheadRead | None:
        if layer >= self.num_layers or not self.predictor.has("lookahead", layer):
            return None
        own = self._predict_own("lookahead", layer, h_before)  # (B, n_ff) or None
        ids = _ids_of(own) if own is not None else self.predictor.predict("lookahead", layer, h_before)
        computed, resident = None, _NO_IDS
        if own is not None and not self.reads_late and self._tracks_sequences():
            # nothing joins the layer's sets later ("skip"): each sequence's computed set is final now, and
            # the layer is made ready for all of it (the worker runtime hands it to compute with the layer,
            # before the layer is planned)
            computed = self._computed(layer, own, record=False)  # (B, n_ff)
            resident = _ids_of(computed)
        fits = self.fits(layer, ids) and self.fits(layer, resident)
        ready = fits and not self.reads_late
        if not ready:
            computed, resident = None, _NO_IDS
        elif computed is None and own is not None:  # a step without sequence histories
            computed = self._computed(layer, own, record=False)
        read = self._ahead[layer] = LookaheadRead(layer=layer, ids=ids, fits=fits, ready=ready, own=own,
                                                  computed=computed, resident=resident)
        return read

    def _plan_masked(self, layer: int, h: "torch.Tensor") -> MaskedLayer:
        predictor = self.predictor
        mask = predictor.predict_mask("same", layer, h)  # (N, n_ff)
        if self._prev_h is not None and predictor.has("lookahead", layer):
            mask = mask | predictor.predict_mask("lookahead", layer, self._prev_h)
        hot = predictor.hot_ids[layer]
        if len(hot):
            mask[:, hot] = True
        decode = self._steps == 1
        return MaskedLayer(layer=layer, mask=mask, num_predicted=int(mask.any(0).sum()),
                           read_ids=masked_read_ids(mask, self._steps),
                           lookahead=self._plan_lookahead(layer + 1, h) if decode else None)

    def _plan_uncached(self, layer: int, h: "torch.Tensor") -> MaskedLayer:
        """A decode step's layer without a neuron cache: each token computes its same-layer set, and only the
        union of those is read (the rows its lookahead read ahead are taken from there); the next layer's
        lookahead starts reading behind it."""
        self._ahead.pop(layer, None)  # read ahead (staged), not a set of its own
        mask = self.predictor.predict_mask("same", layer, h)  # (N, n_ff)
        read_ids = masked_read_ids(mask, self._steps)
        return MaskedLayer(layer=layer, mask=mask, num_predicted=len(read_ids), per_token=self._tracks_sequences(),
                           read_ids=read_ids, lookahead=self._plan_lookahead(layer + 1, h))

    # -- each sequence's own set (batch invariance) ------------------------------

    def _tracks_sequences(self) -> bool:
        """Decode steps of sequences followed by slot, under batch invariance."""
        return sums_per_token(self.batch_invariant, self._steps, self._slots)

    def _predict_own(self, kind: str, layer: int, h: "torch.Tensor") -> "torch.Tensor | None":
        """(B, n_ff) bool, each sequence's own predicted set, when sets are tracked per sequence; else None
        (then the batch's union of ids is all that is needed)."""
        if not self.batch_invariant:
            return None
        return self.predictor.predict_mask(kind, layer, h)

    def _own_sets(self, layer: int, first: "torch.Tensor | None", late: "torch.Tensor | None") -> "torch.Tensor":
        """Each sequence's own set (B, n_ff): the same-layer check's set (`late`, which ranks the layer's own
        input and outranks the lookahead) and of the lookahead's set (`first`) as much as fits the layer's cache
        beside it and the pinned, lowest ids first, as a lone sequence's cache keeps them."""
        if first is None or late is None:
            return first if late is None else late
        own = first | late  # (B, n_ff)
        held = late | self._pinned_rows[layer]  # (B, n_ff)
        for row in range(own.shape[0]):
            over = int((own[row] | held[row]).sum()) - self.capacity_rows[layer]
            if over > 0:
                added = torch.nonzero(first[row] & ~held[row]).squeeze(1)  # (a,) ascending ids
                own[row, added[max(0, len(added) - over):]] = False
        return own

    def _computed(self, layer: int, own: "torch.Tensor | None", record: bool = True) -> "torch.Tensor | None":
        """own (B, n_ff) bool: each sequence's newest token's set → (B, n_ff) bool, the neurons each sequence
        computes: own ∪ pinned ∪ its window (only where self.computes_window); recorded in the sequences'
        windows unless `record` is False (the layer's plan records it)."""
        if own is None:
            return None
        computed = own | self._pinned_rows[layer]  # (B, n_ff)
        if self._slots is not None:
            computed = self.windows.widen(self._slots, layer, computed, self.capacity_rows[layer])
            if record:
                self.windows.record(self._slots, layer, own)
        return computed


def _either(first: "torch.Tensor | None", late: "torch.Tensor | None") -> "torch.Tensor | None":
    """The union of two (B, n_ff) bool sets, either of which may be absent."""
    if first is None:
        return late
    return first if late is None else first | late


def _ids_of(own: "torch.Tensor") -> np.ndarray:
    """(B, n_ff) bool → the sorted ids any sequence has: the batch's union, what the cache must hold."""
    return np.flatnonzero(own.any(0).numpy()).astype(np.int64)
