"""The flash store's on-disk format: manifest, file names and FFN byte layout.

A store is a directory made once per model by `flashllm convert`:

    STORE/
      manifest.json           this module's `Manifest`, as JSON
      resident.safetensors    embeddings, attention, norms, head, FFN biases
      ffn.bin                 the FFN as per-neuron bundles, one region per layer
      tokenizer.json          a `tokenizers` tokenizer
      sparsity.safetensors    predictors and hot-neuron masks (after `calibrate`)

A store written by `flashllm synth` holds random weights and says so in the
manifest's optional `synthetic` field (stores without it are real models).

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
column i of the down projection (d, n_ff), stored contiguously. Each part is
stored as its own weight kind (protocol/quant_format.py): a float store's parts
are all the store dtype; a quantized store's gate/up rows are GGUF blocks
(q4_0, q4_1, q8_0) and its down column holds only the quantized values of
GGUF's across-neuron down blocks (`*_grouped_col`); that layer's scale table is
the resident float16 tensor named by `ffn.down_group_scales` (with "{layer}"
filled in), shape (d, n_ff / 32, 2 | 1). A bundle is bytes, not elements of
one dtype, and is still one contiguous byte range. A quantized store pads each
bundle to `ffn.bundle_alignment_bytes` (the device's 512-byte logical block),
so `bundle_bytes` (the stride) may exceed the parts' sum and any one neuron is
read as whole blocks of its own.

Format version 2 (version 1 stores still load; their parts are all the store
dtype): `ffn.bundle_parts` are (name, elements, kind) triples, and
`resident_quantized` names the resident matrices kept as blocks: each is a
uint8 (rows, bytes_per_row) tensor in resident.safetensors, with its kind and
(rows, elements) shape recorded here. Vectors (norms, biases) stay float. Neuron ids
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

from flashllm.protocol.quant_format import bytes_per_row, is_quantized

FORMAT_NAME = "flashllm-store"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
ALIGNMENT_BYTES = 4096
BUNDLE_ALIGNMENT_BYTES = 512  # a quantized store's bundle stride: whole logical blocks of the device
DOWN_GROUP_SCALES_NAME = "layers.{layer}.ffn_down_group_scales"  # a quantized store's resident down scale tables

MANIFEST_FILE = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
TOKENIZER_FILE = "tokenizer.json"
SPARSITY_FILE = "sparsity.safetensors"

DTYPE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}  # float store dtypes only
QUANTIZED_STORE_DTYPES = ("q8_0", "q4_0", "q4_1")  # a quantized store is named by its gate/up rows' kind

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
    bundle_parts: list[tuple[str, int, str]]  # (name, elements, kind) in storage order
    bundle_bytes: int  # sum of the parts' bytes_per_row(kind, elements), rounded up to bundle_alignment_bytes
    file_bytes: int
    layers: list[FfnLayerRegion]
    bundle_checksums: str | None = None  # file of per-bundle xxh3-64 digests checked on every read (flash_io/integrity)
    bundle_alignment_bytes: int = 1  # bundle_bytes is the parts' bytes rounded up to this (zero padding at the end)
    down_group_scales: str | None = None  # resident tensor name of a layer's down scale table, "{layer}" filled in

    def down_group_scales_name(self, layer: int) -> str:
        return self.down_group_scales.format(layer=layer)

    def __post_init__(self):
        # version-1 layouts name (name, elements) pairs: every part is the store dtype
        self.bundle_parts = [(part[0], int(part[1]), part[2] if len(part) == 3 else self.dtype)
                             for part in self.bundle_parts]

    def part_slices(self) -> dict[str, slice]:
        """Element slices of each part inside one bundle row, once dequantized (the [gate|up|down] float layout)."""
        slices, start = {}, 0
        for name, elements, _ in self.bundle_parts:
            slices[name] = slice(start, start + elements)
            start += elements
        return slices

    def part_byte_slices(self) -> dict[str, slice]:
        """Byte slices of each part inside one stored bundle."""
        slices, start = {}, 0
        for name, elements, kind in self.bundle_parts:
            n_bytes = bytes_per_row(kind, elements)
            slices[name] = slice(start, start + n_bytes)
            start += n_bytes
        return slices

    def part_kinds(self) -> dict[str, str]:
        return {name: kind for name, _, kind in self.bundle_parts}

    @property
    def bundle_elements(self) -> int:
        return sum(elements for _, elements, _ in self.bundle_parts)

    @property
    def is_quantized(self) -> bool:
        return any(is_quantized(kind) for _, _, kind in self.bundle_parts)

    @property
    def stored_row_width(self) -> int:
        """Items of the reader's numpy dtype per bundle: elements for float stores, bytes (uint8) for quantized ones."""
        return self.bundle_bytes if self.is_quantized else self.bundle_elements

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
class QuantizedTensorInfo:
    """A resident matrix held as blocks: uint8 (rows, bytes_per_row(kind, elements)) in resident.safetensors."""

    kind: str  # a quant_format kind: "q8_0", "q4_0", "q4_1"
    shape: list[int]  # [rows, elements]: the matrix's float shape (out features, in features)


