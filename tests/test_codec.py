"""Encoding of call payloads and errors (``bigmrun.rpc._codec``, ``bigmrun.errors``)."""

from __future__ import annotations

import builtins
import pickle
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from bigmrun.errors import (
    BigmrunError,
    CallCancelledError,
    NoSuchMethodError,
    RemoteError,
    SerializationError,
    make_remote_error,
)
from bigmrun.rpc import _codec as C


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        yield s
    finally:
        s.close()


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback (as a service's exception would have)."""
    try:
        raise exc
    except BaseException as e:
        return e


# --- values ----------------------------------------------------------------------------


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


PLAIN = [
    None, True, 0, -(2**70), 3.5, "héllo", b"\x00bytes", bytearray(b"ba"),
    [1, [2, [3]]], (1, "a"), {"k": {1, 2}}, frozenset({"x"}), Point(1, 2),
    ValueError("boom"),
]


@pytest.mark.parametrize("value", PLAIN, ids=[type(v).__name__ for v in PLAIN])
def test_plain_values_use_plain_pickle(value: Any) -> None:
    data = C.dumps(value, "value")
    assert data == pickle.dumps(value, 5)  # no dill for what pickle handles
    assert data[:2] == b"\x80\x05"  # protocol 5
    back = C.loads(data, "value")
    if isinstance(value, Exception):
        assert type(back) is ValueError and back.args == value.args
    else:
        assert back == value


def test_dill_fallback_for_a_lambda() -> None:
    f = lambda x: x * 3  # noqa: E731
    with pytest.raises(Exception):  # noqa: B017 - plain pickle really refuses it
        pickle.dumps(f, 5)
    g = C.loads(C.dumps(f, "fn"), "fn")
    assert g(7) == 21


def test_dill_fallback_for_a_closure() -> None:
    base = 100

    def add(x: int) -> int:
        return base + x

    g = C.loads(C.dumps(add, "fn"), "fn")
    assert g(5) == 105
    assert g is not add


def test_dill_fallback_for_a_locally_defined_class() -> None:
    class Local:
        def __init__(self) -> None:
            self.n = 1

        def bump(self) -> int:
            self.n += 1
            return self.n

    obj = Local()
    obj.bump()
    back = C.loads(C.dumps(obj, "service 'L'"), "service 'L'")
    assert back is not obj
    assert back.n == 2
    assert back.bump() == 3
    assert type(back).__name__ == "Local"


def test_dumps_names_what_failed(sock: socket.socket) -> None:
    with pytest.raises(SerializationError) as info:
        C.dumps(sock, "reply of PI.sample")
    msg = str(info.value)
    assert "reply of PI.sample" in msg
    assert "socket" in msg
    assert isinstance(info.value, TypeError) and isinstance(info.value, BigmrunError)
    assert info.value.__cause__ is not None


def test_loads_names_what_failed() -> None:
    with pytest.raises(SerializationError, match=r"reply of PI\.sample cannot be unpickled"):
        C.loads(b"\x80\x05not a pickle", "reply of PI.sample")


def test_loads_of_a_missing_class_names_it() -> None:
    data = pickle.dumps(Point(1, 2), 5).replace(b"Point", b"Pxint")
    with pytest.raises(SerializationError) as info:
        C.loads(data, "argument 1 of S.m")
    assert "argument 1 of S.m" in str(info.value)
    assert "Pxint" in str(info.value)


# --- requests --------------------------------------------------------------------------


def test_request_round_trip() -> None:
    payload = C.encode_request("PI.sample", (1000, "x"), {"seed": 7}, {"streams": True})
    method, off = C.decode_method(payload)
    assert method == "PI.sample"
    assert C.decode_request_body(payload, off, method) == ((1000, "x"), {"seed": 7},
                                                            {"streams": True})


def test_request_method_name_is_utf8() -> None:
    payload = C.encode_request("Sërvice.méthod", (), {})
    method, off = C.decode_method(payload)
    assert method == "Sërvice.méthod"
    assert C.decode_request_body(payload, off, method) == ((), {}, None)


def test_request_with_stream_refs() -> None:
    payload = C.encode_request("S.m", (C.StreamRef(5),), {"f": C.StreamRef(6)})
    method, off = C.decode_method(payload)
    args, kwargs, _ = C.decode_request_body(payload, off, method)
    assert args == (C.StreamRef(5),) and kwargs == {"f": C.StreamRef(6)}


def test_request_with_a_lambda_argument_uses_dill_for_that_argument_only() -> None:
    payload = C.encode_request("S.apply", (2, lambda x: x + 40), {"k": lambda: "kw"})
    method, off = C.decode_method(payload)
    args, kwargs, meta = C.decode_request_body(payload, off, method)
    assert args[0] == 2
    assert args[1](args[0]) == 42
    assert kwargs["k"]() == "kw"
    assert meta is None


def test_unpicklable_argument_is_named_by_position_and_method(sock: socket.socket) -> None:
    with pytest.raises(SerializationError) as info:
        C.encode_request("PI.sample", (1000, sock), {})
    msg = str(info.value)
    assert "argument 2" in msg
    assert "PI.sample" in msg
    assert "socket" in msg
    assert "argument 1" not in msg


def test_unpicklable_keyword_argument_is_named(sock: socket.socket) -> None:
    with pytest.raises(SerializationError) as info:
        C.encode_request("Store.put", ("key",), {"value": sock})
    msg = str(info.value)
    assert "keyword argument 'value'" in msg
    assert "Store.put" in msg


def test_unpicklable_generator_argument_is_named() -> None:
    gen = (i for i in range(3))
    with pytest.raises(SerializationError, match=r"argument 1 \(generator\) of S\.m"):
        C.encode_request("S.m", (gen,), {})


def test_undecodable_request_body_names_the_method() -> None:
    payload = C.encode_request("S.m", (Point(1, 2),), {})
    payload = payload.replace(b"Point", b"Pxint")
    method, off = C.decode_method(payload)
    with pytest.raises(SerializationError, match=r"arguments of S\.m"):
        C.decode_request_body(payload, off, method)


# --- errors ----------------------------------------------------------------------------


def failing_service_method() -> None:
    raise ValueError("bad sample count: -1")


def test_error_round_trip_carries_type_message_and_traceback() -> None:
    try:
        failing_service_method()
    except ValueError as e:
        payload = C.encode_error(e)
    err = C.decode_error(payload, "m3")
    assert isinstance(err, RemoteError)
    assert err.type_name == "ValueError"
    assert err.message == "bad sample count: -1"
    assert err.machine == "m3"
    assert "failing_service_method" in err.remote_traceback
    assert "Traceback (most recent call last)" in err.remote_traceback
    text = str(err)
    assert "ValueError on m3: bad sample count: -1" in text
    assert "remote traceback" in text and "failing_service_method" in text


def test_remote_value_error_is_catchable_three_ways() -> None:
    err = C.decode_error(C.encode_error(raised(ValueError("v"))), "m0")
    for cls in (ValueError, RemoteError, BigmrunError):
        with pytest.raises(cls):
            raise err
    assert isinstance(err.__cause__, ValueError)
    assert err.__cause__.args == ("v",)


def test_remote_os_error_keeps_errno() -> None:
    err = C.decode_error(C.encode_error(raised(FileNotFoundError(2, "no such file"))), "m0")
    assert isinstance(err, FileNotFoundError) and isinstance(err, RemoteError)
    assert err.errno == 2
    assert err.type_name == "FileNotFoundError"


class CustomError(Exception):
    pass


def test_importable_custom_exception_is_catchable_by_type() -> None:
    err = C.decode_error(C.encode_error(raised(CustomError("c"))), "m1")
    assert isinstance(err, CustomError) and isinstance(err, RemoteError)
    assert err.type_name.endswith("CustomError")
    assert err.type_name != "CustomError"  # qualified with its module


def test_unimportable_exception_type_gives_plain_remote_error() -> None:
    payload = pickle.dumps({
        "kind": C.KIND_REMOTE, "type": "nosuchpkg_xyz.errors.WeirdError",
        "qualified": "nosuchpkg_xyz.errors:WeirdError", "message": "weird",
        "traceback": "Traceback...\nnosuchpkg_xyz.errors.WeirdError: weird\n", "exc": None,
    })
    err = C.decode_error(payload, "m2")
    assert type(err) is RemoteError
    assert err.type_name == "nosuchpkg_xyz.errors.WeirdError"
    assert err.message == "weird"
    assert "WeirdError" in err.remote_traceback
    assert err.__cause__ is None


def test_locally_defined_exception_gives_plain_remote_error() -> None:
    class LocalError(Exception):
        pass

    err = C.decode_error(C.encode_error(raised(LocalError("loc"))), "m2")
    assert type(err) is RemoteError
    assert "LocalError" in err.type_name
    assert err.message == "loc"
    assert "LocalError" in err.remote_traceback


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be unpickled: ``args`` has one item, ``__init__`` needs two."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


class HoldsASocket(Exception):
    """Cannot be pickled at all: carries an open socket."""

    def __init__(self, s: socket.socket) -> None:
        super().__init__("with a socket")
        self.sock = s


def test_exception_that_fails_to_unpickle_degrades_gracefully() -> None:
    e = raised(NeedsTwoArgs(1, 2))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(e))  # the premise: it really does not round trip
    err = C.decode_error(C.encode_error(e), "m4")
    assert isinstance(err, RemoteError)
    assert err.type_name.endswith("NeedsTwoArgs")
    assert err.message == "1+2"
    assert "NeedsTwoArgs" in err.remote_traceback
    assert err.__cause__ is None
    # Its type is importable here, so it is still catchable by type.
    assert isinstance(err, NeedsTwoArgs)


