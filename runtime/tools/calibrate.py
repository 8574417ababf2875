"""`flashllm calibrate`: sparsity labels, predictors and hot neurons, written into the store.

1. Run the dense model over calibration text, recording per layer the FFN input
   h_l (N, d); each neuron's activation a = act(gate·h)·(up·h) (N, n_ff) is
   recomputed from it one layer at a time (memory: N·d per layer, not N·n_ff).
2. Labels: ReLU models use a > 0 (exact zeros); SwiGLU models use |a| > t_l,
   with t_l the per-layer quantile that reaches the target sparsity (CATS-style).
3. Predictors per layer: `same` on h_l and `lookahead` on h_{l-1} (so the
   next layer's reads can start early), of the `--predictor` type (see
   workers/predictor.py): `sketch` (default for SwiGLU) stores the layer's
   gate/up at 4 bits, one sketch serving both inputs, nothing to train;
   `regression` fits the rank-r least-squares map to the neurons' gate and up
   pre-activations; `classifier` (default for ReLU models) trains d → r → n_ff
   with a ReLU on the labels, with a loss balanced between active and inactive
   neurons (the paper's).
4. Hot neurons (active on at least `hot_fraction` of tokens) are pinned in memory.
5. Report recall/precision of the predicted top-k on held-out tokens.
6. Per-layer sensitivity: the held-out loss of the model with only layer l
   sparse (each token keeps its same-layer predictor's top-k), for every l,
   carried along the same loop over the layers as steps 2-5, on the rows it
   has read (see _LayerSensitivity), gives each layer's loss increase. A
   layer far more sensitive than the rest stays dense: every neuron pinned,
   so it is read once and never predicted away (docs/benchmarks.md,
   "calibrate's layer sensitivity", has what it kept on the demo model).
7. Write sparsity.safetensors and the manifest's `sparsity` section.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from flashllm.protocol.store_format import SPARSITY_FILE, SparsityInfo, sha256_hex, write_manifest
from flashllm.workers.executor import ModelExecutor, default_device
from flashllm.workers.ffn_providers import rows_to_tensor
from flashllm.workers.flash_io.bundle_reader import BundleReader
from flashllm.workers.interfaces import FfnProvider
from flashllm.workers.models.ffn import BundleColumns, ffn_from_rows, masked_ffn_from_rows, neuron_activations
from flashllm.workers.predictor import (
    DEFAULT_TARGET_SPARSITY, PREDICTOR_TYPES, SKETCH_BITS, SKETCH_GROUP, LowRankPredictor, SketchPredictor,
    default_predictor_type, lookahead_input_map, predictor_tensor_names, quantize_sketch, sketch_tensor_names,
    top_k_mask,
)
from flashllm.workers.store_reader import bundle_rows_as_float, layer_table, load_down_group_scales, open_store

CALIBRATION_WINDOW_TOKENS = 512
# rank r of d → r → n. On a SwiGLU model the rank decides quality: a low rank loses the neurons a layer
# needs (docs/benchmarks.md, "Figures moved out of the code", has the demo model's perplexity by rank)
DEFAULT_RANKS = {"classifier": 64, "regression": 128}
HOLDOUT_FRACTION = 0.1
SENSITIVITY_MAX_TOKENS = 512  # held-out tokens in the sensitivity pass (one model per layer)
# `--dense-layers auto`: a layer stays dense when making it alone sparse raises the held-out loss by more
# than DENSE_LAYER_FACTOR × the median layer's increase and by more than DENSE_LAYER_MIN_NATS, for at most
# MAX_DENSE_LAYER_SHARE of the layers (the most sensitive first): the budget must still go mostly to caches
DENSE_LAYER_FACTOR = 5.0
DENSE_LAYER_MIN_NATS = 0.05
MAX_DENSE_LAYER_SHARE = 0.125


class _RecordingFfn(FfnProvider):
    """Wraps the dense FFN provider and records each layer's input."""

    def __init__(self, dense_ffn, num_layers: int):
        self.inner = dense_ffn
        self.stats = dense_ffn.stats
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def begin_step(self, batch: int, steps: int, slots=None, starts=None) -> None:
        self.inner.begin_step(batch, steps, slots, starts)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        self.inputs[layer].append(h.float().cpu())
        return self.inner.forward(layer, h)

    def close(self) -> None:
        self.inner.close()


