"""Text in and out at serving time: encode prompts, render chat templates, stream text.

`Tokenizer` wraps the store's tokenizer.json (a `tokenizers` tokenizer) and its
`TokenizerInfo`; `info.add_bos_token` is the one switch for BOS (the json's
own post-processor is not used). Streaming is two small state machines:

    tokens ──push()──▶ IncrementalDetokenizer ──text──▶ StopStringMatcher ──feed()──▶ client
                       (whole UTF-8 characters)         (holds back what may start a stop string)
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer

from flashllm.protocol.store_format import StoreError, TokenizerInfo

_INCOMPLETE_CHAR = "\ufffd"  # what a lossy UTF-8 decode shows for a character cut short


class ChatTemplateError(ValueError):
    """The store has no chat template, or the template refused the conversation."""


class Tokenizer:
    """The store's tokenizer: text <-> token ids, and chat rendering."""

    def __init__(self, backend: HfTokenizer, info: TokenizerInfo, eos_token_ids: list[int]):
        self._backend = backend
        self.info = info
        self._eos_token_ids = list(eos_token_ids)
        self._bos_token_id: int | None = None
        if info.add_bos_token:
            self._bos_token_id = backend.token_to_id(info.bos_token) if info.bos_token is not None else None
            if self._bos_token_id is None:
                raise StoreError(
                    f"tokenizer: the store asks for a BOS token but {info.bos_token!r} is not in its vocabulary; "
                    "re-run `flashllm convert`"
                )
        self._chat_template = _compile_chat_template(info.chat_template) if info.chat_template else None

    @classmethod
    def from_store(cls, store_dir: str, info: TokenizerInfo, eos_token_ids: list[int]) -> "Tokenizer":
        path = os.path.join(store_dir, info.file)
        if not os.path.isfile(path):
            raise StoreError(f"{path}: tokenizer file missing; re-run `flashllm convert` to rebuild the store")
        try:
            backend = HfTokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise StoreError(f"{path}: not a readable tokenizers file ({exc}); re-run `flashllm convert`") from exc
        return cls(backend, info, eos_token_ids)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        """The id prepended to every encoded prompt, or None when the model wants none."""
        return self._bos_token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text ("<|im_start|>") become their ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._bos_token_id is not None:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation, rendered like transformers' apply_chat_template(tokenize=False).

        `extra` reaches the template as variables (e.g. tools=..., enable_thinking=False).
        """
        if self._chat_template is None:
            raise ChatTemplateError(
                "this model's store has no chat template; send a plain prompt instead of chat messages"
            )
        # tools/documents default to None (not undefined), as transformers passes them
        variables = {"bos_token": self.info.bos_token, "eos_token": self.info.eos_token,
                     "tools": None, "documents": None, **extra}
        try:
            return self._chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected the conversation: {exc}") from exc


def _compile_chat_template(source: str) -> jinja2.Template:
    """A sandboxed template with the environment chat templates are written for (transformers')."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which templates do not expect
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(date_format: str) -> str:
        return datetime.now().strftime(date_format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the store's chat template does not parse (line {exc.lineno}: {exc.message})") from exc


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text that adds up to `decode(all ids)`.

    One character can span several tokens (byte-level BPE splits an emoji into byte
    tokens), and a token's text can depend on its neighbours (SentencePiece strips
    the first space), so each step decodes a short window of recent tokens and emits
    only what the window adds, and only once it ends on a whole character:

        ids:  ... | prefix_offset ......... read_offset | new ...
                    already emitted context             not yet emitted
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still cut short."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is still held back at the end of the stream (a character never completed shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        window = decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        if len(window) <= len(emitted) or (window.endswith(_INCOMPLETE_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(emitted):]


class StopStringMatcher:
    """Cuts a text stream at the first stop string, never emitting any part of it.

    Text that could be the start of a stop string is held back until the next
    piece shows whether it is; at the end of a stream `flush()` releases it.
    """

    def __init__(self, stops: list[str]):
        if any(not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def feed(self, new_text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit). After a hit, nothing more is emitted."""
        if self.stopped:
            return "", True
        text = self._held + new_text
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)], True
        keep = self._longest_stop_prefix_at_end(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once the stream ended without reaching a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_at_end(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
