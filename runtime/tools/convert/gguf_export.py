"""`flashllm synth --gguf OUT.gguf`: the same random weights as a llama-architecture GGUF file.

llama.cpp can then run the very model flashllm runs, for side-by-side speed and
memory. Each matrix is stored in the kind the flashllm store holds it in
(store_writer.plan_store decides, once, for both), with the same bytes:
quant_format's q8_0/q4_0 blocks are GGUF's, so `flashllm convert OUT.gguf`
gives back the synth store's ffn.bin byte for byte. Q and K rows are permuted
the way llama.cpp's converter permutes them (its RoPE pairs adjacent elements);
norms are float32 as llama.cpp expects. Tensors are written one at a time after
a header that lists them all, so memory stays at one layer's FFN.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from flashllm.protocol import quant_format as qf
from flashllm.runtime.tools.convert.sources import ConvertError, gguf_tensor_name
from flashllm.runtime.tools.convert.store_writer import StorePlan
from flashllm.runtime.tools.convert.synthetic_tokenizer import BYTE_TOKENS, SPECIAL_TOKENS

# gguf.GGMLQuantizationType names of the store kinds
GGML_TYPE_OF_KIND = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
# gguf.LlamaFileType names: the file's label for its matrices' kind (llama.cpp prints it)
FILE_TYPE_OF_DTYPE = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                      "q4_0": "MOSTLY_Q4_0"}
# gguf.TokenType values of the SentencePiece vocabulary
_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_BYTE, _TOKEN_TYPE_UNUSED = 2, 3, 6, 5


def check_gguf_exportable(source) -> None:
    if source.arch.family != "llama":
        raise ConvertError(f"--gguf: llama.cpp's GGUF has no {source.arch.source_model_type} architecture here; "
                           "choose a llama-family shape (llama-2-7b, llama-2-13b, mistral-7b) or leave out --gguf")


def _rope_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate_half row order → llama.cpp's interleaved pairs (sources._reverse_rope_permutation undoes it)."""
    # (out, in) as (n_head, 2, dim/2, in) → (n_head, dim/2, 2, in)
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensor_layout(source, plan: StorePlan) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """[(GGUF name, float shape, store kind)] in the order the file holds them."""
    arch = source.arch
    resident = {tensor.name: tensor for tensor in plan.resident}
    row_kind = plan.dtype
    down_kind = plan.down_block_kind or row_kind
    layout = []
    for name, shape in source.resident_specs():
        kind = "float32" if len(shape) == 1 else resident[name].kind
        layout.append((gguf_tensor_name(name), tuple(shape), kind))
    d, n_ff = arch.hidden_size, arch.intermediate_size
    for layer in range(arch.num_hidden_layers):
        layout += [(f"blk.{layer}.ffn_gate.weight", (n_ff, d), row_kind), (f"blk.{layer}.ffn_up.weight", (n_ff, d), row_kind),
                   (f"blk.{layer}.ffn_down.weight", (d, n_ff), down_kind)]
    return layout


def _add_metadata(writer, source, dtype: str) -> None:
    from gguf import LlamaFileType

    arch = source.arch
    writer.add_name(f"flashllm synth {source.shape_name} (random weights, seed {source.seed})")
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_hidden_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_attention_heads)
    writer.add_head_count_kv(arch.num_key_value_heads)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type(LlamaFileType[FILE_TYPE_OF_DTYPE[dtype]])
    # SentencePiece layout of the synthetic byte tokenizer: <unk> <s> </s>, 256 byte tokens, then reserved ones
    tokens = list(SPECIAL_TOKENS) + [f"<0x{byte:02X}>" for byte in range(BYTE_TOKENS)]
    types = [_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_CONTROL] + [_TOKEN_TYPE_BYTE] * BYTE_TOKENS
    reserved = range(len(tokens), arch.vocab_size)
    tokens += [f"<|reserved_{i}|>" for i in reserved]
    types += [_TOKEN_TYPE_UNUSED] * len(reserved)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(arch.bos_token_id)
    writer.add_eos_token_id(arch.eos_token_ids[0])
    writer.add_add_bos_token(True)


def write_synthetic_gguf(source, plan: StorePlan, path: str, progress: bool = True) -> None:
    """Write `source`'s weights as a GGUF file at `path` (through `path.partial`, renamed when complete)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    check_gguf_exportable(source)
    arch = source.arch
    layout = _tensor_layout(source, plan)
    partial = path + ".partial"
    writer = GGUFWriter(partial, "llama")
    try:
        _add_metadata(writer, source, plan.dtype)
        for name, shape, kind in layout:
            rows = int(np.prod(shape[:-1]))
            n_bytes = rows * qf.bytes_per_row(kind, shape[-1])
            writer.add_tensor_info(name, (*shape[:-1], qf.bytes_per_row(kind, shape[-1])), np.dtype(np.uint8),
                                   n_bytes, raw_dtype=GGMLQuantizationType[GGML_TYPE_OF_KIND[kind]])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        kinds = iter(layout)
        bar = tqdm(total=len(layout), desc="gguf", unit="tensor", disable=not progress)
        for name, shape in source.resident_specs():
            _, _, kind = next(kinds)
            floats = source.load_resident(name)
            if name.endswith("q_proj.weight"):
                floats = _rope_permute(floats, arch.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                floats = _rope_permute(floats, arch.num_key_value_heads)
            writer.write_tensor_data(qf.quantize_rows(kind, floats))  # (rows, bytes) uint8
            bar.update(1)
        for layer in range(arch.num_hidden_layers):
            floats = source.load_ffn(layer)  # {"gate"|"up": (n_ff, d), "down": (d, n_ff)}
            for part in ("gate", "up", "down"):
                _, _, kind = next(kinds)
                writer.write_tensor_data(qf.quantize_rows(kind, floats[part]))
                bar.update(1)
            del floats
        bar.close()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)
        raise
