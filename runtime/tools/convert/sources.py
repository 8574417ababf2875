"""Model sources that `flashllm convert` reads: Hugging Face folders and GGUF files.

Every source answers the same questions, one layer at a time so that converting
a 7B checkpoint never holds more than one layer's weights:

    source.arch                      ArchConfig
    source.resident_specs()          [(store name, shape)] of the resident tensors
    source.load_resident(name)       float32 array of one resident tensor
    source.load_ffn(layer)           {"gate"|"up": (n_ff, d), "down": (d, n_ff), "up_bias": (n_ff,)}
    source.tokenizer()               (tokenizer.json text, TokenizerInfo fields)

and, so that a quantized source's blocks can be kept as they are:

    source.resident_kind(name)       how the source stores it: a GGUF type name ("Q4_1", "F32", ...)
                                     or FLOAT_SOURCE_KIND for a Hugging Face checkpoint
    source.ffn_kind(layer, part)     the same for "gate" | "up" | "down"
    source.load_resident_blocks(name)      (rows, bytes) uint8: the source's blocks (GGUF only)
    source.load_ffn_blocks(layer, part)    the same for an FFN projection

A source may also carry `synthetic` (a SyntheticInfo: random weights, recorded
in the manifest) and `manifest_source` (the manifest's `source` when it is not
a path); synthetic_source.py's SyntheticSource does.

Store names of resident tensors are family-neutral: `embed_tokens`,
`layers.{i}.q_proj.weight`, `layers.{i}.attn_norm.weight`, `final_norm.weight`,
`lm_head` ... (see `llama_resident_names`, `opt_resident_names`).
"""
from __future__ import annotations

import json
import os
import numpy as np

from flashllm.protocol.store_format import ArchConfig

FLOAT_SOURCE_KIND = "float"  # a Hugging Face tensor: read as float32 whatever its dtype
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "opt")
SUPPORTED_GGUF_ARCHS = ("llama",)


class ConvertError(Exception):
    """The source cannot be converted; the message says what to do."""


def _unsupported(kind: str, name: str, supported: tuple[str, ...]) -> ConvertError:
    return ConvertError(
        f"unsupported {kind} {name!r}: flashllm converts {', '.join(supported)}; "
        "other architectures are not implemented"
    )


# --------------------------------------------------------------------------- store names


def llama_resident_names(arch: ArchConfig) -> list[str]:
    names = ["embed_tokens"]
    for i in range(arch.num_hidden_layers):
        p = f"layers.{i}."
        names += [p + "attn_norm.weight", p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight",
                  p + "o_proj.weight", p + "ffn_norm.weight"]
        if arch.attention_bias:
            names += [p + "q_proj.bias", p + "k_proj.bias", p + "v_proj.bias"]
    names.append("final_norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head")
    return names


