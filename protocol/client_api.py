"""What a local program and the daemon say to each other over the ipc:// socket.

One ZeroMQ frame per message, one msgpack map per frame. A request names
itself with "op", a reply with "type"; every message carries the request id
the client chose, so one connection can run many requests at once:

    client (DEALER)                              daemon (ROUTER)
    {"op": "generate", "id": "r1", ...}    ──▶
                                           ◀──   {"type": "chunk", "id": "r1", "text": "Hel", ...}  stream=True
                                           ◀──   {"type": "heartbeat", "id": "r1"}  while nothing else is sent
                                           ◀──   {"type": "final", "id": "r1", "finish_reason": "stop",
                                                  "text": ..., "usage": {...}, "timings": {...}}
    {"op": "cancel", "id": "r1"}           ──▶   (r1 ends with a final, finish_reason "cancelled")
    {"op": "status", "id": "s1"}           ──▶   ◀──  {"type": "status", "id": "s1", ...metrics}
    {"op": "health", "id": "h1"}           ──▶   ◀──  {"type": "health", "id": "h1", "state": "ready", ...}
    anything refused                       ──▶   ◀──  {"type": "error", "id": "r1" | None, "code": ..., "message": .}

Heartbeats keep a client's inactivity timeout from firing while its request
waits in the queue, and let the daemon notice a client that has gone away
(sending to it fails) even when it asked for no stream.

Every message is a dataclass; `validate()` checks types, ranges and sizes
field by field (the rules sit beside the fields), `encode()` / `decode_request()`
/ `decode_reply()` are the one codec. Pure Python + msgpack: a client program
imports this without torch.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

# ---------------------------------------------------------------------- limits

MAX_REQUEST_BYTES = 4 * 2**20  # one request frame; a bigger one is refused unread
MAX_PROMPT_CHARS = 1_000_000  # prompt text, or all chat message contents together
MAX_MESSAGES = 1024  # chat turns in one request
MAX_ID_CHARS = 128
MAX_TOKENS = 1_000_000  # the daemon's context length is the tighter, real bound
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MIN_TEMPERATURE = 1e-3  # below this (and above 0, greedy) sampling is greedy anyway; refused so nobody is surprised
MAX_TEMPERATURE = 100.0
MAX_NESTING_DEPTH = 8  # maps and lists inside one another; a real request needs 3 (request → messages → turn)
MAX_WIRE_ITEMS = 100_000  # values in one request, all levels together


class ErrorCode:
    """The `code` of an ErrorReply: what kind of problem, for programs; `message` says it for people."""

    MALFORMED = "malformed"  # not msgpack, or not a map
    TOO_LARGE = "too_large"  # the frame, the prompt or a list is over its limit
    UNKNOWN_OP = "unknown_op"
    INVALID_REQUEST = "invalid_request"  # a field missing, unknown, of the wrong type or out of range
    PROMPT_TOO_LONG = "prompt_too_long"  # the prompt's tokens do not fit the daemon's context
    DUPLICATE_ID = "duplicate_id"  # this connection already runs a request with that id
    NOT_FOUND = "not_found"  # cancel of an id that is not running
    OVERLOADED = "overloaded"  # the queue is full; retry later
    SHUTTING_DOWN = "shutting_down"  # the daemon is draining and takes no new requests
    WORKER_FAILED = "worker_failed"  # a worker process died during this request's step; the daemon restarted
    #                                  the workers: send the request again
    STORE_CORRUPT = "store_corrupt"  # the weights read for this step failed their checksum: run flashllm verify
    INTERNAL = "internal"  # a bug: the daemon's log says more


RETRYABLE_ERROR_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN, ErrorCode.WORKER_FAILED})


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is an ErrorCode value."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------- field rules


def _rule(check: Callable[[Any], bool], allowed: str, code: str = ErrorCode.INVALID_REQUEST) -> dict:
    """Field metadata: `check(value)` must hold once the type is right; `allowed` tells the user what would."""
    return {"check": check, "allowed": allowed, "code": code}


def _is_id(value: str) -> bool:
    return 1 <= len(value) <= MAX_ID_CHARS


ID_RULE = _rule(_is_id, f"a string of 1..{MAX_ID_CHARS} characters")


def is_valid_temperature(value: float) -> bool:
    return value == 0.0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE


TEMPERATURE_ALLOWED = f"0 (greedy) or a number in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}"


# ---------------------------------------------------------------------- requests (client → daemon)


@dataclass
class ChatMessage:
    role: str = field(metadata=_rule(lambda v: 1 <= len(v) <= 32, "a string of 1..32 characters, e.g. user"))
    content: str = field(metadata=_rule(lambda v: len(v) <= MAX_PROMPT_CHARS,
                                        f"at most {MAX_PROMPT_CHARS} characters", ErrorCode.TOO_LARGE))


@dataclass
class GenerateRequest:
    """Generate text for a prompt or a conversation; exactly one of prompt / messages."""

    op: ClassVar[str] = "generate"
    id: str = field(metadata=ID_RULE)  # chosen by the client, unique among its running requests
    prompt: str | None = field(default=None, metadata=_rule(
        lambda v: len(v) <= MAX_PROMPT_CHARS, f"at most {MAX_PROMPT_CHARS} characters", ErrorCode.TOO_LARGE))
    messages: list[ChatMessage] | None = field(default=None, metadata=_rule(
        lambda v: len(v) <= MAX_MESSAGES, f"a list of at most {MAX_MESSAGES} chat messages", ErrorCode.TOO_LARGE))
    chat: bool = False  # wrap `prompt` in the model's chat template as one user turn
    max_tokens: int = field(default=128, metadata=_rule(lambda v: 1 <= v <= MAX_TOKENS,
                                                        f"an integer in 1..{MAX_TOKENS}"))
    temperature: float = field(default=0.0, metadata=_rule(is_valid_temperature, TEMPERATURE_ALLOWED))
    top_p: float = field(default=1.0, metadata=_rule(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"))
    top_k: int = field(default=0, metadata=_rule(lambda v: 0 <= v <= 2**31 - 1, "an integer ≥ 0 (0: no cut)"))
    seed: int | None = field(default=None, metadata=_rule(lambda v: 0 <= v < 2**63, "an integer in 0..2^63-1"))
    stop: list[str] = field(default_factory=list, metadata=_rule(
        lambda v: len(v) <= MAX_STOP_STRINGS and all(1 <= len(s) <= MAX_STOP_CHARS for s in v),
        f"a list of at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_CHARS} characters"))
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)
    stream: bool = True  # send a chunk per token; False: only the final message

    def check_whole(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                "generate: give exactly one of prompt (text) or messages (chat turns)")
        if self.messages is not None and not self.messages:
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                "generate: messages is empty; give at least one chat turn, e.g. "
                                '[{"role": "user", "content": "Hi"}]')
        if self.messages is not None:
            chars = sum(len(m.content) for m in self.messages)
            if chars > MAX_PROMPT_CHARS:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"generate: the messages hold {chars} characters, "
                                                         f"more than the {MAX_PROMPT_CHARS} allowed; shorten them")

    def sampling_fields(self) -> dict:
        """The fields that make runtime.sampling.SamplingParams, by their names there."""
        return {"max_tokens": self.max_tokens, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop), "ignore_eos": self.ignore_eos}


@dataclass
class CancelRequest:
    """Stop a running generate of this connection; it ends with finish_reason "cancelled"."""

    op: ClassVar[str] = "cancel"
    id: str = field(metadata=ID_RULE)  # the generate's id


@dataclass
class StatusRequest:
    op: ClassVar[str] = "status"
    id: str = field(metadata=ID_RULE)


@dataclass
class HealthRequest:
    op: ClassVar[str] = "health"
    id: str = field(metadata=ID_RULE)


Request = GenerateRequest | CancelRequest | StatusRequest | HealthRequest
REQUEST_TYPES: dict[str, type] = {cls.op: cls for cls in (GenerateRequest, CancelRequest, StatusRequest, HealthRequest)}


# ---------------------------------------------------------------------- replies (daemon → client)


@dataclass
class TokenChunk:
    """New tokens of a streamed generate; the chunks' text adds up to the final text."""

    type: ClassVar[str] = "chunk"
    id: str
    text: str  # may be "" while a character or a possible stop string is held back
    token_ids: list[int]


