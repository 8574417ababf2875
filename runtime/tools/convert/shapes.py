"""Named model shapes that `flashllm synth` writes random-weight stores of.

Each entry copies the architecture fields of the model's Hugging Face
config.json (the URL in `source`), so a synthetic store has the real model's
tensor shapes, bundle sizes and read pattern; only the weight values are random.
Fields flashllm does not model are left out (Mistral's sliding-window attention:
flashllm attends to the whole context, which for prompts shorter than the
window is the same computation).
"""
from __future__ import annotations

from dataclasses import dataclass

from flashllm.protocol.store_format import ArchConfig
from flashllm.runtime.tools.convert.sources import ConvertError

SYNTHETIC_BOS_TOKEN_ID = 1  # the byte-level tokenizer's <s> (synthetic_tokenizer.py)
SYNTHETIC_EOS_TOKEN_ID = 2  # its </s>


@dataclass(frozen=True)
class ModelShape:
    """A model's architecture with Hugging Face config.json field names."""

    source: str  # where the numbers come from
    model_type: str  # "llama", "mistral" or "opt"
    hidden_size: int
    intermediate_size: int  # OPT's ffn_dim
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    hidden_act: str  # "silu" (gated SwiGLU) or "relu" (OPT's activation_function)
    tie_word_embeddings: bool
    norm_eps: float  # rms_norm_eps; OPT's LayerNorm eps is fixed at 1e-5
    rope_theta: float = 10000.0  # unused by OPT (learned positions)
    initializer_range: float = 0.02  # std of the random weights (OPT: init_std)

    def arch(self) -> ArchConfig:
        opt = self.model_type == "opt"
        return ArchConfig(
            family="opt" if opt else "llama",
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            gated_ffn=not opt,
            tie_word_embeddings=self.tie_word_embeddings,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            attention_bias=opt,
            do_layer_norm_before=True,
            bos_token_id=SYNTHETIC_BOS_TOKEN_ID,
            eos_token_ids=[SYNTHETIC_EOS_TOKEN_ID],
            source_model_type=self.model_type,
        )


SHAPES: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(
        source="https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json",
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        hidden_act="silu", tie_word_embeddings=False, norm_eps=1e-5, rope_theta=10000.0),
    "llama-2-13b": ModelShape(
        source="https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json",
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
        hidden_act="silu", tie_word_embeddings=False, norm_eps=1e-5, rope_theta=10000.0),
    "mistral-7b": ModelShape(
        source="https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json",
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        hidden_act="silu", tie_word_embeddings=False, norm_eps=1e-5, rope_theta=10000.0),
    "opt-6.7b": ModelShape(
        source="https://huggingface.co/facebook/opt-6.7b/blob/main/config.json",
        model_type="opt", hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=50272, max_position_embeddings=2048,
        hidden_act="relu", tie_word_embeddings=True, norm_eps=1e-5),
    # a few MiB, for the test suite: the llama layout with grouped-query attention
    "tiny-llama": ModelShape(
        source="flashllm's own test shape", model_type="llama", hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=2048, hidden_act="silu", tie_word_embeddings=False, norm_eps=1e-5),
    "tiny-opt": ModelShape(
        source="flashllm's own test shape", model_type="opt", hidden_size=256, intermediate_size=1024,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
        max_position_embeddings=2048, hidden_act="relu", tie_word_embeddings=True, norm_eps=1e-5),
}


def shape_named(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ConvertError(f"--shape {name!r} is not a known model shape; use one of {', '.join(SHAPES)}")
    return SHAPES[name]
