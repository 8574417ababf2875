"""The one msgpack codec for the internal messages of protocol/messages.py.

A frame is one msgpack array:

    [PROTOCOL_VERSION, tag, field_0, field_1, ...]     fields in dataclass order

Integer id arrays (neuron ids, token ids, slots) travel as a msgpack ext
(type 1: 3-byte numpy dtype string, e.g. b"<i8", then the raw bytes), so a
thousand ids cost 8 KB, not a thousand msgpack ints. Float arrays are refused:
tensors live in shared memory, a message only says where.
"""
from __future__ import annotations

import numpy as np
import msgpack

from flashllm.protocol.messages import FIELD_NAMES, MESSAGE_BY_TAG, PROTOCOL_VERSION

EXT_ID_ARRAY = 1
_ID_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                                      np.uint32, np.uint64)}


class CodecError(ValueError):
    """A frame that is not a protocol message (corrupt, truncated, unknown tag, wrong field count)."""


class ProtocolVersionError(CodecError):
    """The frame comes from a process speaking another protocol version."""


def _default(value):
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.str not in _ID_DTYPES:
            raise TypeError(
                f"a {value.dtype} array of shape {value.shape} cannot travel in a message: only 1-D integer id "
                "arrays do; put tensors in shared memory (protocol/shm.py) and send their offsets")
        return msgpack.ExtType(EXT_ID_ARRAY, value.dtype.str.encode("ascii") + np.ascontiguousarray(value).tobytes())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"cannot encode a {type(value).__name__} in a protocol message")


def _ext_hook(code: int, data: bytes):
    if code != EXT_ID_ARRAY:
        return msgpack.ExtType(code, data)
    dtype = _ID_DTYPES.get(data[:3].decode("ascii", "replace"))
    if dtype is None or (len(data) - 3) % dtype.itemsize:
        raise CodecError(f"malformed id array in a message (dtype {data[:3]!r}, {len(data) - 3} bytes)")
    return np.frombuffer(data, dtype=dtype, offset=3)  # read-only view of the frame


def encode(msg) -> bytes:
    """A message dataclass → one frame."""
    cls = type(msg)
    names = FIELD_NAMES.get(cls)
    if names is None:
        raise TypeError(f"{cls.__name__} is not a protocol message (see protocol/messages.py)")
    return msgpack.packb([PROTOCOL_VERSION, cls.tag, *(getattr(msg, name) for name in names)],
                         default=_default, use_bin_type=True)


def decode(frame: bytes | memoryview):
    """One frame → the message dataclass; raises ProtocolVersionError or CodecError."""
    try:
        items = msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CodecError(f"not a msgpack protocol frame ({exc})") from exc
    if not isinstance(items, list) or len(items) < 2:
        raise CodecError(f"a protocol frame is an array [version, tag, fields...], got {type(items).__name__}")
    version, tag = items[0], items[1]
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"message of protocol version {version!r}, but this process speaks version {PROTOCOL_VERSION}: "
            "every flashllm process must come from the same install; restart the runtime after an upgrade")
    cls = MESSAGE_BY_TAG.get(tag)
    if cls is None:
        raise CodecError(f"unknown message tag {tag!r} (protocol version {PROTOCOL_VERSION})")
    names = FIELD_NAMES[cls]
    values = items[2:]
    if len(values) != len(names):
        raise CodecError(f"{cls.__name__} frame has {len(values)} fields, expected {len(names)} ({', '.join(names)})")
    return cls(*values)
