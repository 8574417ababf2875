"""A predictor that replays an activation trace (workers/activation_trace.py) through the predictor interface.

The sparse step planner (workers/sparse_policy.py) asks it what it asks a
calibrated SparsityPredictor: `predict(kind, layer, x)`, `predict_mask(...)`,
`has(...)`, `hot_ids`, `keep_neurons`. So the reader, window cache, memory plan
and both runtimes run exactly as with a real predictor; only the ids come from
the trace. Row r of a pass of T tokens is token r % T of sequence r // T (the
executor flattens (B, T, d) row-major); each sequence is one trace stream.

So that ms/token includes what prediction costs, every call also runs a
random low-rank predictor of the paper's rank on the input (d → r → n_ff in
float16, as calibrated low-rank predictors are held) and discards its scores;
the memory plan counts its bytes (`trace_predictor_held_bytes`).
"""
from __future__ import annotations

import numpy as np
import torch

from flashllm.protocol.store_format import Manifest
from flashllm.workers.activation_trace import ActivationTrace, TraceSpec
from flashllm.workers.flash_io.neuron_ids import union_ids
from flashllm.workers.models.resident import linear

TRACE_PREDICTOR_RANK = 128  # the paper's low-rank predictors for OPT-6.7B
_WEIGHTS_DTYPE = torch.float16  # as calibrated low-rank predictors are held (workers/predictor.py)


def trace_predictor_held_bytes(manifest: Manifest) -> int:
    """What TracePredictor holds: per layer (r, d) and (n_ff, r) float16 matrices and float32 biases."""
    arch = manifest.arch
    rank = min(TRACE_PREDICTOR_RANK, arch.hidden_size)
    matrices = rank * arch.hidden_size + arch.intermediate_size * rank
    return arch.num_hidden_layers * (matrices * 2 + (rank + arch.intermediate_size) * 4)


class TracePredictor:
    """Serves an ActivationTrace's sets as a SparsityPredictor serves its predictions."""

    def __init__(self, manifest: Manifest, spec: TraceSpec, window_tokens: int):
        arch = manifest.arch
        self.num_layers, self.num_neurons = arch.num_hidden_layers, arch.intermediate_size
        self.trace = ActivationTrace(spec, self.num_layers, self.num_neurons, window_tokens)
        self.keep_neurons = self.trace.max_active
        self.keep_fraction = self.keep_neurons / self.num_neurons
        self.hot_ids = [np.zeros(0, np.int64) for _ in range(self.num_layers)]  # the trace pins nothing
        self.leaves_out_nonzero = False  # a trace's sets are the neurons each token uses (the paper's ReLU zeros)
        rank = min(TRACE_PREDICTOR_RANK, arch.hidden_size)
        generator = torch.Generator().manual_seed(spec.seed)
        scale_in, scale_out = arch.hidden_size ** -0.5, rank ** -0.5
        # (r, d), (r,), (n_ff, r), (n_ff,) per layer: the arithmetic of a calibrated low-rank predictor
        self.weights = [((torch.randn(rank, arch.hidden_size, generator=generator) * scale_in).to(_WEIGHTS_DTYPE),
                         torch.zeros(rank),
                         (torch.randn(self.num_neurons, rank, generator=generator) * scale_out).to(_WEIGHTS_DTYPE),
                         torch.zeros(self.num_neurons))
                        for _ in range(self.num_layers)]
        self._first_token, self._steps = 0, 0

    def begin_step(self, steps: int) -> None:
        """A forward pass of `steps` new tokens per sequence starts: the trace moves on by the last pass's."""
        self._first_token += self._steps
        self._steps = steps
        self.trace.forget_before(self._first_token)

    def has(self, kind: str, layer: int) -> bool:
        return kind == "same" or layer > 0  # layer 0's input is the embedding: no lookahead, as calibrated

    def predict(self, kind: str, layer: int, x: torch.Tensor) -> np.ndarray:
        """x (N, d) → sorted unique ids: the union of the N rows' trace sets."""
        self._charge(layer, x)
        return union_ids(self.num_neurons, *self._row_sets(layer, x.shape[0]))

    def predict_mask(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff) bool: each row's own trace set."""
        self._charge(layer, x)
        mask = torch.zeros(x.shape[0], self.num_neurons, dtype=torch.bool)  # (N, n_ff)
        for row, ids in enumerate(self._row_sets(layer, x.shape[0])):
            mask[row, torch.from_numpy(ids)] = True
        return mask

    def _row_sets(self, layer: int, rows: int) -> list[np.ndarray]:
        steps = max(1, self._steps)
        return [self.trace.active_ids(layer, row // steps, self._first_token + row % steps) for row in range(rows)]

    def _charge(self, layer: int, x: torch.Tensor) -> None:
        """Runs the low-rank predictor on x and drops its (N, n_ff) scores: the cost a real one would add."""
        w1, b1, w2, b2 = self.weights[layer]
        with torch.inference_mode():
            linear(torch.relu(linear(x.float(), w1, b1)), w2, b2)  # (N, n_ff)
