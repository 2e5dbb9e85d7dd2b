"""Encoding of call payloads: method names, arguments, replies and errors.

Values travel as pickle protocol 5; whatever plain pickle refuses (lambdas, closures,
classes defined inside functions) is retried with ``dill``. A value neither can encode
raises :class:`SerializationError` naming *what* it was (``argument 2 of PI.sample``,
``reply of PI.sample``, ``service 'PI'``). Decoding uses ``pickle.loads``, which also
reads dill's output (dill is imported on demand by the pickle machinery).

Payloads are only ever decoded from a peer that completed the mutual TLS handshake
with a certificate of this session: see ``_tls``.

A REQUEST payload is ``u16 len | method (utf-8) | pickle((args, kwargs, meta))``.
Streamed arguments are replaced in ``args``/``kwargs`` by :class:`StreamRef` markers
naming the stream id that carries their bytes.
"""

from __future__ import annotations

import pickle
import struct
import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import (
    BigmrunError,
    CallCancelledError,
    NoSuchMethodError,
    RemoteError,
    SerializationError,
    make_remote_error,
)

_U16 = struct.Struct(">H")
PROTOCOL = 5


@dataclass(frozen=True)
class StreamRef:
    """Placeholder for a streamed argument: its bytes arrive on ``stream_id``."""

    stream_id: int


def dumps(obj: Any, what: str) -> bytes:
    """Pickle ``obj`` (dill as a fallback); SerializationError names ``what`` on failure."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception as first:
        try:
            import dill

            return bytes(dill.dumps(obj, protocol=PROTOCOL, recurse=True))
        except Exception as second:
            raise SerializationError(
                f"{what} cannot be pickled: {type(first).__name__}: {first} "
                f"(dill: {type(second).__name__}: {second}). Make it picklable, e.g. define "
                f"the class at module level or pass plain data instead."
            ) from second


def loads(data: bytes, what: str) -> Any:
    """Unpickle ``data``; SerializationError names ``what`` on failure."""
    try:
        return pickle.loads(data)
    except Exception as e:
        raise SerializationError(
            f"{what} cannot be unpickled here: {type(e).__name__}: {e}. Is the code that "
            f"defines it importable on this side (same program, same packages)?"
        ) from e


def encode_request(method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   meta: dict[str, Any] | None = None) -> bytes:
    """Encode a REQUEST payload."""
    name = method.encode()
    try:
        body = pickle.dumps((args, kwargs, meta), PROTOCOL)
    except Exception:
        body = _dumps_args_naming_culprit(method, args, kwargs, meta)
    return _U16.pack(len(name)) + name + body


def _dumps_args_naming_culprit(method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                               meta: dict[str, Any] | None) -> bytes:
    # Find the argument that fails so that the message names it; dill what needs it.
    parts: list[Any] = []
    for i, a in enumerate(args):
        parts.append(_as_dilled(a, f"argument {i + 1} ({type(a).__name__}) of {method}"))
    kparts = {
        k: _as_dilled(v, f"keyword argument {k!r} ({type(v).__name__}) of {method}")
        for k, v in kwargs.items()
    }
    return pickle.dumps((tuple(parts), kparts, meta), PROTOCOL)


class _Dilled:
    """A value pickled by dill, embedded in a plain pickle."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.data,))


def _as_dilled(value: Any, what: str) -> Any:
    try:
        pickle.dumps(value, PROTOCOL)
        return value
    except Exception:
        return _Dilled(dumps(value, what))


def decode_method(payload: bytes) -> tuple[str, int]:
    """The method name of a REQUEST payload and the offset of its body."""
    (n,) = _U16.unpack_from(payload, 0)
    return payload[2 : 2 + n].decode(), 2 + n


def decode_request_body(payload: bytes, offset: int, method: str) -> tuple[
        tuple[Any, ...], dict[str, Any], dict[str, Any] | None]:
    """The (args, kwargs, meta) of a REQUEST payload."""
    args, kwargs, meta = loads(payload[offset:], f"arguments of {method}")
    return args, kwargs, meta


# --- errors -----------------------------------------------------------------------------

# Kinds of error a peer can report; the caller rebuilds the matching class.
KIND_REMOTE = "remote"
KIND_NO_METHOD = "no_method"
KIND_SERIALIZATION = "serialization"
KIND_CANCELLED = "cancelled"
KIND_BIGMRUN = "bigmrun"


def encode_error(exc: BaseException, kind: str | None = None) -> bytes:
    """Encode an exception raised while serving a call (with its traceback)."""
    if kind is None:
        if isinstance(exc, NoSuchMethodError):
            kind = KIND_NO_METHOD
        elif isinstance(exc, SerializationError):
            kind = KIND_SERIALIZATION
        else:
            kind = KIND_REMOTE
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    pickled_exc: bytes | None
    try:
        pickled_exc = pickle.dumps(exc, PROTOCOL)
        pickle.loads(pickled_exc)  # some exceptions pickle but do not unpickle
    except Exception:
        pickled_exc = None
    t = type(exc)
    if isinstance(exc, RemoteError):  # a nested call's error: keep the original type name
        type_name, message = exc.type_name, exc.message
        qualified = None
    else:
        type_name = (t.__qualname__ if t.__module__ == "builtins"
                     else f"{t.__module__}.{t.__qualname__}")
        message = str(exc)
        qualified = f"{t.__module__}:{t.__qualname__}"
    return pickle.dumps(
        {"kind": kind, "type": type_name, "qualified": qualified, "message": message,
         "traceback": tb, "exc": pickled_exc},
        PROTOCOL,
    )


def decode_error(payload: bytes, machine: str | None) -> BigmrunError:
    """Rebuild the error a caller raises from an ERROR payload."""
    try:
        d = pickle.loads(payload)
        kind = d["kind"]
    except Exception as e:
        return SerializationError(f"undecodable error reply from {machine}: {e}")
    message = d["message"]
    if kind == KIND_NO_METHOD:
        return NoSuchMethodError(message)
    if kind == KIND_SERIALIZATION:
        return SerializationError(message)
    if kind == KIND_CANCELLED:
        return CallCancelledError(message)
    try:
        return make_remote_error(d["type"], message, d["traceback"], machine, d["exc"],
                                 d.get("qualified"))
    except Exception:  # never let a strange remote exception break the connection
        return RemoteError(str(d.get("type")), str(message), str(d.get("traceback")), machine)