@dataclass
class Heartbeat:
    """The request is alive (queued or generating) but has nothing new to say."""

    type: ClassVar[str] = "heartbeat"
    id: str


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Timings:
    queued_ms: float  # from arrival to the start of its prefill
    time_to_first_token_ms: float  # from arrival to the first token
    decode_ms: float  # from the first token to the last
    total_ms: float  # from arrival to the final message
    decode_tokens_per_s: float  # completion tokens after the first / decode_ms


@dataclass
class FinalMessage:
    """The end of a generate: the whole text, why it stopped, what it cost."""

    type: ClassVar[str] = "final"
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or context), "cancelled"
    usage: Usage
    timings: Timings


@dataclass
class ErrorReply:
    type: ClassVar[str] = "error"
    id: str | None  # None when the request could not be read far enough to know its id
    code: str  # an ErrorCode value
    message: str  # what was wrong, with the value, and what to do


@dataclass
class HealthReply:
    type: ClassVar[str] = "health"
    id: str
    state: str  # "loading", "ready", "draining"
    ok: bool  # ready and the engine is making progress
    uptime_s: float


@dataclass
class StatusReply:
    """The daemon's state and recent performance (rates over the last `window_s` seconds)."""

    type: ClassVar[str] = "status"
    id: str
    state: str  # "loading", "ready", "draining"
    ok: bool
    model: str  # the store's architecture, e.g. "llama"
    mode: str  # FFN source: dense, naive, sparse
    max_batch: int
    requests_running: int  # in the engine's batch
    requests_queued: int  # waiting for a batch slot
    requests_completed: int  # since start
    requests_failed: int  # since start, refused or failed after acceptance
    tokens_generated: int  # since start
    uptime_s: float
    window_s: float
    tokens_per_s: float
    steps_per_s: float
    mean_batch: float  # sequences per decode step
    step_ms: float  # mean decode step
    io_ms_per_step: float  # FFN flash reads per decode step
    compute_ms_per_step: float  # FFN compute per decode step
    flash_bytes_per_token: float  # read_bytes of the FFN's reader (engine or prefetch worker) per decoded token
    cache_hit_rate: float | None  # neuron cache hits / neurons needed; None when no cache is used
    head_precision: str = "stored"  # how a q8_0 head is held: "stored" or "4bit" (a daemon before it: stored)


