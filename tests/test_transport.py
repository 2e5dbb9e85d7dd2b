"""The TLS transport that any thread may write (``bigmrun.rpc._transport``).

Real TLS 1.3 over loopback sockets, both ends in this process on one event loop in a
thread of its own; writes come from many threads at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bigmrun.rpc import _protocol as P
from bigmrun.rpc._tls import CertificateAuthority, client_context, peer_name, server_context
from bigmrun.rpc._transport import Listener, TlsTransport, connect

pytestmark = pytest.mark.timeout(60)


class Collector(asyncio.Protocol):
    """Decodes frames; records everything the transport tells it."""

    def __init__(self) -> None:
        self.decoder = P.FrameDecoder()
        self.frames: list[P.Frame] = []
        self.transport: TlsTransport | None = None
        self.lost = threading.Event()
        self.lost_exc: BaseException | None = None
        self.eof = False
        self.pauses = 0
        self.resumes = 0
        self.bytes = 0
        self.got = threading.Condition()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        with self.got:
            self.bytes += len(data)
            self.frames.extend(self.decoder.receive_data(data))
            self.got.notify_all()

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self.lost.set()

    def wait_frames(self, n: int, timeout: float = 30) -> list[P.Frame]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.frames) >= n, timeout), (
                f"{len(self.frames)} of {n} frames arrived")
            return list(self.frames)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)
    lp.close()


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(30)


@pytest.fixture
def pair(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[Collector, Collector, Listener]]:
    """A connected (client, server) pair of collectors over real mutual TLS."""
    yield from make_pair(loop)


def make_pair(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[Collector, Collector,
                                                                 Listener]]:
    ca = CertificateAuthority("transport-test")
    servers: list[Collector] = []

    def factory() -> Collector:
        c = Collector()
        servers.append(c)
        return c

    listener = Listener(factory, server_context(ca.issue("m0")))
    host, port = run(loop, listener.listen("127.0.0.1", 0))
    _, client = run(loop, connect(Collector, host, port, client_context(ca.issue("driver")),
                                  server_hostname="127.0.0.1"))
    for _ in range(300):
        if servers and servers[0].transport is not None:
            break
        threading.Event().wait(0.01)
    assert servers, "the server never accepted the connection"
    yield client, servers[0], listener
    loop.call_soon_threadsafe(listener.close)
    for c in (client, servers[0]):
        if c.transport is not None:
            loop.call_soon_threadsafe(c.transport.abort)


def test_both_ends_know_each_other_by_certificate(pair: Any) -> None:
    client, server, _ = pair
    assert client.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
    assert peer_name(client.transport.get_extra_info("ssl_object")) == "m0"
    assert peer_name(server.transport.get_extra_info("ssl_object")) == "driver"
    assert server.transport.get_extra_info("peername")[0] == "127.0.0.1"


def test_data_in_the_same_segment_as_the_handshake_arrives(
        loop: asyncio.AbstractEventLoop) -> None:
    # A TLS 1.3 client may send its first request in the same segment as its Finished:
    # the server reads both at once, and the request must not be stranded in its BIO.
    ca = CertificateAuthority("transport-test")
    servers: list[Collector] = []

    def factory() -> Collector:
        servers.append(Collector())
        return servers[-1]

    listener = Listener(factory, server_context(ca.issue("m0")))
    host, port = run(loop, listener.listen("127.0.0.1", 0))
    try:
        ctx = client_context(ca.issue("driver"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with socket.create_connection((host, port), timeout=10) as sock:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            obj.write(P.encode_frame(P.REQUEST, 1, b"first"))
            sock.sendall(outgoing.read())  # Finished and the request, in one send
            for _ in range(500):
                if servers:
                    break
                threading.Event().wait(0.01)
            assert servers, "the handshake did not complete"
            (f,) = servers[0].wait_frames(1, timeout=10)
            assert (f.type, f.stream_id, f.payload) == (P.REQUEST, 1, b"first")
    finally:
        loop.call_soon_threadsafe(listener.close)


def test_frames_from_many_threads_never_interleave(pair: Any) -> None:
    client, server, _ = pair
    threads, per_thread = 8, 200

    def writer(k: int) -> None:
        rnd = os_random(k)
        for i in range(per_thread):
            payload = struct.pack(">II", k, i) + rnd[: (i * 37) % 5000]
            if i % 3:
                client.transport.write(P.encode_frame(P.REQUEST, k, payload))
            else:  # header and payload as two buffers of one write
                client.transport.writelines(
                    (P.encode_header(P.DATA, k, len(payload), 0), payload))

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    frames = server.wait_frames(threads * per_thread)
    assert len(frames) == threads * per_thread
    seen: dict[int, int] = {}
    for f in frames:
        k, i = struct.unpack_from(">II", f.payload)
        assert f.stream_id == k
        assert f.payload[8:] == os_random(k)[: (i * 37) % 5000]
        assert seen.get(k, -1) == i - 1, "a thread's frames arrived out of order"
        seen[k] = i
    assert seen == {k: per_thread - 1 for k in range(threads)}


def os_random(k: int) -> bytes:
    return hashlib.sha256(str(k).encode()).digest() * 160


def test_backpressure_pauses_and_resumes_the_writer(loop: asyncio.AbstractEventLoop,
                                                     pair: Any) -> None:
    client, server, _ = pair
    client.transport.set_write_buffer_limits(high=256 * 1024)
    loop.call_soon_threadsafe(server.transport.pause_reading)
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for i in range(16):  # 16 MiB: far more than the socket buffers hold
        client.transport.write(P.encode_frame(P.DATA, 1, chunk[i:] + chunk[:i]))
        digest.update(chunk[i:] + chunk[:i])
    assert client.pauses == 1
    assert client.transport.get_write_buffer_size() > 256 * 1024
    loop.call_soon_threadsafe(server.transport.resume_reading)
    frames = server.wait_frames(16)
    got = hashlib.sha256()
    for f in frames:
        got.update(f.payload)
    assert got.hexdigest() == digest.hexdigest()
    for _ in range(500):
        if client.resumes:
            break
        threading.Event().wait(0.01)
    assert client.resumes == 1
    assert client.transport.get_write_buffer_size() == 0


def test_close_flushes_then_the_peer_sees_eof(loop: asyncio.AbstractEventLoop,
                                              pair: Any) -> None:
    client, server, _ = pair
    big = os.urandom(4 << 20)
    client.transport.write(P.encode_frame(P.DATA, 7, big))
    loop.call_soon_threadsafe(client.transport.close)
    (f,) = server.wait_frames(1)
    assert f.payload == big
    assert server.lost.wait(10) and client.lost.wait(10)
    assert server.eof
    assert client.lost_exc is None
    client.transport.write(b"ignored after close")  # no error, nothing sent
    assert client.transport.is_closing()


def test_abort_drops_the_connection_at_once(loop: asyncio.AbstractEventLoop,
                                            pair: Any) -> None:
    client, server, _ = pair
    client.transport.abort()  # from this (non-loop) thread: redirected to the loop
    assert client.lost.wait(10) and server.lost.wait(10)


def test_a_peer_of_another_session_is_refused(loop: asyncio.AbstractEventLoop,
                                              pair: Any) -> None:
    _, _, listener = pair
    host, port = listener._sock.getsockname()[:2]
    stranger = client_context(CertificateAuthority("another-session").issue("driver"))

    async def attempt() -> None:
        _, c = await connect(Collector, host, port, stranger, server_hostname="127.0.0.1")
        c.transport.write(P.encode_frame(P.REQUEST, 1, b"x"))
        await asyncio.wait_for(asyncio.wrap_future(
            asyncio.get_running_loop().run_in_executor(None, c.lost.wait, 10)), 15)

    with pytest.raises((ssl.SSLError, OSError)):
        run(loop, attempt())


# --- a thread that takes the reading over (take_reading / read_here / give_reading) ------


def test_a_thread_that_takes_the_reading_reads_and_the_loop_does_not(
        pair: Any) -> None:
    client, server, _ = pair
    t = server.transport
    assert t.take_reading()
    try:
        results: list[bool] = []
        other = threading.Thread(target=lambda: results.append(t.take_reading()))
        other.start()
        other.join(10)
        assert results == [False], "two threads held the reading at once"
        assert t.read_here(0.05) is None  # nothing sent yet
        client.transport.write(P.encode_frame(P.REQUEST, 3, b"for the thread"))
        decoder = P.FrameDecoder()
        frames: list[P.Frame] = []
        while not frames:
            data = t.read_here(10)
            assert data, "the data never reached the reading thread"
            frames = decoder.receive_data(data)
        assert [(f.stream_id, f.payload) for f in frames] == [(3, b"for the thread")]
        threading.Event().wait(0.2)
        assert server.frames == [] and server.bytes == 0, "the loop read as well"
    finally:
        t.give_reading()
    client.transport.write(P.encode_frame(P.REQUEST, 4, b"for the loop"))
    (f,) = server.wait_frames(1)
    assert (f.stream_id, f.payload) == (4, b"for the loop")


def test_data_that_came_while_a_thread_held_the_reading_goes_to_the_loop_after(
        pair: Any) -> None:
    client, server, _ = pair
    t = server.transport
    assert t.take_reading()
    client.transport.write(P.encode_frame(P.REQUEST, 5, b"waits in the socket"))
    threading.Event().wait(0.2)
    assert server.frames == []
    t.give_reading()  # the loop must now see what is already waiting
    (f,) = server.wait_frames(1)
    assert f.payload == b"waits in the socket"


def test_the_end_of_the_connection_reaches_a_reading_thread_and_the_loop(
        loop: asyncio.AbstractEventLoop, pair: Any) -> None:
    client, server, _ = pair
    t = server.transport
    assert t.take_reading()
    try:
        loop.call_soon_threadsafe(client.transport.close)
        for _ in range(100):
            data = t.read_here(10)
            if data == b"":
                break
        else:
            pytest.fail("the reading thread never saw the end of the connection")
    finally:
        t.give_reading()
    assert server.lost.wait(10), "the loop was not told of the end"
    assert server.eof
    assert not t.take_reading()  # nothing left to read


def test_closing_wakes_a_thread_waiting_to_read(loop: asyncio.AbstractEventLoop,
                                                pair: Any) -> None:
    _, server, _ = pair
    t = server.transport
    assert t.take_reading()
    got: list[bytes | None] = []

    def reader() -> None:
        try:
            got.append(t.read_here(60))
        finally:
            t.give_reading()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    threading.Event().wait(0.1)
    loop.call_soon_threadsafe(server.transport.abort)
    th.join(20)
    assert not th.is_alive(), "a thread waiting to read slept through the close"
    assert got in ([b""], [None])
    assert server.lost.wait(10)


def test_without_epoll_the_loop_keeps_the_reading(loop: asyncio.AbstractEventLoop,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the platform has no epoll, no thread can take the reading over and the
    loop reads, writes and closes as before."""
    monkeypatch.delattr(select, "epoll")
    gen = make_pair(loop)
    client, server, _ = next(gen)
    try:
        assert not server.transport.take_reading()
        client.transport.write(P.encode_frame(P.REQUEST, 9, b"via the loop"))
        (f,) = server.wait_frames(1)
        assert f.payload == b"via the loop"
        loop.call_soon_threadsafe(client.transport.close)
        assert server.lost.wait(10) and server.eof
    finally:
        gen.close()