@dataclass
class SyntheticInfo:
    """Written by `flashllm synth`: the weights are seeded random numbers in the shape of a named model."""

    shape: str  # a name in runtime/tools/convert/shapes.py, e.g. "llama-2-7b"
    seed: int  # the same shape, dtype and seed give the same bytes
    shape_source: str  # the config the shape was copied from


def synthetic_notice(manifest: "Manifest") -> str | None:
    """The line every run of a synthetic store prints; None for a real model."""
    if manifest.synthetic is None:
        return None
    return (f"flashllm: this store holds random weights in the shape of {manifest.synthetic.shape} "
            f"(flashllm synth, seed {manifest.synthetic.seed}): its text is meaningless; "
            "speed, bytes read and memory are real")


def bundle_parts_bytes(parts: list[tuple[str, int, str]]) -> int:
    return sum(bytes_per_row(kind, elements) for _, elements, kind in parts)


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
    resident_quantized: dict[str, QuantizedTensorInfo] = field(default_factory=dict)
    synthetic: SyntheticInfo | None = None  # None: weights of a real model (stores without the field)

    @property
    def is_quantized(self) -> bool:
        return self.dtype in QUANTIZED_STORE_DTYPES

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
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise StoreError(
                f"{where}: store format version {version} but this flashllm reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; re-run `flashllm convert` with this version"
            )
        try:
            ffn = dict(raw["ffn"])
            ffn["layers"] = [FfnLayerRegion(**region) for region in ffn["layers"]]
            layout = FfnLayout(**ffn)
            if align_up(bundle_parts_bytes(layout.bundle_parts), layout.bundle_alignment_bytes) != layout.bundle_bytes:
                raise StoreError(f"{where}: bundle_bytes {layout.bundle_bytes} is not the sum of the bundle parts' "
                                 f"bytes ({layout.bundle_parts}) rounded up to {layout.bundle_alignment_bytes}; "
                                 "the manifest is corrupt, re-run `flashllm convert`")
            sparsity = raw.get("sparsity")
            return Manifest(
                arch=ArchConfig(**raw["arch"]),
                dtype=raw["dtype"],
                ffn=layout,
                resident_file=raw["resident_file"],
                resident_sha256=dict(raw["resident_sha256"]),
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                source=raw["source"],
                format_version=FORMAT_VERSION,  # read into this version's structures
                sparsity=SparsityInfo(**sparsity) if sparsity else None,
                resident_quantized={name: QuantizedTensorInfo(**info)
                                    for name, info in raw.get("resident_quantized", {}).items()},
                synthetic=SyntheticInfo(**raw["synthetic"]) if raw.get("synthetic") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
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
