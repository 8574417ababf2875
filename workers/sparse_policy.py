"""The sparse FFN's per-layer decisions, made in one place for both runtimes.

`SparseStepPlanner.plan_layer(l, h_l)` turns layer l's FFN input into a
decision that the in-process runtime (SparseFlashFfn) and the worker runtime
(PredictorWorker, whose messages the prefetch worker carries out) only carry
out, as vLLM's workers carry out a SchedulerOutput they did not decide:

    CachedLayer    decode through the neuron cache: prepare `first` as the new
                   token's set, then `late` (the same-layer check's set) in the
                   room it leaves; start reading `lookahead` (layer l+1's set)
    MaskedLayer    read the layer whole; each token keeps its own neurons (`mask`)

The rules, per decode step and layer l:

    ahead  = lookahead[l](h_{l-1})      predicted at layer l-1 (a LookaheadRead)
    same   = same[l](h_l)               the late check; not run under "skip" when there is an ahead
    first  = ahead, else same
    first ∪ pinned fits the cache       → cached (decided with the lookahead, so the worker runtime may
                                          prepare the layer before compute reaches it); else masked
    ahead  = lookahead[l+1](h_l)        only after a cached layer: a masked one reads every neuron anyway

Prefill and other multi-token steps take the masked path at every layer: the
per-token mask is same[l](h_l) ∪ lookahead[l](h_{l-1}) ∪ hot.

Pure: no I/O, no process knowledge; torch only through the predictor and the
tensors it returns, so the torch-free prefetch process may import the names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flashllm.workers.engine_config import MISSING_POLICIES  # read the late neurons, or skip them this token
from flashllm.workers.flash_io.neuron_cache import rows_needed
from flashllm.workers.flash_io.neuron_ids import union_ids

if TYPE_CHECKING:
    import torch

    from flashllm.workers.predictor import SparsityPredictor


_NO_IDS = np.zeros(0, np.int64)


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

    @property
    def num_predicted(self) -> int:
        return len(self.predicted)


@dataclass(frozen=True)
class MaskedLayer:
    """Read the whole layer; each token keeps only its own predicted neurons."""

    layer: int
    mask: "torch.Tensor"  # (N, n_ff) bool: each token's same ∪ lookahead ∪ hot
    num_predicted: int  # neurons any token keeps


class SparseStepPlanner:
    """Decides each layer of a forward pass; holds the pass's pending lookahead sets and previous input."""

    def __init__(self, predictor: "SparsityPredictor", capacity_rows: list[int], pinned: list[np.ndarray],
                 missing_policy: str = "read"):
        check_missing_policy(missing_policy)
        self.predictor = predictor
        self.capacity_rows = capacity_rows  # per layer: the neuron cache's rows
        self.pinned = pinned  # per layer: (n_ff,) bool, the neurons that stay cached
        self.reads_late = missing_policy == "read"
        self.num_layers, self.num_neurons = predictor.num_layers, predictor.num_neurons
        self._steps = 1
        self._ahead: dict[int, LookaheadRead] = {}
        self._prev_h: "torch.Tensor | None" = None  # (N, d) the previous layer's FFN input

    def begin_step(self, steps: int) -> None:
        """A forward pass of `steps` new tokens per sequence starts: nothing predicted yet."""
        self._steps = steps
        self.predictor.begin_step(steps)
        self._ahead.clear()
        self._prev_h = None

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
        else:
            decision = self._plan_decode(layer, h)
        self._prev_h = h
        return decision

    def _plan_decode(self, layer: int, h: "torch.Tensor") -> CachedLayer | MaskedLayer:
        ahead = self._ahead.pop(layer, None)
        if ahead is not None and not ahead.fits:
            return self._plan_masked(layer, h)  # the batch's union makes the layer nearly dense
        same = self.predictor.predict("same", layer, h) if self.runs_same_check(ahead) else None
        first = ahead.ids if ahead is not None else same
        if ahead is None and not self.fits(layer, first):
            return self._plan_masked(layer, h)
        late = same if ahead is not None and same is not None else _NO_IDS
        return CachedLayer(
            layer=layer, first=first, first_prepared=ahead is not None,
            ready_at_lookahead=ahead is not None and ahead.ready, late=late,
            predicted=union_ids(self.num_neurons, first, late) if late.size else first,
            lookahead=self._plan_lookahead(layer + 1, h))

    def _plan_lookahead(self, layer: int, h_before: "torch.Tensor") -> LookaheadRead | None:
        if layer >= self.num_layers or not self.predictor.has("lookahead", layer):
            return None
        ids = self.predictor.predict("lookahead", layer, h_before)
        fits = self.fits(layer, ids)
        read = self._ahead[layer] = LookaheadRead(layer=layer, ids=ids, fits=fits, ready=fits and not self.reads_late)
        return read

    def _plan_masked(self, layer: int, h: "torch.Tensor") -> MaskedLayer:
        predictor = self.predictor
        mask = predictor.predict_mask("same", layer, h)  # (N, n_ff)
        if self._prev_h is not None and predictor.has("lookahead", layer):
            mask = mask | predictor.predict_mask("lookahead", layer, self._prev_h)
        hot = predictor.hot_ids[layer]
        if len(hot):
            mask[:, hot] = True
        return MaskedLayer(layer=layer, mask=mask, num_predicted=int(mask.any(0).sum()))
