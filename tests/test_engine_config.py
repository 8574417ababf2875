"""The engine's settings as one typed config: built once from the flags, checked when made, run as given."""
from __future__ import annotations

import pytest

from flashllm.runtime.clients.cli import build_parser, main
from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.engine_config import EngineConfig, SparseOptions, engine_config_from_args
from flashllm.runtime.core.executors import executor_class
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.workers.executor import ModelExecutor
from flashllm.workers.interfaces import Executor

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_the_engine_flags_become_one_typed_config():
    args = build_parser(["generate"]).parse_args([
        "generate", "--store", "s", "--mode", "sparse", "--memory", "2MiB", "--keep-fraction", "0.25",
        "--neuron-window", "3", "--missing-policy", "skip", "--compute-set", "window", "--threads", "1",
        "--runtime", "inproc", "--max-context", "256", "--resident-dtype", "float16", "--head-precision", "4bit",
        "hello"])
    assert engine_config_from_args(args, max_batch=2) == EngineConfig(
        mode="sparse", runtime="inproc", memory_budget_bytes=2 << 20, max_batch=2, max_context=256,
        resident_dtype="float16", head_precision="4bit", threads=1,
        sparse=SparseOptions(keep_fraction=0.25, window_tokens=3, missing_policy="skip", compute_set="window"))
    plain = engine_config_from_args(build_parser(["generate"]).parse_args(["generate", "--store", "s", "hi"]))
    assert (plain.mode, plain.runtime, plain.memory_budget_bytes, plain.sparse, plain.head_precision) == \
        ("auto", "auto", None, None, "auto")
    with pytest.raises(ValueError, match="--head-precision '8bit' is not one of auto, stored, 4bit"):
        EngineConfig(head_precision="8bit")


@pytest.mark.parametrize("flags, message", [
    (["--mode", "sparse", "--keep-fraction", "1.5"], "--keep-fraction 1.5 is outside (0, 1]"),
    (["--mode", "dense", "--neuron-window", "2"], "--neuron-window applies to --mode sparse, not --mode dense"),
    (["--mode", "dense", "--compute-set", "window"], "--compute-set applies to --mode sparse, not --mode dense"),
    (["--max-context", "0"], "--max-context must be a whole number ≥ 1, got 0"),
    (["--memory", "lots"], "size 'lots' is not understood; write e.g. 160MiB"),
])
def test_a_bad_engine_flag_is_refused_by_name_before_the_store_is_opened(tmp_path, capsys, flags, message):
    missing_store = str(tmp_path / "no-such-store")  # the flag is checked first: no store error
    assert main(["generate", "--store", missing_store, *flags, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashllm generate: error: ") and message in err, err
    assert not (tmp_path / "no-such-store").exists()


def test_a_guessed_option_name_is_refused_with_the_known_ones(tiny_stores):
    with pytest.raises(ValueError, match=r"unknown sparse FFN option\(s\) memory; known: keep_fraction, "
                                         r"window_tokens, missing_policy"):
        Engine(tiny_stores("llama"), mode="sparse", ffn_options={"memory": 1 << 20})


def test_a_config_runs_the_engine_its_keywords_would(tiny_stores):
    store = tiny_stores("llama")
    config = EngineConfig(mode="auto", max_batch=2, max_context=64)
    with Engine(store, config=config) as engine:
        by_config = [r.tokens for r in engine.generate(["hello world", "the cat"], GREEDY)]
        resolved = engine.config
        assert isinstance(engine.executor, Executor) and engine.runtime == "inproc"
    with Engine(store, mode="auto", max_batch=2, max_context=64) as engine:
        by_keywords = [r.tokens for r in engine.generate(["hello world", "the cat"], GREEDY)]
    assert by_config == by_keywords and all(len(tokens) == 6 for tokens in by_config)
    # what the engine decided is in the config it ran: auto without --memory is dense, in this process
    assert (resolved.mode, resolved.runtime, resolved.max_context) == ("dense", "inproc", 64)
    with pytest.raises(ValueError, match="either as config=EngineConfig"):
        Engine(store, mode="naive", config=config)


def test_the_runtime_names_its_executor_class():
    assert executor_class("inproc") is ModelExecutor
    assert executor_class("workers").__name__ == "WorkerExecutor"
    with pytest.raises(ValueError, match="--runtime 'gpu' is not one of inproc, workers"):
        executor_class("gpu")
