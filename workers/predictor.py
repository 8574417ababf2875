"""Sparsity prediction: per-layer predictors that guess a token's active FFN neurons.

Two predictors per layer, fitted by `flashllm calibrate`:

    lookahead[l]   input: the FFN input of layer l-1, so layer l's neurons can be
                   read from flash while layer l-1 still computes (layer 0 has
                   none: its input is the embedding, too early to be useful)
    same[l]        input: the FFN input of layer l itself, the late check that
                   catches what the lookahead missed

Each is of one of three types (SparsityInfo.predictor):

    sketch         the layer's own gate and up matrices (ReLU: up and its bias),
                   held at 4 bits with a scale per 32 weights: full rank, low
                   precision. Scored by the approximate contribution
                   |act(gate·x)·(up·x)|. The lookahead is the same sketch behind
                   the map from layer l-1's norm to layer l's (the residual stream
                   they normalize differs only by layer l's attention), so one
                   sketch per layer serves both. It takes about the bytes of a
                   rank-128 float16 regression pair and keeps far more of the
                   dense model's quality (docs/benchmarks.md, "Figures moved out
                   of the code").
    regression     linear d → r → [gate | up] pre-activations (reduced-rank least
                   squares, closed form), scored like the sketch. The lookahead
                   maps into the same-layer predictor's output directions: that
                   (n_out, r) matrix, most of a predictor's bytes, is held once.
    classifier     d → r → n_ff with a ReLU in the middle, one logit per neuron,
                   trained with the paper's balanced BCE on active/inactive
                   labels (Deja Vu); the default for ReLU models.

A predicted set is the top-k neurons by score for each token (the union over a
batch), k = keep_fraction × n_ff: a fixed k bounds the bytes a token can ask
for, which is what the memory plan is sized by. Low-rank predictor weights are
held in float16 (a ranking needs no more), multiplied as resident matrices are.

`PredictorWorker` is the predictor process's core (hidden states from shared
memory in, neuron ids out), `run_predictor()` its process entry.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.protocol.messages import (
    PATH_CACHED, PATH_MASKED, ROLE_COMPUTE, ROLE_PREDICTOR, ROLE_PREFETCH, Dispatcher, FfnInput, Lookahead,
    Prediction, PredictionStats, StepBegin, StepFailed,
)
from flashllm.protocol.shm import SharedSegment
from flashllm.protocol.store_format import Manifest, StoreError, calibrate_hint
from flashllm.workers.engine_config import SparseOptions
from flashllm.workers.flash_io.neuron_cache import DEFAULT_WINDOW_TOKENS
from flashllm.workers.flash_io.neuron_ids import union_ids
from flashllm.workers.models.resident import linear
from flashllm.workers.process_entry import WorkerConfig, run_worker
from flashllm.workers.sparse_policy import (
    CachedLayer, LookaheadRead, MaskedLayer, SparseStepPlanner, keep_fraction_of, keep_neurons_of,
)

PREDICTOR_KINDS = ("lookahead", "same")
PREDICTOR_TYPES = ("sketch", "regression", "classifier")
DEFAULT_TARGET_SPARSITY = 0.5  # calibrate's --sparsity: the fraction of a layer's neurons a token leaves out
PREDICTOR_WEIGHTS_DTYPE = torch.float16
SKETCH_BITS = 4
SKETCH_GROUP = 32  # weights per scale: the smallest group the CPU int4 kernel takes
_SKETCH_LEVELS = 2 ** SKETCH_BITS  # codes 0..15 stand for (code - 8) × scale
# CPU kernel for x (bfloat16) @ int4 weights with a scale per group (torch ≥ 2.5); without it the
# sketch is held dequantized in float16
_INT4_CPU_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_INT4_ROWS_MULTIPLE = 16  # the kernel's packing wants the output rows in multiples of 16


@dataclass
class LowRankPredictor:
    w1: torch.Tensor  # (r, d)
    b1: torch.Tensor  # (r,)
    w2: torch.Tensor  # (n_out, r): n_ff logits (classifier), 2·n_ff [gate | up] or n_ff up (regression)
    b2: torch.Tensor  # (n_out,)
    predictor_type: str = "classifier"
    gated: bool = True

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff): higher means more likely active / larger contribution."""
        hidden = linear(x, self.w1, self.b1)  # (N, r)
        if self.predictor_type == "classifier":
            return linear(torch.relu(hidden), self.w2, self.b2)  # (N, n_ff) logits
        return contribution_scores(linear(hidden, self.w2, self.b2), self.gated)  # from predicted pre-activations