Reply = TokenChunk | Heartbeat | FinalMessage | ErrorReply | HealthReply | StatusReply
REPLY_TYPES: dict[str, type] = {cls.type: cls for cls in (TokenChunk, Heartbeat, FinalMessage, ErrorReply,
                                                          HealthReply, StatusReply)}


# ---------------------------------------------------------------------- validation


def validate(message: Any) -> Any:
    """Check (and normalise: nested maps → dataclasses, ints → floats) every field of a message in place.

    Raises ProtocolError naming the message, the field, its value and what is allowed.
    Returns the message.
    """
    _validate_dataclass(message, _kind_of(message))
    return message


def _kind_of(message: Any) -> str:
    return getattr(message, "op", None) or getattr(message, "type", None) or type(message).__name__


def _validate_dataclass(obj: Any, where: str) -> None:
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = f"{where}: {f.name}"
        value = _check_type(getattr(obj, f.name), hints[f.name], name)
        if value is not None and "check" in f.metadata and not f.metadata["check"](value):
            raise ProtocolError(f.metadata["code"],
                                f"{name}={_short(value)} is invalid: must be {f.metadata['allowed']}")
        setattr(obj, f.name, value)
    if hasattr(obj, "check_whole"):
        obj.check_whole()


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check_type(value: Any, hint: Any, name: str) -> Any:
    """value if it fits `hint` (converted where lossless), else ProtocolError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _check_type(value, inner, name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(name, "a list", value)
        (item_hint,) = typing.get_args(hint)
        return [_check_type(item, item_hint, f"{name}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            _validate_dataclass(value, name)
            return value
        if not isinstance(value, dict):
            raise _wrong_type(name, f"a map with {', '.join(f.name for f in dataclasses.fields(hint))}", value)
        return _from_fields(hint, value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise _wrong_type(name, "true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(name, "an integer", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _wrong_type(name, "a finite number", value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _wrong_type(name, "a string", value)
        return value
    raise TypeError(f"{name}: no rule for type {hint!r}")  # a bug in this module, not in the message


def _wrong_type(name: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST,
                         f"{name} must be {expected}, got {type(value).__name__} {_short(value)}")


_SHORT_REPR = reprlib.Repr()  # bounded levels and lengths (Python 3.11 has no constructor arguments)
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 4


def _short(value: Any, limit: int = 60) -> str:
    """A bounded repr for error messages: never recurses deeper than a few levels, whatever the value holds."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _from_fields(cls: type, fields: dict, where: str) -> Any:
    """A validated `cls` from a wire map: unknown and missing fields are errors."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in fields if k not in known]
    if unknown:
        raise ProtocolError(ErrorCode.INVALID_REQUEST,
                            f"{where}: unknown field {_short(unknown[0])}; known fields: {', '.join(known)}")
    missing = [n for n, f in known.items() if n not in fields
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{where}: missing field {missing[0]!r}")
    obj = cls(**fields)
    _validate_dataclass(obj, where)
    return obj


# ---------------------------------------------------------------------- codec


def encode(message: Any) -> bytes:
    """One frame for a request or a reply (tagged with its "op" or "type")."""
    wire = dataclasses.asdict(message)
    if hasattr(message, "op"):
        wire["op"] = message.op
    else:
        wire["type"] = message.type
    return msgpack.packb(wire, use_bin_type=True)


def decode_request(frame: bytes) -> Request:
    """A validated request from a client's frame; ProtocolError (with the id when it was readable) if not."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"request of {len(frame)} bytes is over the limit of "
                                                 f"{MAX_REQUEST_BYTES} bytes; shorten the prompt")
    wire = _unpack_map(frame, "request")
    _check_shape(wire, "request")
    request_id = wire.get("id") if isinstance(wire.get("id"), str) else None
    try:
        op = wire.pop("op", None)
        if not isinstance(op, str):
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                f"request has no \"op\" string; use one of: {', '.join(REQUEST_TYPES)}")
        cls = REQUEST_TYPES.get(op)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP,
                                f"unknown op {_short(op)}; use one of: {', '.join(REQUEST_TYPES)}")
        return _from_fields(cls, wire, op)
    except ProtocolError as error:
        error.request_id = request_id
        raise


