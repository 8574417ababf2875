"""Rebuild a Hugging Face `tokenizers` tokenizer from a GGUF file's metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the token
types, the merges (or per-token scores) and a pre-tokenizer *name* as metadata.
This module turns that back into a `tokenizers.Tokenizer` (the store's
tokenizer.json) with the `tokenizers` library alone, so neither convert nor
serving needs transformers.

Two vocabulary kinds, as llama.cpp names them in `tokenizer.ggml.model`:

- "gpt2": byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (space is
  "Ġ"); the merges are in the file. How text is split before BPE depends on
  `tokenizer.ggml.pre` (see `BYTE_LEVEL_PRESETS`), as in llama.cpp's
  llama-vocab.cpp.
- "llama": SentencePiece BPE. Tokens use "▁" for space, merges are implied by
  the per-token scores (a higher score merges first), characters missing from
  the vocabulary fall back to "<0xXX>" byte tokens, and a space is prepended to
  the text (and after every special token, as llama.cpp and sentencepiece's
  legacy behaviour do) when `tokenizer.ggml.add_space_prefix` says so.

Token ids are the GGUF's: token i of the file is id i of the tokenizer.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger(__name__)

SPM_SPACE = "\u2581"  # "▁": sentencepiece's visible space


class GgufTokenType(enum.IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Regexes of the original tokenizer.json files, which llama.cpp names by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class ByteLevelPreset:
    """How a byte-level BPE vocabulary splits text before merging."""

    split_regex: str | None = None  # None: GPT-2's regex (built into ByteLevel)
    individual_digits: bool = False  # every digit its own piece, before the regex
    ignore_merges: bool = False  # a piece that is already a token is not merged (llama3)
    add_bos_default: bool = False  # when the file has no tokenizer.ggml.add_bos_token


_GPT2 = ByteLevelPreset()
_STARCODER = ByteLevelPreset(individual_digits=True)
_LLAMA3 = ByteLevelPreset(split_regex=_LLAMA3_SPLIT, ignore_merges=True, add_bos_default=True)
_QWEN2 = ByteLevelPreset(split_regex=_QWEN2_SPLIT)
_TEKKEN = ByteLevelPreset(split_regex=_TEKKEN_SPLIT, ignore_merges=True, add_bos_default=True)
_GPT4O = ByteLevelPreset(split_regex=_GPT4O_SPLIT)

# `tokenizer.ggml.pre` -> preset, grouped as llama.cpp groups them.
BYTE_LEVEL_PRESETS: dict[str, ByteLevelPreset] = {
    **dict.fromkeys(["default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais",
                     "trillion", "granite-docling"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], _STARCODER),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"], _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], _GPT4O),
}

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> tuple[str, dict]:
    """The store's tokenizer.json text and the TokenizerInfo fields (all but `file`).

    Raises ValueError for a vocabulary kind other than SUPPORTED_TOKENIZER_MODELS.
    """
    meta = _TokenizerMetadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer, add_bos_default = _byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer, add_bos_default = _sentencepiece_bpe(meta), True
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; flashllm can rebuild "
            f"{', '.join(repr(k) for k in SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE, SentencePiece BPE). "
            "Convert from the model's Hugging Face checkpoint folder instead, which carries a tokenizer.json."
        )
    _add_special_tokens(tokenizer, meta.tokens, meta.token_types)

    add_bos_token = meta.get("tokenizer.ggml.add_bos_token")
    add_bos_token = bool(add_bos_default if add_bos_token is None else add_bos_token)
    bos_token = meta.token_text("tokenizer.ggml.bos_token_id")
    if add_bos_token and bos_token is None:
        log.warning("GGUF asks for a BOS token but names none (tokenizer.ggml.bos_token_id); prompts get no BOS")
        add_bos_token = False
    info = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": bos_token,
        "eos_token": meta.token_text("tokenizer.ggml.eos_token_id"),
        "add_bos_token": add_bos_token,
    }
    _set_post_processor(tokenizer, meta, info)
    return tokenizer.to_str(), info


class _TokenizerMetadata:
    """The `tokenizer.*` fields of a GGUF, decoded to Python values."""

    def __init__(self, reader: gguf.GGUFReader):
        self._reader = reader
        self.tokens: list[str] = self.require("tokenizer.ggml.tokens")
        types = self.get("tokenizer.ggml.token_type")
        self.token_types: list[int] = list(types) if types is not None else [GgufTokenType.NORMAL] * len(self.tokens)
        if len(self.token_types) != len(self.tokens):
            raise ValueError(
                f"GGUF has {len(self.tokens)} tokens but {len(self.token_types)} token types; the file is malformed"
            )

    def get(self, key: str) -> Any:
        field = self._reader.fields.get(key)
        return None if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF has no {key}; it carries no tokenizer flashllm can rebuild")
        return value

    def token_text(self, id_key: str) -> str | None:
        token_id = self.get(id_key)
        if token_id is None or not 0 <= int(token_id) < len(self.tokens):
            return None
        return self.tokens[int(token_id)]


def _vocab_by_text(spellings: list[str]) -> dict[str, int]:
    """text -> id, keeping the first id where the file spells two tokens the same."""
    vocab: dict[str, int] = {}
    duplicates = 0
    for token_id, text in enumerate(spellings):
        if text in vocab:
            duplicates += 1
        else:
            vocab[text] = token_id
    if duplicates:
        log.warning("GGUF vocabulary spells %d tokens like an earlier one; those ids can be decoded "
                    "from the file but never produced by encoding", duplicates)
    return vocab


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level_bpe(meta: _TokenizerMetadata) -> tuple[Tokenizer, bool]:
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    preset = BYTE_LEVEL_PRESETS.get(pre_name)
    if preset is None:
        log.warning("GGUF pre-tokenizer %r (tokenizer.ggml.pre) is not known to flashllm; splitting text with "
                    "GPT-2's regex, which may tokenize some text differently from llama.cpp", pre_name)
        preset = _GPT2

    merges_text = meta.get("tokenizer.ggml.merges")
    if not merges_text:
        raise ValueError("GGUF byte-level BPE vocabulary (tokenizer.ggml.model='gpt2') has no tokenizer.ggml.merges; "
                         "convert from the Hugging Face checkpoint instead")

    # Normal tokens are spelled in the byte alphabet; one spelled with raw text (a converter's slip) is respelled
    # so BPE can reach it. Control and user-defined tokens keep their raw text: that is what they match in a prompt.
    alphabet = _gpt2_byte_alphabet()
    in_alphabet = set(alphabet.values())
    spellings = [
        text if token_type != GgufTokenType.NORMAL or set(text) <= in_alphabet
        else "".join(alphabet[b] for b in text.encode("utf-8"))
        for text, token_type in zip(meta.tokens, meta.token_types)
    ]
    merges = [tuple(merge.split(" ", 1)) for merge in merges_text]
    bpe = models.BPE(vocab=_vocab_by_text(spellings), merges=merges, ignore_merges=preset.ignore_merges)
    tokenizer = Tokenizer(bpe)

    if preset.split_regex is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(preset.split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif preset.individual_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, preset.add_bos_default


def _merges_from_scores(tokens: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a piece into two pieces, best-scored result first.

    sentencepiece (and llama.cpp) repeatedly join the adjacent pair whose joined text is the
    highest-scoring piece; a BPE model whose merge ranks follow that score does the same.
    """
    vocab = {text: token_id for token_id, text in enumerate(tokens) if mergeable[token_id]}
    ranked = []
    for text, token_id in vocab.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()  # highest score first; ties by id, then by cut position
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta: _TokenizerMetadata) -> Tokenizer:
    tokens, types = meta.tokens, meta.token_types
    merges_text = meta.get("tokenizer.ggml.merges")
    if merges_text:
        merges = [tuple(merge.split(" ", 1)) for merge in merges_text]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("GGUF SentencePiece vocabulary has neither tokenizer.ggml.merges nor "
                             "tokenizer.ggml.scores; cannot tell which pieces merge first")
        mergeable = [t in (GgufTokenType.NORMAL, GgufTokenType.UNDEFINED) for t in types]
        merges = _merges_from_scores(tokens, [float(s) for s in scores], mergeable)

    unk_token = meta.token_text("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab=_vocab_by_text(tokens), merges=merges, unk_token=unk_token,
                     fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)

    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix")
    add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    # A normalizer, not the Metaspace pre-tokenizer: it runs on every stretch of text between special tokens
    # (llama.cpp prefixes a space after each), and keeps a leading space the text already has ("▁▁hi").
    escape_spaces = normalizers.Replace(" ", SPM_SPACE)
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend(SPM_SPACE), escape_spaces])
                            if add_space_prefix else escape_spaces)
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens.

    Added tokens are matched whole in the text before any splitting (as llama.cpp does), so
    "<|im_start|>" stays one token instead of being cut into "<", "|", ... . Their text is already
    in the vocabulary, so they keep the file's ids.
    """
    special, user_defined = [], []
    for text, token_type in zip(tokens, token_types):
        if token_type in (GgufTokenType.CONTROL, GgufTokenType.UNKNOWN):
            special.append(AddedToken(text, special=True, normalized=False))
        elif token_type == GgufTokenType.USER_DEFINED:
            user_defined.append(AddedToken(text, special=False, normalized=False))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=False)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:  # an added text missing from the vocab
        raise ValueError("GGUF special tokens do not all appear in its vocabulary; the file is malformed")


def _set_post_processor(tokenizer: Tokenizer, meta: _TokenizerMetadata, info: dict) -> None:
    """Prepend BOS in the tokenizer.json itself too, so it behaves alone as it does in flashllm."""
    if info["add_bos_token"]:
        bos, bos_id = info["bos_token"], int(meta.get("tokenizer.ggml.bos_token_id"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