def opt_resident_names(arch: ArchConfig, has_projections: bool) -> list[str]:
    names = ["embed_tokens", "embed_positions"]
    for i in range(arch.num_hidden_layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [p + proj + ".weight", p + proj + ".bias"]
        names += [p + "attn_norm.weight", p + "attn_norm.bias", p + "ffn_norm.weight", p + "ffn_norm.bias",
                  p + "ffn_down_bias"]
    if arch.do_layer_norm_before:
        names += ["final_norm.weight", "final_norm.bias"]
    if has_projections:
        names += ["project_in", "project_out"]
    if not arch.tie_word_embeddings:
        names.append("lm_head")
    return names


# --------------------------------------------------------------------------- Hugging Face


class HuggingFaceSource:
    """A Hugging Face checkpoint folder: config.json + one or sharded *.safetensors."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ConvertError(f"{folder}: no config.json; expected a Hugging Face checkpoint folder or a .gguf file")
        with open(config_path, encoding="utf-8") as f:
            self.config = json.load(f)
        model_type = self.config.get("model_type", "?")
        if model_type not in SUPPORTED_HF_TYPES:
            raise _unsupported("model_type", model_type, SUPPORTED_HF_TYPES)
        self.model_type = model_type

        self._file_of: dict[str, str] = {}
        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                raise ConvertError(
                    f"{folder}: no *.safetensors weights (pytorch_model.bin is not read; "
                    "re-save with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True))"
                )
            for name in files:
                with safe_open(os.path.join(folder, name), framework="numpy") as st:
                    for key in st.keys():
                        self._file_of[key] = os.path.join(folder, name)
        for path in set(self._file_of.values()):
            if not os.path.isfile(path):
                raise ConvertError(f"{path}: listed in the safetensors index but missing")
        self._open_files: dict[str, object] = {}

        self.arch = self._opt_arch() if model_type == "opt" else self._llama_arch()
        self._has_projections = model_type == "opt" and self.config.get("word_embed_proj_dim", self.arch.hidden_size) != self.arch.hidden_size
        self._prefix = self._detect_prefix()

    # -- config

    def _eos_ids(self) -> list[int]:
        eos = self.config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        gen_path = os.path.join(self.folder, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                gen_eos = json.load(f).get("eos_token_id")
            for e in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
                if e is not None and e not in eos_ids:
                    eos_ids.append(e)
        return [int(e) for e in eos_ids]

    def _llama_arch(self) -> ArchConfig:
        c = self.config
        rope_scaling = c.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConvertError(
                f"rope_scaling {rope_scaling!r} is not supported yet; only plain RoPE (rope_theta) is implemented"
            )
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "relu"):
            raise ConvertError(f"hidden_act {act!r} is not supported; flashllm supports silu (SwiGLU) and relu")
        heads = c["num_attention_heads"]
        rope_theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return ArchConfig(
            family="llama",
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            hidden_act=act,
            gated_ffn=True,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            attention_bias=self.model_type == "qwen2" or bool(c.get("attention_bias", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=self._eos_ids(),
            source_model_type=self.model_type,
        )

    def _opt_arch(self) -> ArchConfig:
        c = self.config
        act = c.get("activation_function", "relu")
        if act != "relu":
            raise ConvertError(f"OPT activation_function {act!r} is not supported; flashllm supports relu")
        heads = c["num_attention_heads"]
        return ArchConfig(
            family="opt",
            hidden_size=c["hidden_size"],
            intermediate_size=c["ffn_dim"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            hidden_act="relu",
            gated_ffn=False,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            norm_eps=1e-5,
            attention_bias=True,
            do_layer_norm_before=bool(c.get("do_layer_norm_before", True)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=self._eos_ids(),
            source_model_type="opt",
        )

    def _detect_prefix(self) -> str:
        keys = self._file_of.keys()
        if self.model_type == "opt":
            for prefix in ("model.decoder.", "decoder.", ""):
                if prefix + "embed_tokens.weight" in keys:
                    return prefix
        else:
            for prefix in ("model.", ""):
                if prefix + "embed_tokens.weight" in keys:
                    return prefix
        raise ConvertError(f"{self.folder}: tensor 'embed_tokens.weight' not found in the checkpoint; is it complete?")

    # -- tensors

    def _hf_name(self, store_name: str) -> str:
        if self.model_type == "opt":
            table = {"embed_tokens": "embed_tokens.weight", "embed_positions": "embed_positions.weight",
                     "final_norm.weight": "final_layer_norm.weight", "final_norm.bias": "final_layer_norm.bias",
                     "project_in": "project_in.weight", "project_out": "project_out.weight"}
            layer_table = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                           "o_proj": "self_attn.out_proj", "attn_norm": "self_attn_layer_norm",
                           "ffn_norm": "final_layer_norm", "ffn_down_bias": "fc2.bias"}
        else:
            table = {"embed_tokens": "embed_tokens.weight", "final_norm.weight": "norm.weight"}
            layer_table = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                           "o_proj": "self_attn.o_proj", "attn_norm": "input_layernorm",
                           "ffn_norm": "post_attention_layernorm"}
        if store_name == "lm_head":
            return "lm_head.weight"
        if store_name in table:
            return self._prefix + table[store_name]
        _, layer, rest = store_name.split(".", 2)
        base, _, suffix = rest.partition(".")
        mapped = layer_table[base] + ("." + suffix if suffix else "")
        return f"{self._prefix}layers.{layer}.{mapped}"

    def _tensor(self, hf_name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._file_of.get(hf_name)
        if path is None:
            raise ConvertError(f"{self.folder}: tensor {hf_name!r} missing from the checkpoint")
        if path not in self._open_files:
            self._open_files[path] = safe_open(path, framework="pt")
        tensor = self._open_files[path].get_tensor(hf_name)  # torch: reads bf16 too
        return tensor.float().numpy()

    def _expected_shape(self, store_name: str) -> tuple[int, ...]:
        proj_dim = self.config.get("word_embed_proj_dim", self.arch.hidden_size) if self.model_type == "opt" else None
        return expected_resident_shape(self.arch, store_name, proj_dim)

    def resident_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        names = (opt_resident_names(self.arch, self._has_projections) if self.model_type == "opt"
                 else llama_resident_names(self.arch))
        if not self.arch.tie_word_embeddings and "lm_head.weight" not in self._file_of:
            raise ConvertError(f"{self.folder}: tie_word_embeddings is false but 'lm_head.weight' is missing")
        return [(name, self._expected_shape(name)) for name in names]

    def load_resident(self, name: str) -> np.ndarray:
        hf_name = self._hf_name(name)
        array = self._tensor(hf_name)
        _check_shape(hf_name, array, self._expected_shape(name))
        return array

    def resident_kind(self, name: str) -> str:
        return FLOAT_SOURCE_KIND

    def ffn_kind(self, layer: int, part: str) -> str:
        return FLOAT_SOURCE_KIND

    def load_ffn(self, layer: int) -> dict[str, np.ndarray]:
        a = self.arch
        p = f"{self._prefix}layers.{layer}."
        if self.model_type == "opt":
            parts = {"up": self._tensor(p + "fc1.weight"), "down": self._tensor(p + "fc2.weight"),
                     "up_bias": self._tensor(p + "fc1.bias")}
            names = {"up": p + "fc1.weight", "down": p + "fc2.weight", "up_bias": p + "fc1.bias"}
        else:
            parts = {"gate": self._tensor(p + "mlp.gate_proj.weight"), "up": self._tensor(p + "mlp.up_proj.weight"),
                     "down": self._tensor(p + "mlp.down_proj.weight")}
            names = {k: p + f"mlp.{k}_proj.weight" for k in parts}
        expected = {"gate": (a.intermediate_size, a.hidden_size), "up": (a.intermediate_size, a.hidden_size),
                    "down": (a.hidden_size, a.intermediate_size), "up_bias": (a.intermediate_size,)}
        for key, array in parts.items():
            _check_shape(names[key], array, expected[key])
        return parts

    def tokenizer(self) -> tuple[str | None, dict]:
        tok_path = os.path.join(self.folder, "tokenizer.json")
        cfg_path = os.path.join(self.folder, "tokenizer_config.json")
        tok_json = None
        if os.path.isfile(tok_path):
            with open(tok_path, encoding="utf-8") as f:
                tok_json = f.read()
        cfg: dict = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        jinja_path = os.path.join(self.folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        bos_token, eos_token = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
        if tok_json is not None and (bos_token is None or eos_token is None):
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_str(tok_json)
            if bos_token is None and self.arch.bos_token_id is not None:
                bos_token = vocab.id_to_token(self.arch.bos_token_id)
            if eos_token is None and self.arch.eos_token_ids:
                eos_token = vocab.id_to_token(self.arch.eos_token_ids[0])
        default_add_bos = self.model_type in ("llama", "mistral", "opt") and bos_token is not None
        return tok_json, {
            "chat_template": template,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "add_bos_token": bool(cfg.get("add_bos_token", default_add_bos)),
        }


def expected_resident_shape(arch: ArchConfig, store_name: str, proj_dim: int | None = None) -> tuple[int, ...]:
    """Shape of a resident tensor from the config (proj_dim: OPT's word_embed_proj_dim)."""
    a = arch
    d, hd = a.hidden_size, a.head_dim
    proj_dim = proj_dim or d
    q_out, kv_out = a.num_attention_heads * hd, a.num_key_value_heads * hd
    base = store_name.split(".")[2] if store_name.startswith("layers.") else store_name.split(".")[0]
    is_bias = store_name.endswith(".bias")
    shapes = {
        "embed_tokens": (a.vocab_size, proj_dim),
        "embed_positions": (a.max_position_embeddings + 2, d),
        "lm_head": (a.vocab_size, proj_dim),
        "project_in": (d, proj_dim),
        "project_out": (proj_dim, d),
        "q_proj": (q_out,) if is_bias else (q_out, d),
        "k_proj": (kv_out,) if is_bias else (kv_out, d),
        "v_proj": (kv_out,) if is_bias else (kv_out, d),
        "o_proj": (d,) if is_bias else (d, q_out),
        "attn_norm": (d,), "ffn_norm": (d,), "final_norm": (d,), "ffn_down_bias": (d,),
    }
    return shapes[base]


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ConvertError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(expected)} from the config")


# --------------------------------------------------------------------------- GGUF


def _reverse_rope_permutation(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE → Hugging Face's rotate_half)."""
    # (out, in) → (n_head, 2, dim/2, in) was written as (n_head, dim/2, 2, in)
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensor_name(store_name: str) -> str:
    """llama.cpp's name of a llama-architecture resident tensor (`blk.0.attn_q.weight` for `layers.0.q_proj.weight`)."""
    table = {"embed_tokens": "token_embd.weight", "final_norm.weight": "output_norm.weight", "lm_head": "output.weight"}
    if store_name in table:
        return table[store_name]
    _, layer, rest = store_name.split(".", 2)
    base, _, suffix = rest.partition(".")
    mapped = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "ffn_norm": "ffn_norm"}[base]
    return f"blk.{layer}.{mapped}.{suffix}"


class GgufSource:
    """A GGUF file of llama architecture; quantized tensors are dequantized to float32."""

    def __init__(self, path: str):
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError/struct errors on a bad file
            raise ConvertError(f"{path}: not a readable GGUF file ({exc})") from exc
        self._fields = self.reader.fields
        arch_name = self._field("general.architecture")
        if arch_name not in SUPPORTED_GGUF_ARCHS:
            raise _unsupported("GGUF architecture", arch_name, SUPPORTED_GGUF_ARCHS)
        self._tensors = {t.name: t for t in self.reader.tensors}
        a = "llama."
        d = int(self._field(a + "embedding_length"))
        heads = int(self._field(a + "attention.head_count"))
        kv_heads = int(self._field(a + "attention.head_count_kv", heads))
        tokens = self._field("tokenizer.ggml.tokens", None)
        vocab = int(self._field(a + "vocab_size", len(tokens) if tokens is not None else 0))
        if "rope.scaling.type" in {k[len(a):] for k in self._fields if k.startswith(a)}:
            scaling = self._field(a + "rope.scaling.type")
            if scaling not in ("none", None):
                raise ConvertError(f"GGUF rope scaling {scaling!r} is not supported; only plain RoPE is implemented")
        eos = self._field("tokenizer.ggml.eos_token_id", None)
        eot = self._field("tokenizer.ggml.eot_token_id", None)
        eos_ids = [int(e) for e in (eos, eot) if e is not None]
        self.arch = ArchConfig(
            family="llama",
            hidden_size=d,
            intermediate_size=int(self._field(a + "feed_forward_length")),
            num_hidden_layers=int(self._field(a + "block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(self._field(a + "attention.key_length", d // heads)),
            vocab_size=vocab,
            max_position_embeddings=int(self._field(a + "context_length", 2048)),
            hidden_act="silu",
            gated_ffn=True,
            tie_word_embeddings="output.weight" not in self._tensors,
            norm_eps=float(self._field(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(a + "rope.freq_base", 10000.0)),
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
            source_model_type="gguf:llama",
        )

    def _field(self, key: str, default=KeyError):
        field = self._fields.get(key)
        if field is None:
            if default is KeyError:
                raise ConvertError(f"{self.path}: GGUF metadata key {key!r} missing")
            return default
        return field.contents()

    def _tensor(self, name: str, expected: tuple[int, ...]) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors.get(name)
        if tensor is None:
            raise ConvertError(f"{self.path}: tensor {name!r} missing from the GGUF file")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ConvertError(f"{self.path}: tensor {name!r} uses {tensor.tensor_type.name}, which gguf cannot dequantize") from exc
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))
        _check_shape(name, array, expected)
        return array

    def _blocks(self, name: str, rows: int) -> np.ndarray:
        """The tensor's stored bytes as (rows, bytes per row) uint8, untouched."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ConvertError(f"{self.path}: tensor {name!r} missing from the GGUF file")
        data = np.asarray(tensor.data)
        return data.view(np.uint8).reshape(rows, -1)

    def _kind(self, name: str) -> str:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ConvertError(f"{self.path}: tensor {name!r} missing from the GGUF file")
        return tensor.tensor_type.name

    def _unpermute(self, name: str, array: np.ndarray) -> np.ndarray:
        """Q/K rows back in Hugging Face order; a row permutation, so blocks (along a row) move whole."""
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            return _reverse_rope_permutation(array, self.arch.num_attention_heads)
        if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            return _reverse_rope_permutation(array, self.arch.num_key_value_heads)
        return array

    def resident_kind(self, name: str) -> str:
        return self._kind(gguf_tensor_name(name))

    def ffn_kind(self, layer: int, part: str) -> str:
        return self._kind(f"blk.{layer}.ffn_{part}.weight")

    def load_resident_blocks(self, name: str) -> np.ndarray:
        rows = expected_resident_shape(self.arch, name)[0]
        return np.ascontiguousarray(self._unpermute(name, self._blocks(gguf_tensor_name(name), rows)))

    def load_ffn_blocks(self, layer: int, part: str) -> np.ndarray:
        rows = self.arch.hidden_size if part == "down" else self.arch.intermediate_size
        return self._blocks(f"blk.{layer}.ffn_{part}.weight", rows)

    def resident_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, expected_resident_shape(self.arch, name)) for name in llama_resident_names(self.arch)]

    def load_resident(self, name: str) -> np.ndarray:
        return self._unpermute(name, self._tensor(gguf_tensor_name(name), expected_resident_shape(self.arch, name)))

    def load_ffn_part(self, layer: int, part: str) -> np.ndarray:
        d, n_ff = self.arch.hidden_size, self.arch.intermediate_size
        return self._tensor(f"blk.{layer}.ffn_{part}.weight", (d, n_ff) if part == "down" else (n_ff, d))

    def load_ffn(self, layer: int) -> dict[str, np.ndarray]:
        # ffn_down is quantized in blocks running along a row of (d, n_ff), i.e. across neurons:
        # dequantize the whole matrix, then bundle its columns.
        return {part: self.load_ffn_part(layer, part) for part in ("gate", "up", "down")}

    def tokenizer(self) -> tuple[str | None, dict]:
        from flashllm.runtime.tools.convert.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.reader)


def open_source(src: str) -> HuggingFaceSource | GgufSource:
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file or folder")
    if os.path.isdir(src):
        return HuggingFaceSource(src)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GgufSource(src)
    raise ConvertError(f"{src}: neither a Hugging Face checkpoint folder nor a GGUF file (magic {magic!r})")

