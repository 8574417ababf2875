"""`flashllm synth`: a store of random weights in a named model's shape, end to end on the tiny shapes.

The 7B shapes are only checked for their arithmetic (bundle and store sizes);
writing one takes minutes and gigabytes, so the suite never does.
"""
from __future__ import annotations

import json
import os

import pytest

from flashllm.protocol.store_format import FFN_FILE, MANIFEST_FILE, read_manifest
from flashllm.runtime.clients.cli import main as flashllm
from flashllm.runtime.tools.convert.shapes import SHAPES
from flashllm.runtime.tools.convert.store_writer import estimate_store_bytes, plan_store
from flashllm.runtime.tools.convert.synthetic_source import SyntheticSource
from flashllm.runtime.tools.synth import SYNTH_DTYPES

SYNTHETIC_NOTICE = "random weights in the shape of tiny-llama"


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth") / "tiny-q4_0")
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", out, "--seed", "7", "--quiet"]) == 0
    return out


def test_synth_writes_a_store_that_verifies_and_says_it_is_synthetic(synth_store, capsys):
    assert flashllm(["verify", "--store", synth_store]) == 0
    assert f"{synth_store}: ok" in capsys.readouterr().out
    manifest = read_manifest(synth_store)
    assert manifest.synthetic is not None
    assert (manifest.synthetic.shape, manifest.synthetic.seed) == ("tiny-llama", 7)
    assert manifest.dtype == "q4_0" and manifest.ffn.is_quantized
    shape = SHAPES["tiny-llama"]
    assert (manifest.arch.hidden_size, manifest.arch.intermediate_size, manifest.arch.num_hidden_layers,
            manifest.arch.vocab_size) == (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers,
                                          shape.vocab_size)
    with open(os.path.join(synth_store, MANIFEST_FILE), encoding="utf-8") as f:
        assert json.load(f)["synthetic"]["shape"] == "tiny-llama"
    assert not os.path.exists(synth_store + ".partial")


def test_generate_on_a_synthetic_store_runs_and_prints_the_notice_every_run(synth_store, capsys):
    for _ in range(2):
        assert flashllm(["generate", "--store", synth_store, "--max-tokens", "5", "--ignore-eos", "--json",
                         "Hello"]) == 0
        captured = capsys.readouterr()
        assert captured.err.count(SYNTHETIC_NOTICE) == 1
        [line] = captured.out.splitlines()
        result = json.loads(line)
        assert len(result["tokens"]) == 5 and result["prompt_tokens"] == len("Hello") + 1  # a byte each + BOS
        assert all(0 <= token < SHAPES["tiny-llama"].vocab_size for token in result["tokens"])


def test_a_real_store_prints_no_synthetic_notice(tiny_stores, capsys):
    assert flashllm(["generate", "--store", tiny_stores("llama"), "--max-tokens", "2", "hi"]) == 0
    assert "random weights" not in capsys.readouterr().err


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(synth_store, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", again, "--seed", "7",
                     "--quiet"]) == 0
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", other, "--seed", "8",
                     "--quiet"]) == 0

    def ffn_bytes(store: str) -> bytes:
        with open(os.path.join(store, FFN_FILE), "rb") as f:
            return f.read()

    assert ffn_bytes(again) == ffn_bytes(synth_store)
    assert ffn_bytes(other) != ffn_bytes(synth_store)
    assert read_manifest(again).resident_sha256 == read_manifest(synth_store).resident_sha256