def _available_memory_bytes(device: str) -> int:
    """Memory free for new tensors on `device`: the GPU's free memory, or the kernel's MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ffn_fits_in_memory(store_dir: str, manifest, device: str, share: float = 0.5) -> bool:
    """Whether the FFN as --mode dense holds it (the memory plan's neuron-cache part) takes at most `share` of
    the free memory.

    When it does, calibration's forward passes hold it (mode dense); when not (the models this
    runtime is for), they stream each layer from flash (mode naive), as generation does.
    """
    from flashllm.workers.engine_config import EngineConfig
    from flashllm.workers.memory_plan import MemoryInputs, plan_memory_for

    dense = MemoryInputs.from_config(manifest, EngineConfig(mode="dense", device=device, max_batch=1))
    return plan_memory_for(store_dir, manifest, dense).cache_bytes <= share * _available_memory_bytes(device)


def _train_predictor(x: torch.Tensor, labels: torch.Tensor, rank: int, epochs: int, seed: int,
                     batch_size: int = 256, lr: float = 2e-3) -> LowRankPredictor:
    """x (N, d), labels (N, n_ff) bool → a d → rank → n_ff predictor trained with a balanced BCE loss."""
    generator = torch.Generator().manual_seed(seed)
    d, n_ff = x.shape[1], labels.shape[1]
    layer1 = torch.nn.Linear(d, rank)
    layer2 = torch.nn.Linear(rank, n_ff)
    with torch.no_grad():
        for lin in (layer1, layer2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) / math.sqrt(lin.in_features))
            lin.bias.zero_()
    params = list(layer1.parameters()) + list(layer2.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    positive_rate = labels.float().mean().clamp(1e-4, 1 - 1e-4)
    # balanced: active and inactive neurons weigh the same in total (the paper's balanced loss)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(1 - positive_rate) / positive_rate)
    x_mean = x.mean(0)
    targets = labels.float()
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            logits = layer2(torch.relu(layer1(x[idx] - x_mean)))  # (b, n_ff)
            loss = loss_fn(logits, targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        # fold the input centering into the first bias: w1 (x - mean) + b1 = w1 x + (b1 - w1 mean)
        b1 = layer1.bias - layer1.weight @ x_mean
        return LowRankPredictor(layer1.weight.detach().clone(), b1.detach().clone(),
                                layer2.weight.detach().clone(), layer2.bias.detach().clone())


def _fit_regression(x: torch.Tensor, targets: torch.Tensor, rank: int, gated: bool,
                    directions: torch.Tensor | None = None) -> LowRankPredictor:
    """Reduced-rank least squares: x (N, d), targets (N, m) → the rank-r linear map x → targets with the least
    squared error, as d → r → m. Closed form: ridge OLS W, then the top-r right singular directions V of the
    fitted values X W (= Q (R W) with X = Q R, so only an (d+1, m) SVD), giving X W V Vᵀ.
    directions (m, r): use these output directions instead (the lookahead predictor shares the same-layer one's,
    whose (m, r) matrix is most of a predictor's bytes); the map is then the least-squares one within them."""
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()  # (N, d+1): the last column fits the bias
    _, r_factor = torch.linalg.qr(xb)  # (d+1, d+1)
    gram = r_factor.T @ r_factor  # (d+1, d+1) = Xᵀ X
    ridge = 1e-6 * gram.diagonal().mean()  # keeps the solve well posed for rarely used input directions
    weights = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), xb.T @ targets.double())
    if directions is None:
        _, _, vh = torch.linalg.svd(r_factor @ weights, full_matrices=False)
        directions = vh[:rank].T  # (m, r), orthonormal columns
    directions = directions.double()
    first = weights @ directions  # (d+1, r): with orthonormal V, X W V Vᵀ is X W projected onto V
    return LowRankPredictor(first[:-1].T.float().contiguous(), first[-1].float().contiguous(),
                            directions.float().contiguous(), torch.zeros(targets.shape[1]),
                            predictor_type="regression", gated=gated)


def _pre_activations(h: torch.Tensor, rows: torch.Tensor, cols: BundleColumns) -> torch.Tensor:
    """h (N, d) → what a regression predictor learns: [gate | up] (N, 2 n_ff), or up + bias (N, n_ff) for ReLU."""
    if cols.gated:
        return torch.cat([h @ rows[:, cols.gate].T, h @ rows[:, cols.up].T], dim=1)
    return h @ rows[:, cols.up].T + rows[:, cols.up_bias].T


