"""A broken store, a wrong source or a request that cannot fit: each a clear error, not a crash.

Every case is what a user does (load a store, run `flashllm verify`, convert
a checkpoint, send a prompt) and what they read: an error naming the file,
the tensor or layer, and the numbers. Stores are copied before they are broken.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from flashllm.protocol.store_format import FFN_FILE, RESIDENT_FILE, StoreError, read_manifest
from flashllm.runtime.clients.cli import main as flashllm
from flashllm.runtime.tools.convert.sources import SUPPORTED_HF_TYPES, ConvertError
from flashllm.runtime.tools.convert.store_writer import convert
from flashllm.runtime.core.engine import Engine, RequestError
from flashllm.runtime.core.sampling import SamplingParams


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def _safetensors_data_offset(path: str, tensor: str) -> tuple[int, int]:
    """Absolute [start, end) file offsets of one tensor's bytes in a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    start, end = header[tensor]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def _rewrite_checkpoint(folder: str, edit) -> None:
    """Load every tensor of a single-file HF checkpoint, let edit(dict) change it, save it back."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _assert_nothing_written(out: str) -> None:
    assert not os.path.exists(out), f"a failed convert left {out} behind"
    assert not os.path.exists(out + ".partial"), f"a failed convert left {out}.partial behind"


# ---------------------------------------------------------------------- corrupt or truncated store


def test_corrupt_resident_byte_is_refused_naming_file_and_tensor(tiny_stores, tmp_path):
    store = _copy(tiny_stores("llama"), tmp_path / "store")
    tensor = "layers.1.v_proj.weight"
    start, end = _safetensors_data_offset(os.path.join(store, RESIDENT_FILE), tensor)
    _flip_byte(os.path.join(store, RESIDENT_FILE), (start + end) // 2)
    with pytest.raises(StoreError) as err:
        Engine(store)
    assert RESIDENT_FILE in str(err.value)
    assert tensor in str(err.value)


def test_truncated_ffn_file_is_refused_naming_file_and_layer(tiny_stores, tmp_path):
    store = _copy(tiny_stores("llama"), tmp_path / "store")
    manifest = read_manifest(store)
    last = len(manifest.ffn.layers) - 1
    region = manifest.ffn.layers[last]
    os.truncate(os.path.join(store, FFN_FILE), region.offset_bytes + region.length_bytes // 2)
    with pytest.raises(StoreError) as err:
        Engine(store, mode="naive")
    message = str(err.value)
    assert FFN_FILE in message and f"layer {last}" in message and "truncated" in message


def test_verify_catches_a_flipped_byte_inside_an_ffn_region(tiny_stores, tmp_path, capsys):
    store = _copy(tiny_stores("llama"), tmp_path / "store")
    assert flashllm(["verify", "--store", store]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")

    region = read_manifest(store).ffn.layers[1]
    _flip_byte(os.path.join(store, FFN_FILE), region.offset_bytes + region.length_bytes // 3)
    assert flashllm(["verify", "--store", store]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("flashllm verify: error: ")
    assert FFN_FILE in captured.err and "layer 1" in captured.err
    assert "Traceback" not in captured.err


def test_missing_manifest_says_how_to_make_a_store(tmp_path):
    with pytest.raises(StoreError, match="flashllm convert"):
        Engine(str(tmp_path))


# ---------------------------------------------------------------------- sources convert refuses


def test_unsupported_hf_architecture_is_named_with_the_supported_ones(tmp_path):
    import transformers as tf

    folder = str(tmp_path / "gpt2")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    out = str(tmp_path / "store")
    with pytest.raises(ConvertError) as err:
        convert(folder, out, progress=False)
    message = str(err.value)
    assert "'gpt2'" in message
    for supported in SUPPORTED_HF_TYPES:
        assert supported in message
    _assert_nothing_written(out)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    path = str(tmp_path / "tiny-gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConvertError) as err:
        convert(path, str(tmp_path / "store"), progress=False)
    assert "'gpt2'" in str(err.value) and "llama" in str(err.value)
    _assert_nothing_written(str(tmp_path / "store"))


def test_missing_tensor_is_named_and_leaves_no_store(tiny_models, tmp_path):
    folder = _copy(tiny_models("llama"), tmp_path / "checkpoint")
    missing = "model.layers.1.mlp.up_proj.weight"  # layer 0 is written before the gap is found
    _rewrite_checkpoint(folder, lambda tensors: tensors.pop(missing))
    out = str(tmp_path / "store")
    with pytest.raises(ConvertError) as err:
        convert(folder, out, progress=False)
    assert missing in str(err.value)
    _assert_nothing_written(out)


def test_missing_resident_tensor_is_named(tiny_models, tmp_path):
    folder = _copy(tiny_models("qwen2"), tmp_path / "checkpoint")
    missing = "model.layers.0.self_attn.k_proj.bias"
    _rewrite_checkpoint(folder, lambda tensors: tensors.pop(missing))
    out = str(tmp_path / "store")
    with pytest.raises(ConvertError) as err:
        convert(folder, out, progress=False)
    assert missing in str(err.value)
    _assert_nothing_written(out)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_models, tmp_path):
    import torch

    folder = _copy(tiny_models("llama"), tmp_path / "checkpoint")
    name = "model.layers.0.self_attn.q_proj.weight"  # (64, 64) in the tiny llama

    def shrink(tensors):
        tensors[name] = torch.zeros(48, 64)

    _rewrite_checkpoint(folder, shrink)
    out = str(tmp_path / "store")
    with pytest.raises(ConvertError) as err:
        convert(folder, out, progress=False)
    message = str(err.value)
    assert name in message and "(48, 64)" in message and "(64, 64)" in message
    _assert_nothing_written(out)


def test_not_enough_disk_space_is_refused_before_writing(tiny_models, tmp_path, monkeypatch):
    from flashllm.runtime.tools.convert import store_writer

    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(store_writer.shutil, "disk_usage",
                        lambda path: real_disk_usage(path)._replace(free=1 << 20))
    out = str(tmp_path / "store")
    with pytest.raises(ConvertError, match="not enough disk space"):
        convert(tiny_models("llama"), out, progress=False)
    _assert_nothing_written(out)


# ---------------------------------------------------------------------- an existing STORE


def test_convert_over_an_existing_store_needs_force(tiny_models, tmp_path):
    out = str(tmp_path / "store")
    convert(tiny_models("qwen2"), out, dtype="float32", progress=False)

    with pytest.raises(ConvertError, match="already exists.*--force"):
        convert(tiny_models("llama"), out, dtype="float32", progress=False)
    assert read_manifest(out).arch.source_model_type == "qwen2", "the refused convert touched the store"

    convert(tiny_models("llama"), out, dtype="float32", force=True, progress=False)
    assert read_manifest(out).arch.source_model_type == "llama"
    assert not os.path.exists(out + ".partial")
    with Engine(out) as engine:  # the replaced store is whole and loads
        assert engine.arch.attention_bias is False


def test_convert_cli_without_force_exits_2_and_keeps_the_store(tiny_models, tiny_stores, tmp_path, capsys):
    out = _copy(tiny_stores("llama"), tmp_path / "store")
    assert flashllm(["convert", tiny_models("llama"), "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashllm convert: error: ") and "--force" in err
    assert flashllm(["verify", "--store", out]) == 0


# ---------------------------------------------------------------------- requests that cannot fit


def test_prompt_longer_than_the_context_names_both_lengths(tiny_stores):
    with Engine(tiny_stores("llama"), max_batch=2, max_context=64) as engine:
        with pytest.raises(RequestError) as err:
            engine.generate([[0, 5, 6], [0] + [5] * 99])  # the second prompt cannot fit
        message = str(err.value)
        assert "100 tokens" in message and "64" in message
        # the refused batch left nothing queued: the next call runs only its own prompt
        assert engine.num_waiting == 0 and engine.num_running == 0
        [result] = engine.generate([[0, 5, 6]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(result.tokens) == 2


def test_context_cannot_exceed_the_models_positions(tiny_stores):
    with Engine(tiny_stores("llama"), max_context=100_000) as engine:  # tiny llama: 256 positions
        with pytest.raises(RequestError) as err:
            engine.generate([[0] + [5] * 299])
    assert "300" in str(err.value) and "256" in str(err.value)