def test_exception_that_fails_to_pickle_degrades_gracefully(sock: socket.socket) -> None:
    err = C.decode_error(C.encode_error(raised(HoldsASocket(sock))), "m4")
    assert isinstance(err, RemoteError) and isinstance(err, HoldsASocket)
    assert err.message == "with a socket"
    assert err.__cause__ is None


def test_corrupt_pickled_exception_degrades_gracefully() -> None:
    payload = pickle.dumps({
        "kind": C.KIND_REMOTE, "type": "ValueError", "qualified": "builtins:ValueError",
        "message": "m", "traceback": "tb", "exc": b"\x80\x05garbage",
    })
    err = C.decode_error(payload, None)
    assert isinstance(err, ValueError) and isinstance(err, RemoteError)
    assert err.__cause__ is None
    assert str(err).startswith("ValueError: m")  # no machine: no " on ..."


def test_error_kinds_map_to_their_classes() -> None:
    e = C.decode_error(C.encode_error(raised(NoSuchMethodError("no service 'X'"))), "m")
    assert type(e) is NoSuchMethodError and "no service 'X'" in str(e)
    e = C.decode_error(C.encode_error(raised(SerializationError("reply of S.m"))), "m")
    assert type(e) is SerializationError and "reply of S.m" in str(e)
    e = C.decode_error(C.encode_error(raised(RuntimeError("stop")), C.KIND_CANCELLED), "m")
    assert type(e) is CallCancelledError and "stop" in str(e)