def _sketch_predictor(rows: torch.Tensor, cols: BundleColumns, layer: int, tensors: dict) -> SketchPredictor:
    """The layer's gate/up (ReLU: up and its bias) at 4 bits, stored into tensors, as the predictor holds it."""
    weight = torch.cat([rows[:, cols.gate], rows[:, cols.up]]) if cols.gated else rows[:, cols.up]  # (m, d)
    codes, scales = quantize_sketch(weight)
    names = sketch_tensor_names(layer)
    tensors[names["codes"]], tensors[names["scales"]] = codes, scales
    bias = None
    if not cols.gated:
        bias = tensors[names["bias"]] = rows[:, cols.up_bias].reshape(-1).float().contiguous()  # (n_ff,)
    return SketchPredictor.hold(codes, scales, cols.gated, bias)


def _sketch_lookahead(same: SketchPredictor, norms: list, layer: int, tensors: dict) -> SketchPredictor:
    """Layer `layer`'s sketch scoring from layer-1's FFN input, through the map between the two norms."""
    names = sketch_tensor_names(layer)
    scale, shift = lookahead_input_map(*norms[layer - 1], *norms[layer])
    tensors[names["input_scale"]], tensors[names["input_shift"]] = scale, shift
    return same.ahead(scale, shift)


def _fit_low_rank(predictor_type: str, h: torch.Tensor, previous_input: torch.Tensor | None, rows: torch.Tensor,
                  cols: BundleColumns, labels: torch.Tensor, rank: int, epochs: int, seed: int, layer: int,
                  tensors: dict) -> tuple[LowRankPredictor, LowRankPredictor | None]:
    """h (N, d) training inputs of this layer, previous_input (N, d) of the layer before (None for layer 0),
    labels (N, n_ff) → the same-layer and lookahead low-rank predictors, stored into tensors."""
    targets = _pre_activations(h, rows, cols) if predictor_type == "regression" else None

    def fit(inputs: torch.Tensor, fit_seed: int, directions: torch.Tensor | None = None) -> LowRankPredictor:
        if targets is not None:
            return _fit_regression(inputs, targets, rank, cols.gated, directions)
        return _train_predictor(inputs, labels, rank, epochs, fit_seed)

    same = fit(h, seed + layer)
    for name, value in zip(predictor_tensor_names(layer, "same"), (same.w1, same.b1, same.w2, same.b2)):
        tensors[name] = value.contiguous()
    if previous_input is None:
        return same, None
    # regression: the lookahead maps into the same-layer predictor's output directions (shared w2)
    ahead = fit(previous_input, seed + 1000 + layer, same.w2 if targets is not None else None)
    for name, value in zip(predictor_tensor_names(layer, "lookahead"), (ahead.w1, ahead.b1, ahead.w2, ahead.b2)):
        if targets is not None and name.endswith(".w2"):
            continue  # the shared directions are stored once, under "same"
        tensors[name] = value.contiguous()
    return same, ahead


def _top_k_quality(predictor: LowRankPredictor | SketchPredictor, x: torch.Tensor, labels: torch.Tensor,
                   keep: int) -> tuple[float, float]:
    """Recall and precision of each token's top-`keep` predicted set against its labels."""
    with torch.no_grad():
        predicted = top_k_mask(predictor.scores(x), keep)  # (N, n_ff)
    true_positive = (predicted & labels).sum().item()
    return true_positive / max(1, labels.sum().item()), true_positive / max(1, predicted.sum().item())