def decode_reply(frame: bytes) -> Reply:
    """A validated reply from the daemon's frame."""
    wire = _unpack_map(frame, "reply")
    kind = wire.pop("type", None)
    cls = REPLY_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.MALFORMED, f"reply of unknown type {_short(kind)} "
                                                 "(is the daemon a different flashllm version?)")
    return _from_fields(cls, wire, kind)


def error_id(error: ProtocolError) -> str | None:
    """The request id a refused frame carried, if it could be read."""
    return getattr(error, "request_id", None)


def _check_shape(wire: Any, what: str) -> None:
    """Refuse values nested deeper than MAX_NESTING_DEPTH or holding more than MAX_WIRE_ITEMS values, before
    anything recursive (validation, repr in an error message) touches them. Iterative: no recursion limit."""
    todo = [(wire, 1)]
    items = 0
    while todo:
        value, depth = todo.pop()
        if depth > MAX_NESTING_DEPTH:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{what} nests maps and lists more than "
                                                           f"{MAX_NESTING_DEPTH} levels deep; no field needs that")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        for child in children:
            items += 1
            if items > MAX_WIRE_ITEMS:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"{what} holds more than {MAX_WIRE_ITEMS} values; "
                                                         "send fewer messages or stop strings")
            if isinstance(child, (dict, list, tuple)):
                todo.append((child, depth + 1))


def _unpack_map(frame: bytes, what: str) -> dict:
    try:
        wire = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types (ExtraData, ValueError, FormatError...)
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} is not valid msgpack ({type(exc).__name__}: {exc}); "
                                                 "send one msgpack map per frame") from None
    if not isinstance(wire, dict):
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"{what} must be a msgpack map, got {type(wire).__name__} {_short(wire)}")
    return wire
