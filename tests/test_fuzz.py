"""Bad input to the RPC server.

(a) Property tests of the codec (the framing layer's own properties are in
test_protocol.py): REQUEST payloads round-trip, and any truncation of one is refused
with a bigmrun error (or the decoder's documented struct/Unicode errors, which the
server turns into an ERROR reply) rather than anything else.

(b) A seeded socket-level fuzzer against a LIVE local machine, for a bounded time: an
*authenticated* peer (a valid certificate of the session) sends random bytes, truncated
frames, oversized length fields, frames after GOAWAY, frames only a server sends,
requests with garbage bodies, data for unknown streams. After each bad connection a
valid client's call must succeed; at the end the machine is still RUNNING, its process
alive, and its RSS bounded. Unauthenticated garbage (plain TCP) is refused.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import time
from typing import Any

import psutil
import pytest
from conftest import record_figure
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_services import Worker

import bigmrun
from bigmrun import State
from bigmrun.errors import SerializationError
from bigmrun.rpc import _codec as C
from bigmrun.rpc import _protocol as P
from bigmrun.rpc._tls import client_context

pytestmark = pytest.mark.timeout(120)

#: How long the live fuzzer runs (seconds); CI keeps the default.
FUZZ_SECONDS = float(os.environ.get("BIGMRUN_FUZZ_SECONDS", "12"))

# --- (a) codec properties -----------------------------------------------------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) |
    st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_methods = st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode()) < 65536)


@settings(max_examples=200, deadline=None)
@given(method=_methods, args=st.lists(_values, max_size=4),
       kwargs=st.dictionaries(st.text(max_size=8), _values, max_size=3),
       meta=st.none() | st.fixed_dictionaries({"rid": st.text(max_size=16)}))
def test_property_request_round_trip(method: str, args: list[Any], kwargs: dict[str, Any],
                                     meta: dict[str, Any] | None) -> None:
    payload = C.encode_request(method, tuple(args), kwargs, meta)
    frame = P.encode_frame(P.REQUEST, 3, payload)
    (f,) = P.FrameDecoder().receive_data(frame)
    name, off = C.decode_method(f.payload)
    assert name == method
    assert C.decode_request_body(f.payload, off, name) == (tuple(args), kwargs, meta)


@settings(max_examples=200, deadline=None)
@given(method=_methods, args=st.lists(_values, min_size=1, max_size=4), data=st.data())
def test_property_truncated_requests_are_refused_cleanly(method: str, args: list[Any],
                                                         data: st.DataObject) -> None:
    payload = C.encode_request(method, tuple(args), {}, None)
    cut = data.draw(st.integers(0, len(payload) - 1))
    bad = payload[:cut]
    try:
        name, off = C.decode_method(bad)
        C.decode_request_body(bad, off, name)
    except (SerializationError, struct.error, UnicodeDecodeError):
        return
    # A cut that happens to leave a complete pickle (e.g. inside the name) is possible
    # only if the name itself was cut: then the method name differs.
    assert name != method or off > cut


# --- (b) the live fuzzer --------------------------------------------------------------------

def _frame(rng: random.Random, ftype: int | None = None, payload: bytes | None = None) -> bytes:
    ftype = ftype if ftype is not None else rng.randrange(0, 12)
    payload = payload if payload is not None else rng.randbytes(rng.randrange(0, 200))
    return P.HEADER.pack(len(payload), ftype, rng.randrange(0, 8),
                         rng.choice([0, 1, 2, 2**63, 2**64 - 1])) + payload


def bad_input(rng: random.Random) -> tuple[str, bytes]:
    """One hostile byte string from an authenticated peer, and its kind."""
    kind = rng.choice(["random", "truncated", "oversized", "after_goaway", "server_frames",
                       "garbage_request", "truncated_request", "unknown_streams",
                       "huge_window", "many_small"])
    if kind == "random":
        data = rng.randbytes(rng.randrange(1, 4096))
    elif kind == "truncated":
        whole = P.encode_frame(P.REQUEST, 1, C.encode_request("W.echo", (1,), {}))
        data = whole[: rng.randrange(1, len(whole))]
    elif kind == "oversized":
        n = rng.choice([P.DEFAULT_MAX_FRAME_SIZE + 1, 2**31, 2**32 - 1])
        data = P.HEADER.pack(n, rng.choice([P.REQUEST, P.DATA]), 0, 1) + rng.randbytes(100)
    elif kind == "after_goaway":
        data = P.encode_frame(P.GOAWAY, 0) + P.encode_frame(
            P.REQUEST, 1, C.encode_request("W.echo", (1,), {}))
    elif kind == "server_frames":
        data = b"".join(_frame(rng, rng.choice([P.RESPONSE, P.ERROR])) for _ in range(3))
    elif kind == "garbage_request":
        name = rng.choice([b"W.echo", b"Supervisor.ping", rng.randbytes(8)])
        body = rng.randbytes(rng.randrange(0, 300))
        data = P.encode_frame(P.REQUEST, rng.randrange(1, 100),
                              struct.pack(">H", len(name)) + name + body)
    elif kind == "truncated_request":
        payload = C.encode_request("W.echo", ("x" * 50,), {}, {"rid": "r"})
        data = P.encode_frame(P.REQUEST, 5, payload[: rng.randrange(0, len(payload))])
    elif kind == "unknown_streams":
        data = b"".join(_frame(rng, rng.choice([P.DATA, P.END, P.CANCEL, P.WINDOW]))
                        for _ in range(5))
    elif kind == "huge_window":
        data = P.encode_frame(P.WINDOW, rng.randrange(0, 5), struct.pack(">I", 2**32 - 1))
    else:
        data = b"".join(_frame(rng) for _ in range(rng.randrange(1, 50)))
    return kind, data


def send_bad(port: int, ctx: ssl.SSLContext, data: bytes, rng: random.Random) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        try:
            # Sometimes in pieces, sometimes closing half-way.
            cut = rng.randrange(0, len(data) + 1)
            s.sendall(data[:cut])
            s.sendall(data[cut:])
            s.settimeout(0.05)
            while s.recv(65536):
                pass
        except (OSError, ssl.SSLError):
            pass  # the machine cut us off, or just did not answer: both fine


def test_live_machine_survives_an_authenticated_fuzzer() -> None:
    rng = random.Random(20261123)
    kinds: dict[str, int] = {}
    with bigmrun.start("local", keepalive_timeout=10) as b:
        (m,) = b.start(1, services={"W": Worker()})
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
        port = int(m.addr.rpartition(":")[2])
        proc = psutil.Process(m.call("W.pid", timeout=10))
        rss0 = proc.memory_info().rss
        ctx = client_context(b._leaf)  # a valid certificate of this session
        deadline = time.monotonic() + FUZZ_SECONDS
        n = 0
        peak = rss0
        while time.monotonic() < deadline:
            kind, data = bad_input(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            send_bad(port, ctx, data, rng)
            n += 1
            # Never hangs, keeps serving: a valid call succeeds right after.
            assert m.call("W.echo", n, timeout=5) == n
            if n % 20 == 0:
                peak = max(peak, proc.memory_info().rss)
        # Unauthenticated garbage: refused without an answer. (At least a TLS record
        # header's 5 bytes: fewer could be the start of a slow client's hello, which
        # the machine waits for until its 10 s handshake timeout.)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    s.sendall(rng.randbytes(rng.randrange(5, 2048)))
                    s.settimeout(5)
                    assert s.recv(65536) == b""
                except (ConnectionResetError, BrokenPipeError):
                    pass
        assert m.call("W.echo", "still", timeout=5) == "still"
        assert m.state == State.RUNNING and proc.is_running()
        peak = max(peak, proc.memory_info().rss)
    record_figure("fuzz_connections", f"{n} bad authenticated connections in "
                  f"{FUZZ_SECONDS:g}s: {kinds}")
    record_figure("fuzz_rss_mb", f"start {rss0 >> 20}, peak {peak >> 20}")
    # Bounded: a hostile 4 GiB length field must not be buffered.
    assert peak - rss0 < 100 << 20, (rss0, peak)

