"""The flash store's on-disk format: manifest, file names and FFN byte layout.

A store is a directory made once per model by `flashllm convert`:

    STORE/
      manifest.json           this module's `Manifest`, as JSON
      resident.safetensors    embeddings, attention, norms, head, FFN biases
      ffn.bin                 the FFN as per-neuron bundles, one region per layer
      tokenizer.json          a `tokenizers` tokenizer
      sparsity.safetensors    predictors and hot-neuron masks (after `calibrate`)

ffn.bin layout (every layer region starts on an ALIGNMENT_BYTES boundary, so a
whole layer can be read with one aligned direct read; inside a region the
bundles are packed back to back, so any neuron range [a, b) is one contiguous
byte range that an aligned read can cover with at most one extra block per end):

    layer l region @ layers[l].offset_bytes, num_neurons * bundle_bytes long:
      neuron 0: [gate_0 (d) | up_0 (d) | down_0 (d)]     gated FFN (SwiGLU)
      neuron 1: ...
    or for non-gated FFNs (OPT, ReLU):
      neuron i: [up_i (d) | down_i (d) | up_bias_i (1)]

`gate_i`/`up_i` are rows of the gate/up projections (n_ff, d); `down_i` is
column i of the down projection (d, n_ff), stored contiguously. Neuron ids
in bundles are positions in the store; when calibrate reorders neurons the
permutation from store position to original neuron id is kept in
`ffn.layers[l].neuron_order` (None means identity). The layout depends on the
order only through the weights, so the model computes the same function.

Pure Python + numpy: every process (and the client library) may import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "flashllm-store"
FORMAT_VERSION = 1
ALIGNMENT_BYTES = 4096

MANIFEST_FILE = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
TOKENIZER_FILE = "tokenizer.json"
SPARSITY_FILE = "sparsity.safetensors"

DTYPE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

GATED_BUNDLE_PARTS = ("gate", "up", "down")
RELU_BUNDLE_PARTS = ("up", "down", "up_bias")


class StoreError(Exception):
    """A store is missing, corrupt, truncated or of a format this build cannot read."""


def align_up(n_bytes: int, alignment: int = ALIGNMENT_BYTES) -> int:
    return (n_bytes + alignment - 1) // alignment * alignment


def align_down(n_bytes: int, alignment: int = ALIGNMENT_BYTES) -> int:
    return n_bytes // alignment * alignment


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ArchConfig:
    """Architecture of the model, with Hugging Face field names where they exist."""

    family: str  # "llama" (llama, mistral, qwen2, smollm) or "opt"
    hidden_size: int
    intermediate_size: int  # n_ff: FFN neurons per layer
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    hidden_act: str  # "silu" (gated SwiGLU) or "relu"
    gated_ffn: bool
    tie_word_embeddings: bool
    norm_eps: float
    rope_theta: float = 10000.0
    attention_bias: bool = False  # qkv bias (qwen2)
    do_layer_norm_before: bool = True  # OPT pre-LN (all but opt-350m)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    source_model_type: str = ""  # llama, mistral, qwen2, opt, gguf:llama


@dataclass
class FfnLayerRegion:
    offset_bytes: int
    length_bytes: int
    num_neurons: int
    sha256: str
    neuron_order: list[int] | None = None


@dataclass
class FfnLayout:
    file: str
    dtype: str
    alignment_bytes: int
    bundle_parts: list[tuple[str, int]]  # (name, elements) in storage order
    bundle_bytes: int
    file_bytes: int
    layers: list[FfnLayerRegion]
    bundle_checksums: str | None = None  # file of per-bundle xxh3-64 digests checked on every read (flash_io/integrity)

    def part_slices(self) -> dict[str, slice]:
        """Element slices of each part inside one bundle row."""
        slices, start = {}, 0
        for name, elements in self.bundle_parts:
            slices[name] = slice(start, start + elements)
            start += elements
        return slices

    @property
    def bundle_elements(self) -> int:
        return sum(elements for _, elements in self.bundle_parts)

    @property
    def total_bundle_bytes(self) -> int:
        return sum(region.length_bytes for region in self.layers)


@dataclass
class TokenizerInfo:
    file: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool


@dataclass
class SparsityInfo:
    """Written by `calibrate`: what the sparse FFN path needs."""

    file: str
    sha256: str
    target_sparsity: float
    rank: int  # low-rank predictors: r; the sketch: the hidden size (full rank)
    label: str  # "relu>0" or "contribution>threshold"
    thresholds: list[float]  # per layer, |contribution| threshold (0 for relu)
    calibration_tokens: int
    recall: list[float]  # held-out, lookahead predictor, per layer
    precision: list[float]
    same_layer_recall: list[float] = field(default_factory=list)
    predictor: str = "classifier"  # "sketch", "regression" or "classifier"; see workers/predictor.py
    # per layer: held-out loss increase (nats/token) when that layer alone is sparse at the target sparsity
    layer_loss_increase: list[float] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)  # kept whole in memory (every neuron pinned as hot)


@dataclass
class Manifest:
    arch: ArchConfig
    dtype: str
    ffn: FfnLayout
    resident_file: str
    resident_sha256: dict[str, str]  # tensor name -> sha256 of its raw bytes
    tokenizer: TokenizerInfo
    source: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    sparsity: SparsityInfo | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @staticmethod
    def from_json(text: str, where: str = MANIFEST_FILE) -> "Manifest":
        try:
            raw: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{where}: not valid JSON ({exc}); re-run `flashllm convert`") from exc
        if raw.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not a flashllm store manifest (format={raw.get('format')!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{where}: store format version {raw.get('format_version')} but this flashllm reads "
                f"version {FORMAT_VERSION}; re-run `flashllm convert` with this version"
            )
        try:
            ffn = dict(raw["ffn"])
            ffn["layers"] = [FfnLayerRegion(**region) for region in ffn["layers"]]
            ffn["bundle_parts"] = [(name, int(n)) for name, n in ffn["bundle_parts"]]
            sparsity = raw.get("sparsity")
            return Manifest(
                arch=ArchConfig(**raw["arch"]),
                dtype=raw["dtype"],
                ffn=FfnLayout(**ffn),
                resident_file=raw["resident_file"],
                resident_sha256=dict(raw["resident_sha256"]),
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                source=raw["source"],
                sparsity=SparsityInfo(**sparsity) if sparsity else None,
            )
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{where}: manifest field missing or malformed ({exc!r}); re-run `flashllm convert`") from exc


def read_manifest(store_dir: str) -> Manifest:
    path = os.path.join(store_dir, MANIFEST_FILE)
    if not os.path.isdir(store_dir):
        raise StoreError(f"{store_dir}: no such store directory; create one with `flashllm convert SRC --out {store_dir}`")
    if not os.path.isfile(path):
        raise StoreError(f"{path}: missing; {store_dir} is not a flashllm store (make one with `flashllm convert`)")
    with open(path, encoding="utf-8") as f:
        return Manifest.from_json(f.read(), where=path)


def write_manifest(store_dir: str, manifest: Manifest) -> None:
    """Atomically replace the manifest (write a temp file, then rename)."""
    path = os.path.join(store_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def calibrate_hint(store_dir: str) -> str:
    """What to run before --mode sparse on a store without predictors (every refusal says the same)."""
    return (f"{store_dir}: no predictors in this store; --mode sparse needs them. Run "
            f"`flashllm calibrate --store {store_dir} --text FILE` (FILE: a few thousand tokens of text like "
            f"yours), or with no text at hand `flashllm calibrate --store {store_dir} --generate-tokens 4000`")
