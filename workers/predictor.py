"""Sparsity prediction: low-rank per-layer predictors that guess a token's active FFN neurons.

Two predictors per layer, both d → r → n_ff with a ReLU in between (Deja Vu /
"LLM in a flash"), trained by `flashllm calibrate`:

    lookahead[l]   input: the FFN input of layer l-1, so layer l's neurons can be
                   read from flash while layer l-1 still computes (layer 0 has
                   none: its input is the embedding, too early to be useful)
    same[l]        input: the FFN input of layer l itself, the late check that
                   catches what the lookahead missed

A predicted set is the top-k neurons by predictor logit for each token (the
union over a batch), k = keep_fraction × n_ff: a fixed k bounds the bytes a
token can ask for, which is what the memory plan is sized by.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from protocol.store_format import Manifest, StoreError

PREDICTOR_KINDS = ("lookahead", "same")


@dataclass
class LowRankPredictor:
    w1: torch.Tensor  # (r, d)
    b1: torch.Tensor  # (r,)
    w2: torch.Tensor  # (n_ff, r)
    b2: torch.Tensor  # (n_ff,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff)."""
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))


def predictor_tensor_names(layer: int, kind: str) -> list[str]:
    return [f"layers.{layer}.{kind}.{part}" for part in ("w1", "b1", "w2", "b2")]


def load_sparsity_tensors(store_dir: str, manifest: Manifest) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if manifest.sparsity is None:
        raise StoreError(f"{store_dir}: no predictors; run `flashllm calibrate --store {store_dir} --text FILE`")
    path = os.path.join(store_dir, manifest.sparsity.file)
    if not os.path.isfile(path):
        raise StoreError(f"{path}: missing; re-run `flashllm calibrate`")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own types on a corrupt header
        raise StoreError(f"{path}: unreadable ({exc}); re-run `flashllm calibrate`") from exc


class SparsityPredictor:
    """The predictor worker's core: hidden states in, predicted neuron ids out."""

    def __init__(self, store_dir: str, manifest: Manifest, keep_fraction: float | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        tensors = load_sparsity_tensors(store_dir, manifest)
        self.num_layers = manifest.arch.num_hidden_layers
        self.num_neurons = manifest.arch.intermediate_size
        sparsity = manifest.sparsity
        if keep_fraction is None:
            keep_fraction = 1.0 - sparsity.target_sparsity
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep fraction {keep_fraction} must be in (0, 1] (sparsity in [0, 1))")
        self.keep_fraction = keep_fraction
        self.keep_neurons = max(1, int(round(keep_fraction * self.num_neurons)))
        self.predictors: dict[tuple[str, int], LowRankPredictor] = {}
        for layer in range(self.num_layers):
            for kind in PREDICTOR_KINDS:
                names = predictor_tensor_names(layer, kind)
                if names[0] not in tensors:
                    continue
                self.predictors[(kind, layer)] = LowRankPredictor(
                    *(tensors[n].to(device=device, dtype=dtype) for n in names))
        self.hot_ids = [tensors[f"layers.{layer}.hot_ids"].numpy().astype(np.int64)
                        if f"layers.{layer}.hot_ids" in tensors else np.zeros(0, np.int64)
                        for layer in range(self.num_layers)]
        self.dtype, self.device = dtype, device

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.predictors

    def predict(self, kind: str, layer: int, x: torch.Tensor) -> np.ndarray:
        """x (N, d): N tokens (a batch's rows) → sorted unique neuron ids, union of each token's top-k."""
        with torch.inference_mode():
            logits = self.predictors[(kind, layer)].logits(x.to(device=self.device, dtype=self.dtype))  # (N, n_ff)
            if self.keep_neurons >= self.num_neurons:
                return np.arange(self.num_neurons, dtype=np.int64)
            top = torch.topk(logits, self.keep_neurons, dim=-1).indices  # (N, k)
        return np.unique(top.cpu().numpy().astype(np.int64))

    def predict_mask(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) → (N, n_ff) bool: each token's own top-k (no union), for per-token masked compute."""
        with torch.inference_mode():
            logits = self.predictors[(kind, layer)].logits(x.to(device=self.device, dtype=self.dtype))  # (N, n_ff)
            mask = torch.zeros_like(logits, dtype=torch.bool)
            top = torch.topk(logits, min(self.keep_neurons, self.num_neurons), dim=-1).indices  # (N, k)
            return mask.scatter_(1, top, True)

    def num_bytes(self) -> int:
        return sum(p.num_bytes() for p in self.predictors.values())