@pytest.mark.parametrize("dtype", ["float16", "q8_0"])
def test_opt_shape_in_other_dtypes_verifies_and_generates(dtype, tmp_path, capsys):
    out = str(tmp_path / "opt")
    assert flashllm(["synth", "--shape", "tiny-opt", "--dtype", dtype, "--out", out, "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.arch.family == "opt" and manifest.dtype == dtype
    assert flashllm(["verify", "--store", out]) == 0
    assert flashllm(["generate", "--store", out, "--max-tokens", "3", "--ignore-eos", "--json", "x"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"]) == 3


@pytest.mark.parametrize("option, value, choice", [("--shape", "llama-3-405b", "llama-2-7b"),
                                                   ("--dtype", "q4_k", "q4_0")])
def test_a_bad_shape_or_dtype_is_refused_with_the_choices_and_leaves_nothing(option, value, choice, tmp_path,
                                                                              capsys):
    out = tmp_path / "store"
    args = {"--shape": "tiny-llama", "--dtype": "q4_0", option: value}
    with pytest.raises(SystemExit) as exit_info:
        flashllm(["synth", "--shape", args["--shape"], "--dtype", args["--dtype"], "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{value}'" in err and choice in err
    assert os.listdir(tmp_path) == []


def test_an_existing_store_is_kept_without_force(synth_store, capsys):
    before = os.path.getmtime(os.path.join(synth_store, FFN_FILE))
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", synth_store, "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(synth_store, FFN_FILE)) == before
    assert not os.path.exists(synth_store + ".partial")


def test_a_failed_write_leaves_no_partial_store(tmp_path, monkeypatch):
    from flashllm.runtime.tools.convert import synthetic_source

    def fail_at_layer_two(self, layer):
        if layer == 2:
            raise OSError("disk gone")
        return original(self, layer)

    original = synthetic_source.SyntheticSource.load_ffn
    monkeypatch.setattr(synthetic_source.SyntheticSource, "load_ffn", fail_at_layer_two)
    out = tmp_path / "store"
    with pytest.raises(OSError, match="disk gone"):
        flashllm(["synth", "--shape", "tiny-llama", "--dtype", "float16", "--out", str(out), "--quiet"])
    assert os.listdir(tmp_path) == []


# parameter counts Hugging Face reports for each checkpoint: a float16 store holds each parameter once, in 2 bytes
@pytest.mark.parametrize("name, parameters, float16_bundle_bytes, q4_0_bundle_bytes", [
    ("llama-2-7b", 6_738_415_616, 3 * 4096 * 2, 2 * 2304 + 2048),  # [gate | up | down]; q4_0: 18 B per 32 + nibbles
    ("llama-2-13b", 13_015_864_320, 3 * 5120 * 2, 2 * 2880 + 2560 + 384),  # q4_0 padded to 512-byte blocks
    ("mistral-7b", 7_241_732_096, 3 * 4096 * 2, 2 * 2304 + 2048),
    ("opt-6.7b", 6_658_473_984, 2 * 4096 * 2 + 2, 2304 + 2048 + 4 + 252),  # [up | down | up_bias]
])
def test_the_large_shapes_plan_the_real_models_sizes(name, parameters, float16_bundle_bytes, q4_0_bundle_bytes):
    shape = SHAPES[name]
    assert shape.source.startswith("https://huggingface.co/") and shape.source.endswith("config.json")
    source = SyntheticSource(name, shape, seed=0)
    float16_plan = plan_store(source, "float16")
    assert float16_plan.bundle_bytes == float16_bundle_bytes
    assert estimate_store_bytes(source, float16_plan) == 2 * parameters
    assert plan_store(source, "q4_0").bundle_bytes == q4_0_bundle_bytes


def test_gguf_holds_the_same_weights_as_the_store(synth_store, tmp_path):
    from flashllm.runtime.tools.convert.store_writer import convert

    out, gguf = str(tmp_path / "store"), str(tmp_path / "tiny.gguf")
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", out, "--seed", "7",
                     "--gguf", gguf, "--quiet"]) == 0
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    # flashllm's own GGUF reader keeps the Q4_0 blocks: the store it converts is the synth store, byte for byte
    back = convert(gguf, str(tmp_path / "back"), progress=False)
    with open(os.path.join(synth_store, FFN_FILE), "rb") as a, open(os.path.join(tmp_path, "back", FFN_FILE), "rb") as b:
        assert a.read() == b.read()
    assert back.resident_sha256 == read_manifest(synth_store).resident_sha256  # Q/K permuted and unpermuted
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_gguf_of_an_opt_shape_is_refused_before_anything_is_written(tmp_path, capsys):
    out, gguf = tmp_path / "store", tmp_path / "opt.gguf"
    assert flashllm(["synth", "--shape", "tiny-opt", "--dtype", "float16", "--out", str(out), "--gguf", str(gguf),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashllm synth: error: --gguf") and "llama-2-7b" in err
    assert os.listdir(tmp_path) == []


def test_a_calibrated_synthetic_store_stays_synthetic_and_runs_sparse(tmp_path, capsys):
    out = str(tmp_path / "store")
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", out, "--quiet"]) == 0
    # --generate-tokens chats with the store: the synthetic tokenizer has a plain chat template for it
    assert flashllm(["calibrate", "--store", out, "--generate-tokens", "200", "--tokens", "600", "--dense-layers", "none",
                     "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.sparsity is not None and manifest.synthetic is not None
    capsys.readouterr()
    assert flashllm(["generate", "--store", out, "--mode", "sparse", "--runtime", "inproc", "--chat", "--max-tokens",
                     "4", "--ignore-eos", "--json", "hi"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(SYNTHETIC_NOTICE) == 1
    result = json.loads(captured.out.splitlines()[-1])
    assert result["mode"] == "sparse" and len(result["tokens"]) == 4


@pytest.mark.parametrize("dtype", SYNTH_DTYPES)
def test_every_store_dtype_verifies(dtype, tmp_path):
    out = str(tmp_path / dtype)
    assert flashllm(["synth", "--shape", "tiny-llama", "--dtype", dtype, "--out", out, "--quiet"]) == 0
    assert flashllm(["verify", "--store", out]) == 0
    assert read_manifest(out).dtype == dtype


def test_the_python_api_names_the_shapes_for_an_unknown_one(tmp_path):
    from flashllm.runtime.tools.convert.sources import ConvertError
    from flashllm.runtime.tools.synth import synthesize

    with pytest.raises(ConvertError, match="llama-2-7b, llama-2-13b, mistral-7b, opt-6.7b"):
        synthesize("gpt-5", str(tmp_path / "store"), "q4_0")
    with pytest.raises(ConvertError, match=", ".join(SYNTH_DTYPES)):
        synthesize("tiny-llama", str(tmp_path / "store"), "q4_k")
    assert os.listdir(tmp_path) == []
