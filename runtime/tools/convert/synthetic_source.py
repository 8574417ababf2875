"""A model source of seeded random weights in the shape of a named model (`flashllm synth`).

It answers the same questions as the checkpoint sources in sources.py, so the
store writer plans, quantizes, bundles, checksums and renames a synthetic store
exactly as it converts a real one. Every tensor is drawn when the writer asks
for it, from a generator seeded by (seed, tensor name): memory stays at one
layer's FFN like a real conversion, and the same seed gives the same bytes
whatever order the tensors are written in.

Weights are normal with the shape's initializer std (Hugging Face's init);
norm weights are 1 and biases 0, as a freshly initialised model has them.
"""
from __future__ import annotations

import zlib

import numpy as np

from flashllm.protocol.store_format import SyntheticInfo
from flashllm.runtime.tools.convert.shapes import ModelShape
from flashllm.runtime.tools.convert.sources import (
    FLOAT_SOURCE_KIND, llama_resident_names, opt_resident_names, expected_resident_shape,
)
from flashllm.runtime.tools.convert.synthetic_tokenizer import byte_tokenizer_info, byte_tokenizer_json


class SyntheticSource:
    """Random weights of `shape`, drawn tensor by tensor from `seed`."""

    def __init__(self, shape_name: str, shape: ModelShape, seed: int):
        self.shape_name = shape_name
        self.shape = shape
        self.seed = seed
        self.arch = shape.arch()
        self.synthetic = SyntheticInfo(shape=shape_name, seed=seed, shape_source=shape.source)
        self.manifest_source = f"flashllm synth --shape {shape_name} --seed {seed}"

    def _random(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)  # shape
        values *= np.float32(self.shape.initializer_range)
        return values

    def resident_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        names = (opt_resident_names(self.arch, has_projections=False) if self.arch.family == "opt"
                 else llama_resident_names(self.arch))
        return [(name, expected_resident_shape(self.arch, name)) for name in names]

    def load_resident(self, name: str) -> np.ndarray:
        shape = expected_resident_shape(self.arch, name)
        if "_norm." in name or name.startswith("final_norm."):
            return np.zeros(shape, np.float32) if name.endswith(".bias") else np.ones(shape, np.float32)
        if name.endswith(".bias") or name.endswith("_bias"):
            return np.zeros(shape, np.float32)
        return self._random(name, shape)

    def resident_kind(self, name: str) -> str:
        return FLOAT_SOURCE_KIND

    def ffn_kind(self, layer: int, part: str) -> str:
        return FLOAT_SOURCE_KIND

    def load_ffn(self, layer: int) -> dict[str, np.ndarray]:
        d, n_ff = self.arch.hidden_size, self.arch.intermediate_size
        prefix = f"layers.{layer}.ffn_"
        parts = {"up": self._random(prefix + "up", (n_ff, d)), "down": self._random(prefix + "down", (d, n_ff))}
        if self.arch.gated_ffn:
            parts["gate"] = self._random(prefix + "gate", (n_ff, d))
        else:
            parts["up_bias"] = np.zeros((n_ff,), np.float32)
        return parts

    def tokenizer(self) -> tuple[str, dict]:
        return byte_tokenizer_json(self.arch.vocab_size), byte_tokenizer_info()
