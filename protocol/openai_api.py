"""OpenAI's `/v1/chat/completions` and `/v1/completions` shapes, translated to and from flashllm's own.

One place reads an OpenAI request body (from the HTTP front door or from an
OpenAI batch-format line) into a `CompletionJob`: the prompts, the sampling
fields by flashllm's names, streaming options. One place writes the response
bodies, stream chunks and error objects back in OpenAI's shapes. Fields
flashllm cannot honour are refused with a 400 naming the field, never ignored.

Pure Python: the daemon's HTTP app and `flashllm batch` both import it.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from flashllm.protocol.client_api import (MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOKENS,
                                          ErrorCode)

CHAT = "chat"
COMPLETION = "completion"
ENDPOINT_URLS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions"}
# OpenAI's own default for /v1/completions; chat answers run to the end of the turn (or of the context).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions request (one choice each)


class OpenAIError(Exception):
    """An error for the client, in OpenAI's error object, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# flashllm's ErrorCode → (HTTP status, OpenAI error type)
_STATUS_OF_CODE = {
    ErrorCode.MALFORMED: (400, "invalid_request_error"),
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.DUPLICATE_ID: (400, "invalid_request_error"),
    ErrorCode.TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def error_for_code(code: str, message: str) -> OpenAIError:
    """The OpenAI error for one of flashllm's refusals (scheduler or protocol ErrorCode)."""
    status, kind = _STATUS_OF_CODE.get(code, (500, "server_error"))
    return OpenAIError(status, message, kind, code=code)


def bad_field(name: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=name, code="invalid_value")


# ---------------------------------------------------------------------- requests


@dataclass
class CompletionJob:
    """What one chat or completions request asks for, in flashllm's terms."""

    endpoint: str  # CHAT or COMPLETION
    model: str
    prompts: list  # one per choice: text, token ids (list[int]) or chat messages (list of {"role", "content"})
    sampling: dict  # runtime.core.sampling.SamplingParams fields by name
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


# Accepted fields whose only supported value is OpenAI's default (None counts as absent everywhere).
_ONLY_DEFAULT = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                 "top_logprobs": 0, "echo": False, "suffix": None, "logit_bias": None, "tools": None,
                 "tool_choice": None, "response_format": None}
_SAMPLING = ("temperature", "top_p", "seed", "stop", "stream", "stream_options", "user", "top_k", "ignore_eos")
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", *_SAMPLING, "n", "frequency_penalty",
               "presence_penalty", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice",
               "response_format"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", *_SAMPLING, "n", "best_of", "frequency_penalty",
                     "presence_penalty", "logprobs", "echo", "suffix", "logit_bias"}