def contribution_scores(pre: torch.Tensor, gated: bool) -> torch.Tensor:
    """pre (N, m): [gate | up] pre-activations (ReLU: up + bias) → (N, n_ff) ranking of the neurons'
    contribution, |act(gate)·up|."""
    if not gated:
        return pre  # relu is monotone: ranking by up + bias is ranking by relu(up + bias), without ties
    gate, up = pre.chunk(2, dim=-1)  # (N, n_ff) each
    return (F.silu(gate) * up).abs()


def quantize_sketch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (m, d) → codes (m, d/2) uint8 (two 4-bit codes a byte, the even column low) and scales
    (m, d/SKETCH_GROUP) float16: symmetric, w ≈ (code - 8) × scale. The store's portable form."""
    m, d = weight.shape
    if d % SKETCH_GROUP:
        raise ValueError(f"a {SKETCH_BITS}-bit sketch needs the hidden size to be a multiple of {SKETCH_GROUP}, "
                         f"got {d}")
    groups = weight.float().reshape(m, d // SKETCH_GROUP, SKETCH_GROUP)  # (m, d/g, g)
    half = _SKETCH_LEVELS // 2
    scales = (groups.abs().amax(-1, keepdim=True) / (half - 1)).to(torch.float16).float()  # (m, d/g, 1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (torch.round(groups / safe).clamp(-half, half - 1) + half).to(torch.uint8).reshape(m, d)  # (m, d)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales.reshape(m, -1).to(torch.float16)


def _sketch_codes(packed: torch.Tensor) -> torch.Tensor:
    """(m, d/2) uint8 → (m, d) int32 codes 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def dequantize_sketch(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_sketch's output → (m, d) float32 weights."""
    codes = _sketch_codes(packed).float() - _SKETCH_LEVELS // 2  # (m, d)
    return (codes.reshape(scales.shape[0], scales.shape[1], -1) * scales.float()[..., None]).reshape(codes.shape)


@dataclass
class SketchPredictor:
    """Scores neurons with the layer's own gate/up (ReLU: up + bias) at 4 bits; see the module docstring."""

    weight: torch.Tensor  # CPU int4 kernel's packing (m_padded, d/2) uint8; or (m, d) float16 without the kernel
    scales_and_zeros: torch.Tensor | None  # (d/g, m_padded, 2) bfloat16 for the kernel
    num_out: int  # m: 2 n_ff ([gate | up]) or n_ff (ReLU up)
    bias: torch.Tensor | None = None  # (n_ff,) ReLU up bias
    gated: bool = True
    input_scale: torch.Tensor | None = None  # (d,) lookahead: layer l-1's FFN input → layer l's, x·scale + shift
    input_shift: torch.Tensor | None = None  # (d,)

    @staticmethod
    def hold(packed: torch.Tensor, scales: torch.Tensor, gated: bool, bias: torch.Tensor | None = None
             ) -> "SketchPredictor":
        """The store's codes and scales → the form the CPU kernel multiplies (or float16 without it)."""
        m = packed.shape[0]
        if not _INT4_CPU_KERNEL:
            return SketchPredictor(dequantize_sketch(packed, scales).to(PREDICTOR_WEIGHTS_DTYPE), None, m, bias, gated)
        padded = -m % _INT4_ROWS_MULTIPLE
        codes = F.pad(_sketch_codes(packed), (0, 0, 0, padded), value=_SKETCH_LEVELS // 2)  # (m_padded, d)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (m_padded, d/2)
        group_scales = F.pad(scales.float(), (0, 0, 0, padded)).T  # (d/g, m_padded)
        scales_and_zeros = torch.stack([group_scales, torch.zeros_like(group_scales)], dim=-1)  # (d/g, m_padded, 2)
        return SketchPredictor(weight, scales_and_zeros.to(torch.bfloat16).contiguous(), m, bias, gated)

    def ahead(self, input_scale: torch.Tensor, input_shift: torch.Tensor) -> "SketchPredictor":
        """The same held sketch, scoring from the previous layer's FFN input (the lookahead)."""
        return SketchPredictor(self.weight, self.scales_and_zeros, self.num_out, self.bias, self.gated,
                               input_scale, input_shift)

    def held_bytes(self) -> int:
        tensors = (self.weight, self.scales_and_zeros, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, m) float32: [gate | up] (ReLU: up + bias) with the 4-bit weights."""
        if self.input_scale is not None:
            x = x * self.input_scale + self.input_shift
        if self.scales_and_zeros is None:
            pre = linear(x.float(), self.weight)
        else:
            pre = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, SKETCH_GROUP,
                                                             self.scales_and_zeros)[:, :self.num_out].float()
        return pre if self.bias is None else pre + self.bias  # (N, m)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff): the neuron's approximate contribution (ReLU: up pre-activation)."""
        return contribution_scores(self.pre_activations(x), self.gated)


def sketch_tensor_names(layer: int) -> dict[str, str]:
    p = f"layers.{layer}."
    return {"codes": p + "sketch.codes", "scales": p + "sketch.scales", "bias": p + "sketch.bias",
            "input_scale": p + "lookahead.input_scale", "input_shift": p + "lookahead.input_shift"}


def lookahead_input_map(prev_weight: torch.Tensor | None, prev_bias: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map from layer l-1's FFN input to what layer l's norm makes of the same residual stream.

    Both norms normalize the residual stream and then apply their own weight (and bias): undoing l-1's and
    applying l's gives layer l's input up to what layer l's attention adds in between. (d,) scale and shift;
    a norm without weight counts as ones, without bias as zeros; a zero weight of l-1 maps to l's bias."""
    d = next(t for t in (weight, prev_weight, bias, prev_bias) if t is not None).shape[0]
    ones, zeros = torch.ones(d), torch.zeros(d)
    w_prev = ones if prev_weight is None else prev_weight.float()
    w = ones if weight is None else weight.float()
    b_prev = zeros if prev_bias is None else prev_bias.float()
    b = zeros if bias is None else bias.float()
    nonzero = w_prev.abs() > 1e-12
    scale = torch.where(nonzero, w / torch.where(nonzero, w_prev, ones), zeros)  # (d,)
    return scale, b - b_prev * scale


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (N, n) → (N, n) bool: True at each row's k highest scores."""
    top = torch.topk(scores, k, dim=-1).indices  # (N, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def predictor_tensor_names(layer: int, kind: str) -> list[str]:
    return [f"layers.{layer}.{kind}.{part}" for part in ("w1", "b1", "w2", "b2")]


def load_sparsity_tensors(store_dir: str, manifest: Manifest) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if manifest.sparsity is None:
        raise StoreError(calibrate_hint(store_dir))
    path = os.path.join(store_dir, manifest.sparsity.file)
    if not os.path.isfile(path):
        raise StoreError(f"{path}: missing; re-run `flashllm calibrate`")
    try:
        # copied out of the file's mapping, whose cached pages are then dropped: the predictors are held in
        # forms of their own (packed, float16), and the mapped file would be a second copy (store_reader)
        tensors = {name: tensor.clone() for name, tensor in load_file(path).items()}
    except Exception as exc:  # safetensors raises its own types on a corrupt header
        raise StoreError(f"{path}: unreadable ({exc}); re-run `flashllm calibrate`") from exc
    from flashllm.workers.store_reader import drop_file_cache

    drop_file_cache(path)
    return tensors


def default_predictor_type(arch) -> str:
    """What `flashllm calibrate` trains without --predictor: the paper's classifier for ReLU models (exact zeros
    it learns well); the 4-bit sketch for SwiGLU models, where low-rank predictors miss too many neurons, when
    the kernel's groups fit d."""
    if arch.hidden_act == "relu":
        return "classifier"
    return "sketch" if arch.hidden_size % SKETCH_GROUP == 0 else "regression"


def _sketch_matrix_bytes(rows: int, half_d: int, groups: int) -> int:
    """What SparsityPredictor holds of one sketch matrix (rows, 2·half_d): as the int4 kernel packs it (codes,
    bfloat16 scale and zero per group), else dequantized in PREDICTOR_WEIGHTS_DTYPE."""
    if _INT4_CPU_KERNEL:
        rows += -rows % _INT4_ROWS_MULTIPLE
        return rows * half_d + groups * rows * 2 * 2
    return rows * 2 * half_d * (torch.finfo(PREDICTOR_WEIGHTS_DTYPE).bits // 8)


def estimated_sketch_bytes(arch, vector_itemsize: int) -> int:
    """What a sketch predictor will hold for a model before `calibrate` makes it (every layer sketched): its
    gate and up (ReLU: up and its bias) at 4 bits and the lookahead's input maps; predictor_held_bytes of what
    calibrate writes, but for the layers calibrate keeps dense (a few, which hold no predictor)."""
    d, n_ff = arch.hidden_size, arch.intermediate_size
    gated = arch.hidden_act != "relu"
    rows, vectors = (2 * n_ff, 2 * d) if gated else (n_ff, n_ff + 2 * d)  # (ReLU: the up bias)
    return arch.num_hidden_layers * (_sketch_matrix_bytes(rows, d // 2, d // SKETCH_GROUP) +
                                     vectors * vector_itemsize)


def predictor_held_bytes(tensors: dict[str, torch.Tensor], predictor_type: str, num_layers: int,
                         vector_itemsize: int) -> int:
    """Bytes SparsityPredictor holds for these stored tensors (the memory plan's predictor share): low-rank
    matrices in PREDICTOR_WEIGHTS_DTYPE, sketches as the int4 kernel packs them, vectors in vector_itemsize."""
    weight_itemsize = torch.finfo(PREDICTOR_WEIGHTS_DTYPE).bits // 8
    total = 0
    for layer in range(num_layers):
        if predictor_type == "sketch":
            names = sketch_tensor_names(layer)
            if names["codes"] not in tensors:
                continue
            rows, half_d = tensors[names["codes"]].shape
            total += _sketch_matrix_bytes(rows, half_d, tensors[names["scales"]].shape[1])
            vectors = [names[key] for key in ("bias", "input_scale", "input_shift")]
        else:
            names = [name for kind in PREDICTOR_KINDS for name in predictor_tensor_names(layer, kind)
                     if name in tensors]
            total += sum(tensors[name].numel() * weight_itemsize for name in names if tensors[name].dim() == 2)
            vectors = [name for name in names if tensors[name].dim() == 1]
        total += sum(tensors[name].numel() * vector_itemsize for name in vectors if name in tensors)
    return total


def require_predictors(store_dir: str, manifest: Manifest, options: SparseOptions | None) -> None:
    """--mode sparse needs the store's calibrated predictors, or a trace to replay in their place."""
    if manifest.sparsity is None and (options is None or options.trace is None):
        raise StoreError(calibrate_hint(store_dir))


def load_predictor(store_dir: str, manifest: Manifest, options: SparseOptions) -> "SparsityPredictor":
    """The sparse FFN's predictor, in both runtimes: the store's calibrated one, or a trace's (--trace), which
    serves the same interface (workers/trace_predictor.py)."""
    if options.trace is not None:
        from flashllm.workers.trace_predictor import TracePredictor

        return TracePredictor(manifest, options.trace, options.window_tokens)
    return SparsityPredictor(store_dir, manifest, keep_fraction=options.keep_fraction)


class SparsityPredictor:
    """The predictor worker's core: hidden states in, predicted neuron ids out."""

    def __init__(self, store_dir: str, manifest: Manifest, keep_fraction: float | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        tensors = load_sparsity_tensors(store_dir, manifest)
        self.num_layers = manifest.arch.num_hidden_layers
        self.num_neurons = manifest.arch.intermediate_size
        sparsity = manifest.sparsity
        self.keep_fraction = keep_fraction_of(keep_fraction, sparsity.target_sparsity)
        self.keep_neurons = keep_neurons_of(keep_fraction, sparsity.target_sparsity, self.num_neurons)
        self.predictors: dict[tuple[str, int], LowRankPredictor | SketchPredictor] = {}
        gated = manifest.arch.hidden_act != "relu"
        # a calibrated threshold on a gated (SwiGLU) FFN leaves out neurons whose contributions are small, not
        # zero; a ReLU FFN's left-out neurons are zeros, but for the predictor's misses
        self.leaves_out_nonzero = gated
        for layer in range(self.num_layers):
            if sparsity.predictor == "sketch":
                self._hold_sketch(tensors, layer, gated, dtype)
            else:
                self._hold_low_rank(tensors, layer, sparsity.predictor, gated, device, dtype)
        self.hot_ids = [tensors[f"layers.{layer}.hot_ids"].numpy().astype(np.int64)
                        if f"layers.{layer}.hot_ids" in tensors else np.zeros(0, np.int64)
                        for layer in range(self.num_layers)]
        self.dtype, self.device = dtype, device

    def _hold_sketch(self, tensors: dict[str, torch.Tensor], layer: int, gated: bool, dtype: torch.dtype) -> None:
        names = sketch_tensor_names(layer)
        if names["codes"] not in tensors:
            raise StoreError(f"layer {layer}: the sketch predictor is missing from the store; "
                             "re-run `flashllm calibrate`")
        bias = tensors[names["bias"]].to(dtype) if names["bias"] in tensors else None
        same = SketchPredictor.hold(tensors[names["codes"]], tensors[names["scales"]], gated, bias)
        self.predictors[("same", layer)] = same
        if names["input_scale"] in tensors:
            self.predictors[("lookahead", layer)] = same.ahead(tensors[names["input_scale"]].to(dtype),
                                                               tensors[names["input_shift"]].to(dtype))

    def _hold_low_rank(self, tensors: dict[str, torch.Tensor], layer: int, predictor_type: str, gated: bool,
                       device: str, dtype: torch.dtype) -> None:
        held: dict[str, torch.Tensor] = {}
        for kind in ("same", "lookahead"):  # same first: a regression lookahead shares its w2
            names = predictor_tensor_names(layer, kind)
            if names[0] not in tensors:
                continue
            parts = []
            for name in names:
                if name not in tensors and name.endswith(".w2"):
                    parts.append(held[f"layers.{layer}.same.w2"])  # shared output directions, held once
                    continue
                held[name] = tensors[name].to(
                    device=device, dtype=PREDICTOR_WEIGHTS_DTYPE if tensors[name].dim() == 2 else dtype)
                parts.append(held[name])
            self.predictors[(kind, layer)] = LowRankPredictor(*parts, predictor_type=predictor_type, gated=gated)

    def begin_step(self, steps: int) -> None:
        """A forward pass starts (a trace moves on here; a calibrated predictor has nothing to do)."""

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.predictors

    def predict(self, kind: str, layer: int, x: torch.Tensor) -> np.ndarray:
        """x (N, d): N tokens (a batch's rows) → sorted unique neuron ids, union of each token's top-k."""
        with torch.inference_mode():
            logits = self.predictors[(kind, layer)].scores(x.to(device=self.device, dtype=self.dtype))  # (N, n_ff)
            if self.keep_neurons >= self.num_neurons:
                return np.arange(self.num_neurons, dtype=np.int64)
            top = torch.topk(logits, self.keep_neurons, dim=-1).indices  # (N, k)
        return union_ids(self.num_neurons, top.cpu().numpy().reshape(-1))

    def predict_mask(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff) bool: each token's own top-k (no union), for per-token masked compute."""
        with torch.inference_mode():
            logits = self.predictors[(kind, layer)].scores(x.to(device=self.device, dtype=self.dtype))  # (N, n_ff)
            return top_k_mask(logits, min(self.keep_neurons, self.num_neurons))


class PredictorWorker:
    """The predictor process's core: plans each layer (workers/sparse_policy.py) and sends the decision on.

    StepBegin           reset the step (forwarded to the prefetcher, same pipe so it arrives first)
    FfnInput(l)         h_l from hidden[l % 2] → the planner's decision for layer l:
                          cached: Prediction(cached, first, late) to the prefetcher (none when the layer was
                          handed over at its Lookahead), then Lookahead(l+1) so layer l+1's reads start now
                          masked: the per-token mask into the mask buffer, Prediction(masked)
                        and PredictionStats(l) to compute
    """

    def __init__(self, predictor: SparsityPredictor, hidden: np.ndarray, mask: np.ndarray, capacity_rows: list[int],
                 pinned: list[np.ndarray], channel, missing_policy: str = "read", computed: np.ndarray | None = None,
                 window_tokens: int = DEFAULT_WINDOW_TOKENS, batch_invariant: bool = True,
                 compute_set: str = "auto"):
        """computed: the shared (2, max_tokens, n_ff) buffer of each sequence's computed neurons (cached path)."""
        self.predictor = predictor
        self.hidden, self.mask = hidden, mask  # (2, max_tokens, d), (max_tokens, n_ff) shared memory
        self.computed = computed  # (2, max_tokens, n_ff) shared memory
        self.planner = SparseStepPlanner(predictor, capacity_rows, pinned, missing_policy, window_tokens,
                                         batch_invariant, compute_set)
        self.channel = channel
        self.step, self.steps = -1, 1
        self._carry_out = {CachedLayer: self._send_cached, MaskedLayer: self._send_masked}
        self.dispatcher = Dispatcher({StepBegin: self.on_step_begin, FfnInput: self._guarded_ffn_input},
                                     owner="the predictor worker")

    @staticmethod
    def from_config(config: WorkerConfig, channel) -> "PredictorWorker":
        from flashllm.workers.store_reader import open_store

        torch.set_num_threads(config.predictor_threads)
        manifest = open_store(config.store_dir)
        predictor = load_predictor(config.store_dir, manifest, config.sparse)
        exchange = SharedSegment.attach(config.instance, config.exchange_layout)
        pinned = [np.zeros(predictor.num_neurons, dtype=bool) for _ in predictor.hot_ids]  # (n_ff,) per layer
        if config.sparse.pin_hot:
            for mask, ids in zip(pinned, predictor.hot_ids):
                mask[ids] = True
        worker = PredictorWorker(predictor, exchange.arrays["hidden"], exchange.arrays["mask"], config.capacity_rows,
                                 pinned, channel, config.sparse.missing_policy, exchange.arrays["computed"],
                                 config.sparse.window_tokens, config.sparse.batch_invariant,
                                 config.sparse.compute_set)
        worker._segment = exchange
        return worker

    def info(self) -> dict:
        return {"keep_neurons": self.predictor.keep_neurons, "torch_threads": torch.get_num_threads()}

    def on_step_begin(self, msg: StepBegin) -> None:
        self.step, self.steps = msg.step, msg.steps
        slots = msg.slots if len(msg.slots) else None  # a StepBegin without them: sequences without history
        self.planner.begin_step(msg.steps, slots, np.asarray(msg.starts, dtype=bool) if slots is not None else None)
        self.channel.send(ROLE_PREFETCH, msg)

    def _guarded_ffn_input(self, msg: FfnInput) -> None:
        try:
            self.on_ffn_input(msg)
        except Exception as exc:  # the step fails (compute is told), the worker stays up
            self.channel.send(ROLE_COMPUTE, StepFailed(step=msg.step, role=ROLE_PREDICTOR,
                                                       error=f"{type(exc).__name__}: {exc}"))

    def on_ffn_input(self, msg: FfnInput) -> None:
        if msg.step != self.step:
            return
        start = time.perf_counter()
        h = torch.from_numpy(self.hidden[msg.buffer, : msg.num_tokens])  # (N, d), valid until LayerReady(l+1)
        if self.steps == 1 and self.planner.ready_at_lookahead(msg.layer):
            # layer l is already handed over: l+1's reads are the only thing anybody waits for. Once they are
            # done compute may run on and overwrite hidden[l % 2] with h_{l+2}, while the planner holds h_l
            h = h.clone()  # (N, d)
        with torch.inference_mode():  # as inside ModelExecutor.forward
            decision = self.planner.plan_layer(msg.layer, h)
            self._carry_out[type(decision)](msg, decision)
        self.channel.send(ROLE_COMPUTE, PredictionStats(step=msg.step, layer=msg.layer,
                                                        predicted=decision.num_predicted,
                                                        predict_s=time.perf_counter() - start))

    def _write_computed(self, layer: int, computed: "torch.Tensor | None") -> None:
        """Each sequence's computed neurons (B, n_ff) of `layer` into computed[layer % 2], before the message
        that leads to the layer's LayerReady: compute reads them with the layer."""
        if computed is not None:
            self.computed[layer % 2, : computed.shape[0]] = computed.numpy()  # (B, n_ff)

    def _send_cached(self, msg: FfnInput, decision: CachedLayer) -> None:
        if not decision.ready_at_lookahead:  # else the prefetcher may not change the layer any more
            self._write_computed(decision.layer, decision.computed)  # compute reads it after LayerReady(l)
            self.channel.send(ROLE_PREFETCH, Prediction(
                step=msg.step, layer=decision.layer, path=PATH_CACHED, first=decision.first, same=decision.late,
                first_committed=decision.first_prepared, resident=decision.resident))
        self._send_lookahead(msg, decision.lookahead)

    def _send_masked(self, msg: FfnInput, decision: MaskedLayer) -> None:
        self.mask[: msg.num_tokens] = decision.mask.numpy()  # (N, n_ff)
        self.channel.send(ROLE_PREFETCH, Prediction(
            step=msg.step, layer=decision.layer, path=PATH_MASKED,
            read_ids=decision.read_ids if decision.read_ids is not None else np.zeros(0, np.int64)))
        self._send_lookahead(msg, decision.lookahead)

    def _send_lookahead(self, msg: FfnInput, ahead: LookaheadRead | None) -> None:
        """Layer l+1's lookahead, after layer l's Prediction (the prefetcher carries out l's first)."""
        if ahead is not None:
            # handed over at its Lookahead: compute may reach layer l+1 before it is planned. It is at layer l
            # now (it sent FfnInput(l) after layer l-1's FFN), so buffer (l+1) % 2 is free
            self._write_computed(ahead.layer, ahead.computed)
            self.channel.send(ROLE_PREFETCH, Lookahead(step=msg.step, layer=ahead.layer, ids=ahead.ids,
                                                       commit=ahead.fits, ready=ahead.ready, resident=ahead.resident))

    def close(self) -> None:
        self.hidden, self.mask, self.computed = None, None, None
        self.planner.forget_inputs()  # a view into the hidden states would keep the segment from closing
        segment = getattr(self, "_segment", None)
        if segment is not None:
            segment.close()


def run_predictor(config: WorkerConfig) -> None:
    """Process entry of the predictor worker."""
    run_worker(ROLE_PREDICTOR, config, PredictorWorker.from_config)