class _LayerSensitivity:
    """Per layer l: the mean loss (nats/token) on token_ids with only layer l sparse (each token keeps its
    same-layer predictor's top-k), minus the dense model's.

    Computed layer by layer, not model by model: the model with only layer l sparse equals the dense one
    below l, so at layer j the dense hidden states and those of the models made sparse at layers < j are
    carried on together, from the rows calibrate has just read for layer j's labels and predictor (one model
    per layer read the whole FFN L+1 times, from flash when it does not fit in memory). The executor of the
    forward passes lends its resident model and KV cache; about half the layers are computed."""

    def __init__(self, executor: ModelExecutor, cols: BundleColumns, token_ids: list[int], keep: int):
        self.model, self.kv, self.device, self.dtype = executor.model, executor.kv, executor.device, executor.dtype
        self.cols, self.keep, self.steps = cols, keep, len(token_ids)
        ids = torch.tensor([token_ids], device=self.device)  # (1, T)
        positions = torch.arange(self.steps, device=self.device)[None]  # (1, T)
        self.step = self.model.step_inputs(torch.tensor([0], device=self.device), positions)
        self.targets = torch.tensor(token_ids[1:])
        with torch.inference_mode():
            self.dense = self.model.embed(ids, positions)  # (1, T, d)
        self.sparse_at: list[torch.Tensor] = []  # [l]: hidden states of the model with only layer l sparse

    def _attention(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # every model overwrites the same slot's keys/values of this layer with its own whole sequence
        x = self.model.attention(layer, x, self.step, self.kv)  # (1, T, d)
        return x, self.model.ffn_input(layer, x).reshape(self.steps, -1)  # (T, d)

    def advance(self, layer: int, rows: torch.Tensor, predictor: LowRankPredictor | SketchPredictor) -> None:
        """Carry every model through layer `layer` (called for 0, 1, ... in order), rows (n_ff, E) its FFN."""
        model, cols = self.model, self.cols
        with torch.inference_mode():
            rows = rows.to(device=self.device, dtype=self.dtype)  # (n_ff, E)
            for index, x in enumerate(self.sparse_at):
                x, h = self._attention(layer, x)
                self.sparse_at[index] = model.ffn_residual(layer, x, ffn_from_rows(h, rows, cols).reshape(x.shape))
            x, h = self._attention(layer, self.dense)
            mask = top_k_mask(predictor.scores(h.float().cpu()), self.keep).to(self.device)  # (T, n_ff)
            sparse = masked_ffn_from_rows(h, rows, cols, mask).reshape(x.shape)
            self.sparse_at.append(model.ffn_residual(layer, x, sparse))
            self.dense = model.ffn_residual(layer, x, ffn_from_rows(h, rows, cols).reshape(x.shape))

    def increases(self) -> list[float]:
        def loss(x: torch.Tensor) -> float:
            logits = self.model.logits(x).float().cpu()[0, :-1]  # (T-1, V)
            return float(torch.nn.functional.cross_entropy(logits, self.targets))

        with torch.inference_mode():
            dense_loss = loss(self.dense)
            return [loss(x) - dense_loss for x in self.sparse_at]


def choose_dense_layers(increases: list[float]) -> list[int]:
    """`--dense-layers auto`: the layers whose loss increase, made sparse alone, stands far above the median
    layer's (DENSE_LAYER_FACTOR, DENSE_LAYER_MIN_NATS), most sensitive first, at most MAX_DENSE_LAYER_SHARE."""
    bar = max(DENSE_LAYER_FACTOR * float(np.median(increases)), DENSE_LAYER_MIN_NATS)
    outliers = sorted((layer for layer, increase in enumerate(increases) if increase > bar),
                      key=lambda layer: -increases[layer])
    return sorted(outliers[: max(1, int(MAX_DENSE_LAYER_SHARE * len(increases)))])


def calibrate(store_dir: str, text: str, max_tokens: int = 8192, sparsity: float = DEFAULT_TARGET_SPARSITY,
              rank: int | None = None, epochs: int = 12, hot_fraction: float = 0.9, seed: int = 0,
              progress: bool = True, log=print, predictor_type: str | None = None, ffn_in_memory: bool | None = None,
              dense_layers: str | list[int] = "auto") -> SparsityInfo:
    """ffn_in_memory: hold the whole FFN during the forward passes (faster) or stream it from flash layer by
    layer; None decides by the free memory (ffn_fits_in_memory). dense_layers: "auto" (by measured
    sensitivity, see choose_dense_layers) or the layers to keep whole ([] for none)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity {sparsity} must be in [0, 1)")
    manifest = open_store(store_dir)
    arch = manifest.arch
    if dense_layers != "auto":
        bad = [layer for layer in dense_layers if not 0 <= layer < arch.num_hidden_layers]
        if bad:
            raise ValueError(f"--dense-layers: layer {bad[0]} out of range: the model has {arch.num_hidden_layers} "
                             f"layers (0..{arch.num_hidden_layers - 1})")
    relu = arch.hidden_act == "relu"
    predictor_type = predictor_type or default_predictor_type(arch)
    if predictor_type not in PREDICTOR_TYPES:
        raise ValueError(f"--predictor {predictor_type!r} is not one of {', '.join(PREDICTOR_TYPES)}")
    if predictor_type == "sketch":
        if arch.hidden_size % SKETCH_GROUP:
            raise ValueError(f"--predictor sketch needs a hidden size that is a multiple of {SKETCH_GROUP} "
                             f"(this model: {arch.hidden_size}); use --predictor regression")
        if rank is not None:
            raise ValueError("--rank sets a low-rank predictor's rank; the sketch is full rank at 4 bits "
                             "(leave --rank out, or use --predictor regression or classifier)")
        rank = arch.hidden_size
    rank = rank if rank is not None else DEFAULT_RANKS[predictor_type]
    if rank < 1:
        raise ValueError(f"--rank {rank} must be ≥ 1")
    if predictor_type == "regression":
        rank = min(rank, arch.hidden_size + 1)  # d + 1 directions (with the bias) already give the exact map
    from flashllm.runtime.core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_store(store_dir, manifest.tokenizer, arch.eos_token_ids)
    ids = tokenizer.encode(text)[:max_tokens]
    min_tokens = 64
    if len(ids) < min_tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens; give at least {min_tokens} "
                         "(thousands are better: predictor recall grows with calibration tokens)")
    window = min(CALIBRATION_WINDOW_TOKENS, arch.max_position_embeddings)
    if ffn_in_memory is None:
        ffn_in_memory = ffn_fits_in_memory(store_dir, manifest, default_device())
    if not ffn_in_memory:
        log("the FFN does not fit in memory: the calibration passes read it from flash layer by layer")
    executor = ModelExecutor(store_dir, manifest, "dense" if ffn_in_memory else "naive", num_slots=1,
                             max_context=window)
    recorder = _RecordingFfn(executor.ffn, arch.num_hidden_layers)
    executor.ffn = recorder
    started = time.perf_counter()
    for start in tqdm(range(0, len(ids), window), desc="calibrate: forward passes", disable=not progress,
                      file=sys.stderr):
        chunk = ids[start:start + window]
        executor.forward(torch.tensor([chunk]), torch.tensor([0]), torch.arange(len(chunk))[None])

    num_tokens = len(ids)
    holdout = max(1, int(num_tokens * HOLDOUT_FRACTION))
    train = slice(0, num_tokens - holdout)
    held = slice(num_tokens - holdout, num_tokens)
    cols = recorder.inner.cols
    # each layer's FFN norm (weight, bias): the sketch's lookahead maps layer l-1's FFN input through them
    norms = [tuple(None if t is None else t.float().cpu() for t in executor.model.ffn_norm_affine(layer))
             for layer in range(arch.num_hidden_layers)]
    # frees the FFN held for the forward passes; the resident model and KV cache stay, lent to the sensitivity
    # pass (loading them again would re-read and re-verify every resident weight)
    executor.close()

    down_scales = load_down_group_scales(store_dir, manifest)

    def layer_rows(layer: int) -> torch.Tensor:
        # the store's rows, one layer at a time, in float32 on the CPU beside the recorded inputs (labels
        # and fits run there whatever device ran the forward passes)
        with BundleReader(store_dir, manifest.ffn) as reader:
            raw = reader.read_layer(layer)
            rows = bundle_rows_as_float(manifest.ffn, raw, layer_table(down_scales, layer), np.arange(raw.shape[0]))
            return rows_to_tensor(rows, torch.float32, "cpu", copy=True)  # (n_ff, E)

    def layer_activations(rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([neuron_activations(h[i:i + 4096], rows, cols)
                          for i in range(0, len(h), 4096)])  # (N, n_ff)

    if relu:
        # ReLU zeros are exact: size top-k by the data, the 90th percentile of a token's active count
        counts = torch.cat([(layer_activations(layer_rows(layer), torch.cat(recorder.inputs[layer])) > 0)
                            .sum(1).float() for layer in range(arch.num_hidden_layers)])
        sparsity = 1.0 - float(torch.quantile(counts, 0.9)) / arch.intermediate_size
    keep = max(1, int(round((1.0 - sparsity) * arch.intermediate_size)))
    tensors: dict[str, torch.Tensor] = {}
    thresholds, recall, precision, same_recall = [], [], [], []
    previous_input = None
    sensitivity_ids = ids[num_tokens - holdout:][:min(window, SENSITIVITY_MAX_TOKENS)]
    # the sensitivity pass advances with the loop, on the rows it reads
    sensitivity = _LayerSensitivity(executor, cols, sensitivity_ids, keep)
    for layer in tqdm(range(arch.num_hidden_layers), desc="calibrate: predictors, sensitivity",
                      disable=not progress, file=sys.stderr):
        h = torch.cat(recorder.inputs[layer])  # (N, d)
        recorder.inputs[layer] = []
        rows = layer_rows(layer)  # (n_ff, E) read once: labels, predictor and the sensitivity pass
        activations = layer_activations(rows, h)  # (N, n_ff)
        if relu:
            threshold = 0.0
            labels = activations > 0
        else:
            magnitude = activations.abs()
            # per-layer threshold on |a| reaching the target sparsity (sampled quantile: torch caps its
            # input size)
            flat = magnitude.flatten()
            order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
            sample = flat[order[:4_000_000]]
            threshold = float(torch.quantile(sample, sparsity)) if sparsity > 0 else 0.0
            labels = magnitude > threshold
        thresholds.append(threshold)
        frequency = labels.float().mean(0)  # (n_ff,)
        hot = torch.nonzero(frequency >= hot_fraction).flatten().to(torch.int32)
        tensors[f"layers.{layer}.hot_ids"] = hot
        tensors[f"layers.{layer}.frequency"] = frequency

        if predictor_type == "sketch":
            same = _sketch_predictor(rows, cols, layer, tensors)
            ahead = None if previous_input is None else _sketch_lookahead(same, norms, layer, tensors)
        else:
            previous_train = None if previous_input is None else previous_input[train]
            same, ahead = _fit_low_rank(predictor_type, h[train], previous_train, rows, cols, labels[train], rank,
                                        epochs, seed, layer, tensors)
        sensitivity.advance(layer, rows, same)
        r_same, _ = _top_k_quality(same, h[held], labels[held], keep)
        same_recall.append(r_same)
        if ahead is not None:
            r_ahead, p_ahead = _top_k_quality(ahead, previous_input[held], labels[held], keep)
        else:
            r_ahead, p_ahead = _top_k_quality(same, h[held], labels[held], keep)
        recall.append(r_ahead)
        precision.append(p_ahead)
        log(f"layer {layer:3d}: threshold {threshold:.4f}  hot {len(hot):4d}  "
            f"recall lookahead {r_ahead:.3f} same-layer {r_same:.3f}  precision {p_ahead:.3f}")
        previous_input = h
    increases = sensitivity.increases()
    if dense_layers == "auto":
        dense_layers = choose_dense_layers(increases)
    dense_layers = sorted(set(dense_layers))
    for layer in dense_layers:
        tensors[f"layers.{layer}.hot_ids"] = torch.arange(arch.intermediate_size, dtype=torch.int32)
    median = float(np.median(increases))
    log(f"layer sensitivity on {len(sensitivity_ids)} held-out tokens (loss increase with one layer sparse, "
        f"nats/token): median {median:.3f}, largest {max(increases):.3f} (layer {int(np.argmax(increases))}); "
        + (f"kept dense (every neuron pinned): layers {', '.join(map(str, dense_layers))}" if dense_layers
           else "no layer kept dense"))

    from safetensors.torch import save_file

    path = os.path.join(store_dir, SPARSITY_FILE)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(path, "rb") as f:
        digest = sha256_hex(f.read())
    info = SparsityInfo(file=SPARSITY_FILE, sha256=digest, target_sparsity=sparsity, rank=rank,
                        label="relu>0" if relu else "|act(gate)*up|>threshold", thresholds=thresholds,
                        calibration_tokens=num_tokens - holdout, recall=recall, precision=precision,
                        same_layer_recall=same_recall, predictor=predictor_type,
                        layer_loss_increase=increases, dense_layers=dense_layers)
    manifest.sparsity = info
    write_manifest(store_dir, manifest)
    kind = (f"{SKETCH_BITS}-bit gate/up sketches" if predictor_type == "sketch"
            else f"{predictor_type} predictors, rank {rank}")
    log(f"calibrated {arch.num_hidden_layers} layers ({kind}) on {num_tokens - holdout} tokens "
        f"(+{holdout} held out) in "
        f"{time.perf_counter() - started:.0f} s; mean held-out recall {np.mean(recall):.3f} (lookahead), "
        f"{np.mean(same_recall):.3f} (same-layer) at {keep}/{arch.intermediate_size} neurons kept")
    return info


SELF_TEXT_PROMPTS = [
    "Write a short news report about a new bridge opening in a European city.",
    "Explain how a refrigerator works to a curious child.",
    "Tell a short story about a sailor who finds a mysterious island.",
    "Summarize the causes of the French Revolution.",
    "Give advice to someone starting to learn the piano.",
    "Describe the water cycle in simple terms.",
    "Write a product review of a pair of running shoes.",
    "What are the benefits and risks of social media for teenagers?",
    "Explain the difference between a virus and a bacterium.",
    "Write a letter to a friend describing your summer holiday.",
    "How do airplanes stay in the air?",
    "Describe a busy market in the morning.",
]


def generate_calibration_text(store_dir: str, num_tokens: int, seed: int = 0, progress: bool = True) -> str:
    """Text the model writes itself (sampled answers to varied prompts): calibration data when the user has little."""
    from flashllm.runtime.core.engine import Engine
    from flashllm.runtime.core.sampling import SamplingParams

    texts = []
    per_prompt = max(32, num_tokens // len(SELF_TEXT_PROMPTS))
    mode = "dense" if ffn_fits_in_memory(store_dir, open_store(store_dir), default_device()) else "naive"
    with Engine(store_dir, mode=mode, max_batch=len(SELF_TEXT_PROMPTS)) as engine:
        messages = [[{"role": "user", "content": p}] for p in SELF_TEXT_PROMPTS]
        params = SamplingParams(max_tokens=per_prompt, temperature=0.8, top_p=0.95, seed=seed)
        for result in engine.generate(messages, params):
            texts.append(result.text)
    return "\n\n".join(texts)


def cmd_calibrate(args) -> int:
    text = ""
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    if args.generate_tokens:
        text = text + "\n\n" + generate_calibration_text(args.store, args.generate_tokens, args.seed, not args.quiet)
    if not text:
        raise ValueError("give --text FILE and/or --generate-tokens N (text the model writes itself)")
    calibrate(args.store, text, max_tokens=args.tokens, sparsity=args.sparsity, rank=args.rank, epochs=args.epochs,
              hot_fraction=args.hot_fraction, seed=args.seed, progress=not args.quiet, predictor_type=args.predictor,
              dense_layers=args.dense_layers)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("calibrate", help="train sparsity predictors and record thresholds in a store")
    p.add_argument("--store", required=True)
    p.add_argument("--text", help="calibration text file (thousands of tokens)")
    p.add_argument("--generate-tokens", type=int, default=0,
                   help="add this many tokens of text the model writes itself (when you have little text)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens to use (10%% held out)")
    p.add_argument("--sparsity", type=float, default=DEFAULT_TARGET_SPARSITY,
                   help="target fraction of inactive neurons per layer")
    p.add_argument("--predictor", choices=list(PREDICTOR_TYPES), default=None,
                   help="sketch (the layer's gate/up at 4 bits; default for SwiGLU), regression (rank-r "
                        "least-squares map to gate/up pre-activations) or classifier (rank-r ReLU MLP with a "
                        "balanced BCE, the paper's; default for ReLU models)")
    p.add_argument("--rank", type=int, default=None,
                   help="low-rank predictor rank r (default 128 regression, 64 classifier)")
    p.add_argument("--epochs", type=int, default=12, help="classifier training epochs")
    p.add_argument("--hot-fraction", type=float, default=0.9, help="pin neurons active on at least this fraction")
    p.add_argument("--dense-layers", type=_dense_layers_arg, default="auto", metavar="auto|none|L1,L2,...",
                   help="layers kept whole in memory (every neuron pinned): auto (default) keeps those far more "
                        "sensitive to sparsity than the rest, measured on held-out tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def _dense_layers_arg(value: str) -> str | list[int]:
    if value == "auto":
        return value
    if value == "none":
        return []
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or comma-separated layer numbers, got {value!r}") \
            from None
