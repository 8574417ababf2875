"""The tokenizer of a synthetic store: one token per byte, padded to the shape's vocabulary.

Ids 0-2 are <unk>, <s>, </s> (Llama's ids), 3-258 the 256 bytes (GPT-2's
byte-to-character map, so any text encodes and any byte sequence decodes),
and the rest reserved tokens that no text encodes to but random weights may
sample: they decode as their own name. Prompts therefore cost one token per
byte, and generated text is as meaningless as the weights.
"""
from __future__ import annotations

from flashllm.runtime.tools.convert.shapes import SYNTHETIC_BOS_TOKEN_ID, SYNTHETIC_EOS_TOKEN_ID
from flashllm.runtime.tools.convert.sources import ConvertError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# plain role headers, so that `generate --chat` and `calibrate --generate-tokens` run on a synthetic store
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
BYTE_TOKENS = 256


def byte_tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level tokenizer with exactly vocab_size tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    smallest = len(SPECIAL_TOKENS) + BYTE_TOKENS
    if vocab_size < smallest:
        raise ConvertError(f"vocab_size {vocab_size}: a byte-level tokenizer needs at least {smallest} tokens")
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(byte_chars, key=_byte_of_char):
        vocab[char] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    assert tok.token_to_id(SPECIAL_TOKENS[SYNTHETIC_BOS_TOKEN_ID]) == SYNTHETIC_BOS_TOKEN_ID
    assert tok.token_to_id(SPECIAL_TOKENS[SYNTHETIC_EOS_TOKEN_ID]) == SYNTHETIC_EOS_TOKEN_ID
    return tok.to_str()


def byte_tokenizer_info() -> dict:
    """The TokenizerInfo fields a synthetic store's manifest records."""
    return {"chat_template": CHAT_TEMPLATE, "bos_token": SPECIAL_TOKENS[SYNTHETIC_BOS_TOKEN_ID],
            "eos_token": SPECIAL_TOKENS[SYNTHETIC_EOS_TOKEN_ID], "add_bos_token": True}


def _byte_of_char(char: str) -> int:
    """GPT-2's byte-to-character map, inverted: printable bytes stand for themselves, the rest for 256 + n."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