def test_undecodable_error_payload_is_a_serialization_error() -> None:
    err = C.decode_error(b"not a pickle", "m9")
    assert isinstance(err, SerializationError)
    assert "m9" in str(err)


def test_nested_remote_error_keeps_the_original_type_name() -> None:
    inner = C.decode_error(C.encode_error(raised(KeyError("k"))), "m1")
    outer = C.decode_error(C.encode_error(raised(inner)), "m0")
    assert isinstance(inner, RemoteError)
    assert isinstance(outer, RemoteError) and isinstance(outer, KeyError)
    assert outer.type_name == "KeyError"
    assert outer.message == inner.message


def test_remote_error_pickles() -> None:
    err = make_remote_error("ValueError", "v", "tb text", "m5", None)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError) and isinstance(back, RemoteError)
    assert (back.type_name, back.message, back.remote_traceback, back.machine) == (
        "ValueError", "v", "tb text", "m5")


def test_remote_error_of_an_unknown_builtin_name() -> None:
    err = make_remote_error("NotARealBuiltin", "x", "", None, None)
    assert type(err) is RemoteError
    assert str(err) == "NotARealBuiltin: x"


def test_remote_traceback_is_the_remote_one() -> None:
    e = raised(ValueError("here"))
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    err = C.decode_error(C.encode_error(e), "m")
    assert isinstance(err, RemoteError)
    assert err.remote_traceback == tb


BUILTIN_EXCEPTIONS = sorted(
    name for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
)


@pytest.mark.parametrize("name", BUILTIN_EXCEPTIONS)
def test_every_builtin_exception_name_gives_a_remote_error(name: str) -> None:
    # Rebuilding must never raise, whatever the remote type's constructor wants
    # (UnicodeDecodeError needs 5 arguments, ExceptionGroup a list of exceptions).
    err = make_remote_error(name, "msg", "tb", "m0", None)
    assert isinstance(err, RemoteError)
    assert (err.type_name, err.message, err.remote_traceback, err.machine) == (
        name, "msg", "tb", "m0")
    assert str(err).startswith(f"{name} on m0: msg")
    cls = getattr(builtins, name)
    if issubclass(cls, Exception) and cls is not getattr(builtins, "ExceptionGroup", None):
        assert isinstance(err, cls), f"not catchable as {name}"


def test_remote_unicode_decode_error_round_trip() -> None:
    try:
        b"\xff".decode()
    except UnicodeDecodeError as e:
        payload = C.encode_error(e)
    err = C.decode_error(payload, "m0")
    assert isinstance(err, UnicodeDecodeError) and isinstance(err, RemoteError)
    assert "can't decode byte 0xff" in err.message
    assert isinstance(err.__cause__, UnicodeDecodeError)


class NewNeedsTwo(Exception):
    def __new__(cls, a: int, b: int) -> NewNeedsTwo:
        return super().__new__(cls, a, b)

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a, b)


def test_exception_type_whose_new_refuses_falls_back_to_plain_remote_error() -> None:
    err = C.decode_error(C.encode_error(raised(NewNeedsTwo(1, 2))), "m0")
    assert type(err) is RemoteError
    assert err.type_name.endswith("NewNeedsTwo")
    assert err.message == "(1, 2)"
    assert isinstance(err.__cause__, NewNeedsTwo)
