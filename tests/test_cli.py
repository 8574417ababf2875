"""The `flashllm` command as a user runs it: its stdout, stderr and exit code.

convert → verify → generate (streamed text, or one JSON object per prompt) →
eval, on a tiny llama; and the user errors, which print
"flashllm <cmd>: error: ..." and exit 2 without a traceback. The commands run
through `main(argv)` in this process (tests/cli_run.py); one test runs the
installed `flashllm` console script as a subprocess.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from importlib.metadata import entry_points

import pytest

from flashllm.protocol.store_format import read_manifest
from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams
from tests.cli_run import CliRun, run_flashllm as flashllm

PROMPTS = ["The quick brown fox", "Paris is the capital of"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """`flashllm convert` of the tiny llama checkpoint: (the finished process, the store path)."""
    store = str(tmp_path_factory.mktemp("cli") / "store")
    return flashllm("convert", tiny_models("llama"), "--out", store, "--dtype", "float32"), store


@pytest.fixture(scope="module")
def store(converted) -> str:
    result, store = converted
    assert result.returncode == 0, result.stderr
    return store


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_flashllm_is_the_installed_console_script():
    [script] = [ep for ep in entry_points(group="console_scripts") if ep.name == "flashllm"]
    assert script.value == "flashllm.runtime.clients.cli:main"


def test_the_installed_command_generates_and_refuses_a_missing_store_without_a_traceback(store, tmp_path):
    """The smoke test of the real console script in its own process; every other test here runs main(argv)."""
    command = shutil.which("flashllm")
    assert command, "the flashllm console script is not on PATH: pip install -e ."
    missing = str(tmp_path / "no-such-store")
    good = subprocess.run([command, "generate", "--store", store, "--json", "--max-tokens", str(MAX_TOKENS),
                           "--ignore-eos", PROMPTS[0]], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    [obj] = _json_lines(good.stdout)
    assert obj["prompt"] == PROMPTS[0] and len(obj["tokens"]) == MAX_TOKENS
    assert obj["tokens"] == _json_lines(flashllm("generate", "--store", store, "--json", "--max-tokens",
                                                 str(MAX_TOKENS), "--ignore-eos", PROMPTS[0]).stdout)[0]["tokens"]
    bad = subprocess.run([command, "generate", "--store", missing, "hello"], capture_output=True, text=True,
                         timeout=300)
    _assert_user_error(bad, "generate", missing, "flashllm convert")


def test_convert_writes_a_store_that_verifies(converted):
    result, store = converted
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {store}: llama, 2 layers, 160 FFN neurons/layer")
    assert "Traceback" not in result.stderr

    verify = flashllm("verify", "--store", store, "-v")
    assert verify.returncode == 0, verify.stderr
    lines = verify.stdout.splitlines()
    assert any(line.startswith("resident.safetensors:") and line.endswith("ok") for line in lines)
    assert [line for line in lines if line.startswith("ffn.bin: layer")] == [
        f"ffn.bin: layer {i} ok ({read_manifest(store).ffn.layers[i].length_bytes} bytes)" for i in range(2)]
    assert lines[-1] == f"{store}: ok"


def test_generate_json_prints_one_object_per_prompt(store):
    result = flashllm("generate", "--store", store, "--json", "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
                      *PROMPTS)
    assert result.returncode == 0, result.stderr
    objects = _json_lines(result.stdout)
    assert [o["prompt"] for o in objects] == PROMPTS
    assert {o["runtime"] for o in objects} == {"inproc"}  # --runtime auto: dense has nothing to pipeline
    assert {o["head_precision"] for o in objects} == {"stored"}  # no --memory: the head as the store holds it

    with Engine(store, max_batch=len(PROMPTS)) as engine:  # the same greedy run in-process
        expected = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        vocab_size = engine.arch.vocab_size
        for obj, want in zip(objects, expected):
            assert obj["tokens"] == want.tokens
            assert all(isinstance(t, int) and 0 <= t < vocab_size for t in obj["tokens"])
            assert len(obj["tokens"]) == MAX_TOKENS and obj["finish_reason"] == "length"
            assert obj["text"] == want.text == engine.tokenizer.decode(want.tokens)
            assert isinstance(obj["ms_per_token"], float) and 0 < obj["ms_per_token"] < 60_000
            assert isinstance(obj["flash_read_bytes"], int) and obj["flash_read_bytes"] >= 0
            assert obj["prompt_tokens"] == len(engine.tokenizer.encode(obj["prompt"]))


def test_runtime_auto_pipelines_sparse_on_the_cpu_and_stays_in_process_on_a_gpu():
    from flashllm.runtime.clients.cli import resolve_runtime

    assert resolve_runtime("auto", "sparse", "cpu") == "workers"
    assert resolve_runtime("auto", "sparse", "cuda") == "inproc"  # measured faster on an H100
    assert [resolve_runtime("auto", mode, "cpu") for mode in ("dense", "naive")] == ["inproc", "inproc"]
    assert resolve_runtime("workers", "sparse", "cuda") == "workers"  # asked for, given


def test_naive_mode_reports_the_ffn_bytes_it_read(store):
    ffn_bytes = read_manifest(store).ffn.total_bundle_bytes
    reads = {}
    for mode in ("dense", "naive"):
        result = flashllm("generate", "--store", store, "--mode", mode, "--json", "--max-tokens", str(MAX_TOKENS),
                          "--ignore-eos", PROMPTS[0])
        assert result.returncode == 0, result.stderr
        [obj] = _json_lines(result.stdout)
        reads[mode] = obj["flash_read_bytes"]
    # naive re-reads the whole FFN for the prompt and for each of the MAX_TOKENS - 1 decode steps
    assert reads["naive"] >= 0.95 * MAX_TOKENS * ffn_bytes, reads
    assert reads["dense"] < ffn_bytes, reads


def test_generate_streams_plain_text_for_one_prompt(store):
    args = ("--store", store, "--max-tokens", str(MAX_TOKENS), "--ignore-eos", PROMPTS[1])
    streamed = flashllm("generate", *args)
    as_json = flashllm("generate", "--json", *args)
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    [obj] = _json_lines(as_json.stdout)
    assert obj["text"]
    assert streamed.stdout == obj["text"] + "\n"


def test_eval_json_reports_perplexity_and_tokens(store, tmp_path):
    text_file = tmp_path / "text.txt"
    text = "Flash memory is slower than DRAM but much larger. The quick brown fox jumps over the lazy dog. " * 3
    text_file.write_text(text, encoding="utf-8")
    result = flashllm("eval", "--store", store, "--text", str(text_file), "--json")
    assert result.returncode == 0, result.stderr
    [obj] = _json_lines(result.stdout)
    with Engine(store) as engine:
        ppl, tokens = engine.perplexity(text)
        assert tokens == len(engine.tokenizer.encode(text)) - 1
    assert obj["tokens"] == tokens
    assert obj["mode"] == "dense"
    assert math.isfinite(obj["perplexity"]) and obj["perplexity"] > 1.0
    assert obj["perplexity"] == pytest.approx(ppl, rel=1e-6)


def _assert_user_error(result: CliRun | subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith(f"flashllm {command}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_user_errors_exit_2_without_a_traceback(store, tmp_path):
    missing = str(tmp_path / "no-such-store")
    _assert_user_error(flashllm("generate", "--store", missing, "hello"), "generate", missing, "flashllm convert")
    _assert_user_error(flashllm("convert", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")),
                       "convert", "no-such-model")
    _assert_user_error(flashllm("eval", "--store", store, "--text", str(tmp_path / "no-such.txt")),
                       "eval", "no-such.txt")
    _assert_user_error(flashllm("generate", "--store", store, "--max-context", "16", "word " * 40),
                       "generate", "tokens but the context holds 16")
    _assert_user_error(flashllm("generate", "--store", store, "--temperature", "-1", "hello"),
                       "generate", "temperature")
    _assert_user_error(flashllm("generate", "--store", store, "--keep-fraction", "0.3", "hello"),
                       "generate", "--keep-fraction applies to --mode sparse")
    _assert_user_error(flashllm("generate", "--store", store, "--missing-policy", "skip", "hello"),
                       "generate", "--missing-policy applies to --mode sparse")
    window = flashllm("generate", "--store", store, "--mode", "sparse", "--neuron-window", "0", "hello")
    assert window.returncode == 2 and "--neuron-window: expected a whole number ≥ 1, got '0'" in window.stderr, \
        window.stderr
    _assert_user_error(flashllm("generate", "--store", store, "--threads", "0", "hello"), "generate", "--threads")
    text = tmp_path / "calibration.txt"
    text.write_text("calibration words " * 100)
    dense = flashllm("calibrate", "--store", store, "--text", str(text), "--dense-layers", "first")
    assert dense.returncode == 2 and "expected auto, none or comma-separated layer numbers, got 'first'" in \
        dense.stderr, dense.stderr
    _assert_user_error(flashllm("calibrate", "--store", store, "--text", str(text), "--dense-layers", "0,7"),
                       "calibrate", "--dense-layers: layer 7 out of range: the model has 2 layers (0..1)")
    # the default SwiGLU predictor is the full-rank sketch: a rank means the user wanted a low-rank one
    _assert_user_error(flashllm("calibrate", "--store", store, "--text", str(text), "--rank", "64"),
                       "calibrate", "--rank sets a low-rank predictor's rank; the sketch is full rank at 4 bits")
    assert not os.path.exists(os.path.join(store, "sparsity.safetensors"))
    assert not os.path.exists(tmp_path / "out")


def test_flash_modes_leave_a_core_to_the_reads(monkeypatch):
    """Default torch threads: dense keeps the process's setting; naive/sparse use one core fewer than the
    process may run on (at least one); a user's OMP_NUM_THREADS wins."""
    from flashllm.runtime.core import engine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr(engine, "available_cores", lambda: cores)
        assert engine.default_threads("sparse") == expected
        assert engine.default_threads("naive") == expected
        assert engine.default_threads("dense") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine.default_threads("sparse") is None


def test_an_engine_runs_the_threads_asked(store):
    with Engine(store, mode="naive", max_batch=1, threads=1) as engine:
        assert engine.threads == 1
        ones = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].tokens
    with Engine(store, mode="naive", max_batch=1, threads=2) as engine:
        assert engine.threads == 2
        twos = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].tokens
    assert ones == twos  # the tiny model's greedy tokens do not hinge on reduction order