def parse_request(endpoint: str, body: Any) -> CompletionJob:
    """A CompletionJob from a chat or completions request body; OpenAIError(400) naming the field if not."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    known = CHAT_FIELDS if endpoint == CHAT else COMPLETION_FIELDS
    for name, value in body.items():
        if name not in known:
            raise bad_field(name, f"{name!r} is not supported by flashllm's {ENDPOINT_URLS[endpoint]}; "
                                  f"supported fields: {', '.join(sorted(known))}")
        if name in _ONLY_DEFAULT and value is not None and value != _ONLY_DEFAULT[name] and value != []:
            raise bad_field(name, f"{name}={_short(value)} is not supported: flashllm supports only "
                                  f"{name}={_ONLY_DEFAULT[name]!r} (leave it out)")
    fields = {k: v for k, v in body.items() if v is not None}
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "model is missing: give the model's name (GET /v1/models lists it)")
    if endpoint == CHAT:
        prompts = [_messages(fields.get("messages"))]
        max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens", MAX_TOKENS))
        max_name = "max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"
    else:
        prompts = _prompts(fields.get("prompt"))
        max_tokens = fields.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
        max_name = "max_tokens"
    stream = _typed(fields, "stream", bool, False)
    options = fields.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_field("stream_options", "stream_options must be an object like {\"include_usage\": true}")
    options = options or {}
    unknown_options = [k for k in options if k != "include_usage"]
    if unknown_options:
        raise bad_field("stream_options", f"stream_options.{unknown_options[0]} is not supported; "
                                          "only include_usage is")
    if options and not stream:
        raise bad_field("stream_options", "stream_options is only allowed with stream=true")
    sampling = {
        "max_tokens": _integer(max_name, max_tokens, 1, MAX_TOKENS),
        "temperature": _number("temperature", fields.get("temperature", 1.0), 0.0, 100.0),
        "top_p": _number("top_p", fields.get("top_p", 1.0), 0.0, 1.0),
        "top_k": _integer("top_k", fields.get("top_k", 0), 0, 2**31 - 1),
        "seed": _integer("seed", fields["seed"], 0, 2**63 - 1) if "seed" in fields else None,
        "stop": _stop(fields.get("stop")),
        "ignore_eos": _typed(fields, "ignore_eos", bool, False),
    }
    if sampling["top_p"] == 0.0:
        raise bad_field("top_p", "top_p=0 is invalid: must be a number in (0, 1]")
    return CompletionJob(endpoint=endpoint, model=model, prompts=prompts, sampling=sampling, stream=stream,
                         include_usage=_typed(options, "include_usage", bool, False))


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
    if len(value) > MAX_MESSAGES:
        raise OpenAIError(413, f"messages holds {len(value)} turns, more than the {MAX_MESSAGES} allowed",
                          param="messages", code="too_large")
    turns, chars = [], 0
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(where, f"{where} must be an object with role and content")
        unknown = [k for k in message if k not in ("role", "content", "name")]
        if unknown:
            raise bad_field(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported (tool calls and "
                                                     "other message fields are not); give role and content")
        role = message.get("role")
        if not isinstance(role, str) or not 1 <= len(role) <= 32:
            raise bad_field(f"{where}.role", f"{where}.role must be a string like \"user\", got {_short(role)}")
        content = _content(message.get("content"), f"{where}.content")
        chars += len(content)
        turns.append({"role": role, "content": content})
    if chars > MAX_PROMPT_CHARS:
        raise OpenAIError(413, f"the messages hold {chars} characters, more than the {MAX_PROMPT_CHARS} allowed",
                          param="messages", code="too_large")
    return turns


def _content(value: Any, where: str) -> str:
    """Text of a message: a string, or a list of {"type": "text", "text": ...} parts (other parts refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_field(f"{where}[{j}]", f"{where}[{j}] of type {_short(kind)} is not supported: "
                                                 "flashllm reads text parts only ({\"type\": \"text\", \"text\": ...})")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_field(where, f"{where} must be a string or a list of text parts, got {_short(value)}")


def _prompts(value: Any) -> list:
    """prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    def token_ids(ids: list, where: str) -> list[int]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise bad_field("prompt", f"{where} must be a non-empty list of token ids (integers ≥ 0)")
        return list(ids)

    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        prompts = [token_ids(value, "prompt")]
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = [token_ids(p, f"prompt[{i}]") for i, p in enumerate(value)]
    else:
        raise bad_field("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of "
                                  f"token-id lists, got {_short(value)}")
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(413, f"prompt holds {len(prompts)} prompts, more than the {MAX_PROMPTS} allowed per "
                               "request; send several requests", param="prompt", code="too_large")
    for p in prompts:
        if len(p) > MAX_PROMPT_CHARS:
            raise OpenAIError(413, f"a prompt of {len(p)} characters is over the limit of {MAX_PROMPT_CHARS}",
                              param="prompt", code="too_large")
    return prompts


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad_field("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of "
                                f"1..{MAX_STOP_CHARS} characters, got {_short(value)}")
    return list(stops)


def _typed(fields: dict, name: str, kind: type, default: Any) -> Any:
    value = fields.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad_field(name, f"{name} must be {kind.__name__}, got {_short(value)}")
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_field(name, f"{name}={_short(value)} is invalid: must be an integer in {low}..{high}")
    return value


def _number(name: str, value: Any, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        raise bad_field(name, f"{name}={_short(value)} is invalid: must be a number in {low:g}..{high:g}")
    return float(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# ---------------------------------------------------------------------- responses


@dataclass
class Choice:
    """One finished choice: what the engine made of one prompt."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def new_completion_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT else "cmpl-") + secrets.token_hex(12)


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(job: CompletionJob, completion_id: str, created_s: int, choices: list[Choice]) -> dict:
    """The whole (non-streamed) response: chat.completion or text_completion."""
    if job.endpoint == CHAT:
        shaped = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                   "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        kind = "chat.completion"
    else:
        shaped = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                  for i, c in enumerate(choices)]
        kind = "text_completion"
    # a prompt list runs each prompt once: its tokens count once per choice
    usage = usage_body(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices))
    return {"id": completion_id, "object": kind, "created": created_s, "model": job.model,
            "system_fingerprint": None, "choices": shaped, "usage": usage}


def chunk_body(job: CompletionJob, completion_id: str, created_s: int, index: int, text: str | None,
               finish_reason: str | None = None, first: bool = False) -> dict:
    """One streamed chunk of choice `index`: new text, or (text None) its finish_reason."""
    if job.endpoint == CHAT:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    chunk = {"id": completion_id, "object": kind, "created": created_s, "model": job.model,
             "system_fingerprint": None, "choices": [choice]}
    if job.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk_body(job: CompletionJob, completion_id: str, created_s: int, prompt_tokens: int,
                     completion_tokens: int) -> dict:
    """The last chunk before [DONE] when stream_options.include_usage: no choices, the request's usage."""
    kind = "chat.completion.chunk" if job.endpoint == CHAT else "text_completion"
    return {"id": completion_id, "object": kind, "created": created_s, "model": job.model,
            "system_fingerprint": None, "choices": [], "usage": usage_body(prompt_tokens, completion_tokens)}
