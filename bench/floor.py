"""The floor: what bigmrun's RPC would cost with zero overhead of its own.

A minimal asyncio echo server runs in ANOTHER process; the client talks to it over ONE
mutual TLS 1.3 connection (client certificate required and verified, both leaves
issued by a CA made in memory with ``bigmrun.rpc._tls``). The server receives its leaf
on its standard input (a private pipe), never on the command line, and reports the
port it bound (port 0) on its standard output.

The framing is the least an RPC can do: a 5-byte header (u32 payload length, u8 op)
and the payload. Both ends are plain ``asyncio.Protocol`` objects on the default event
loop, as in bigmrun, and the server answers each request with one ``transport.write``.

Figures (printed as one JSON object, or written with ``--json PATH``):

* ``rt``: round trips, one request at a time, 64-byte payload (requests/s, µs each);
* ``pipe``: 64 requests outstanding (64 coroutines sharing the connection), requests/s;
* ``bulk_up`` / ``bulk_down``: 1 MiB frames, ``--bulk-mib`` MiB to the server (which
  counts them) and as many back, MB/s (MB = 10^6 bytes) each way.

    python bench/floor.py [--duration 1.5] [--bulk-mib 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import ssl
import struct
import subprocess
import sys
import time

from _results import emit

HEADER = struct.Struct(">IB")
HSIZE = HEADER.size
U64 = struct.Struct(">Q")

ECHO = 1  # reply with the same payload
SINK = 2  # count the payload, no reply
SYNC = 3  # reply with the number of SINK bytes counted so far (u64), reset the count
SOURCE = 4  # payload: u64 total; the server sends DATA frames of 1 MiB, then END
DATA = 5
END = 6

MIB = 1 << 20
# Write buffer limit: of 64 KiB, 2 MiB and 16 MiB (bigmrun's), 2 MiB cost the least CPU
# per byte on this machine (the floor should be the best a minimal server can do).
WRITE_HIGH_WATER = 2 * MIB
LARGE = 64 * 1024  # the same large-frame threshold as bigmrun's FrameDecoder


class Framed(asyncio.Protocol):
    """Length-prefixed frames in, ``frame(op, payload)`` calls out; write back-pressure."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.large: list[bytes] | None = None  # chunks of a large frame still arriving
        self.large_op = 0
        self.large_left = 0
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.resumed: asyncio.Future[None] | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        # The same decoding strategy as bigmrun's FrameDecoder: small frames are cut out
        # of one buffer; a large frame arriving over several reads is collected as a
        # list of chunks and joined once.
        if self.large is not None:
            left = self.large_left
            if len(data) < left:
                self.large.append(data)
                self.large_left = left - len(data)
                return
            self.large.append(data[:left])
            payload = b"".join(self.large)
            self.large = None
            self.frame(self.large_op, payload)
            data = data[left:]
            if not data:
                return
        buf = self.buf
        buf += data
        off = 0
        end = len(buf)
        while end - off >= HSIZE:
            length, op = HEADER.unpack_from(buf, off)
            total = HSIZE + length
            if end - off < total:
                if length >= LARGE:
                    self.large = [bytes(buf[off + HSIZE : end])]
                    self.large_op = op
                    self.large_left = total - (end - off)
                    off = end
                break
            self.frame(op, bytes(buf[off + HSIZE : off + total]))
            off += total
        if off:
            del buf[:off]

    def frame(self, op: int, payload: bytes) -> None:
        raise NotImplementedError

    def send(self, op: int, payload: bytes = b"") -> None:
        assert self.transport is not None
        if len(payload) > 4096:  # large payloads: do not copy them into the header
            self.transport.write(HEADER.pack(len(payload), op))
            self.transport.write(payload)
        else:
            self.transport.write(HEADER.pack(len(payload), op) + payload)

    def pause_writing(self) -> None:
        self.paused = True
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    async def drain(self) -> None:
        if self.paused and self.resumed is not None:
            await self.resumed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)


# --- server -------------------------------------------------------------------------


class EchoServer(Framed):
    def __init__(self) -> None:
        super().__init__()
        self.sunk = 0

    def frame(self, op: int, payload: bytes) -> None:
        if op == ECHO:
            self.send(ECHO, payload)
        elif op == SINK:
            self.sunk += len(payload)
        elif op == SYNC:
            self.send(SYNC, U64.pack(self.sunk))
            self.sunk = 0
        elif op == SOURCE:
            (total,) = U64.unpack(payload)
            asyncio.get_running_loop().create_task(self.source(total))

    async def source(self, total: int) -> None:
        chunk = os.urandom(MIB)
        sent = 0
        while sent < total:
            n = min(MIB, total - sent)
            self.send(DATA, chunk if n == MIB else chunk[:n])
            sent += n
            await self.drain()
        self.send(END)


async def serve() -> None:
    """Server process: leaf from stdin, port to stdout, serve one connection, exit."""
    from bigmrun.rpc._tls import Leaf, server_context

    leaf = Leaf.from_dict(json.loads(sys.stdin.readline()))
    ctx = server_context(leaf)
    loop = asyncio.get_running_loop()
    conns: list[EchoServer] = []

    def factory() -> EchoServer:
        p = EchoServer()
        conns.append(p)
        return p

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    while not conns:
        await asyncio.sleep(0.01)
    await conns[0].done
    server.close()


# --- client -------------------------------------------------------------------------


class Client(Framed):
    def __init__(self) -> None:
        super().__init__()
        self.waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.received = 0
        self.source_done: asyncio.Future[None] | None = None

    def frame(self, op: int, payload: bytes) -> None:
        if op == DATA:
            self.received += len(payload)
        elif op == END:
            assert self.source_done is not None
            self.source_done.set_result(None)
        else:  # ECHO and SYNC replies come back in the order of the requests
            self.waiters.popleft().set_result(payload)

    def request(self, op: int, payload: bytes) -> asyncio.Future[bytes]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.send(op, payload)
        return fut


async def measure_rt(c: Client, duration: float) -> dict[str, float]:
    payload = os.urandom(64)
    for _ in range(200):  # warm up
        await c.request(ECHO, payload)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + duration
    while True:
        for _ in range(50):
            reply = await c.request(ECHO, payload)
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            break
    assert reply == payload
    elapsed = now - t0
    return {"rt_per_s": n / elapsed, "rt_us": elapsed / n * 1e6}


async def measure_pipe(c: Client, duration: float, depth: int = 64) -> dict[str, float]:
    payload = os.urandom(64)
    count = [0]
    stop = [False]

    async def worker() -> None:
        while not stop[0]:
            await c.request(ECHO, payload)
            count[0] += 1

    async def run(secs: float) -> tuple[int, float]:
        stop[0] = False
        count[0] = 0
        tasks = [asyncio.ensure_future(worker()) for _ in range(depth)]
        t0 = time.perf_counter()
        await asyncio.sleep(secs)
        n, elapsed = count[0], time.perf_counter() - t0
        stop[0] = True
        await asyncio.gather(*tasks)
        return n, elapsed

    await run(min(0.2, duration))  # warm up
    n, elapsed = await run(duration)
    return {"pipe_per_s": n / elapsed}


async def measure_bulk(c: Client, mib: int) -> dict[str, float]:
    chunk = os.urandom(MIB)
    total = mib * MIB
    # Up: 1 MiB frames to the server, which counts them; a SYNC reply ends the transfer.
    t0 = time.perf_counter()
    for _ in range(mib):
        c.send(SINK, chunk)
        await c.drain()
    (sunk,) = U64.unpack(await c.request(SYNC, b""))
    up = time.perf_counter() - t0
    assert sunk == total, (sunk, total)
    # Down: the server sends 1 MiB frames.
    c.received = 0
    c.source_done = asyncio.get_running_loop().create_future()
    t0 = time.perf_counter()
    c.send(SOURCE, U64.pack(total))
    await c.source_done
    down = time.perf_counter() - t0
    assert c.received == total, (c.received, total)
    return {"bulk_up_mbps": total / up / 1e6, "bulk_down_mbps": total / down / 1e6}


def client_ssl() -> tuple[ssl.SSLContext, dict[str, str]]:
    from bigmrun.rpc._tls import CertificateAuthority, client_context

    ca = CertificateAuthority("floor")
    return client_context(ca.issue("client")), ca.issue("server").to_dict()


async def client_main(args: argparse.Namespace) -> dict[str, float]:
    ctx, server_leaf = client_ssl()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(server_leaf) + "\n").encode())
        proc.stdin.close()  # the leaf went over a private pipe, not argv
        port = int(proc.stdout.readline())
        loop = asyncio.get_running_loop()
        transport, c = await loop.create_connection(
            Client, "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
        ssl_obj = transport.get_extra_info("ssl_object")
        assert ssl_obj.version() == "TLSv1.3", ssl_obj.version()
        assert ssl_obj.getpeercert(), "server presented no verified certificate"
        results: dict[str, float] = {}
        results.update(await measure_rt(c, args.duration))
        results.update(await measure_pipe(c, args.duration))
        await measure_bulk(c, min(16, args.bulk_mib))  # warm up (first-touch memory)
        results.update(await measure_bulk(c, args.bulk_mib))
        transport.close()
        await c.done
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=1.5,
                   help="seconds for each request-rate figure (default 1.5)")
    p.add_argument("--bulk-mib", type=int, default=256,
                   help="MiB to send each way for bulk (default 256)")
    p.add_argument("--json", metavar="PATH", help="write the results here (else stdout)")
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    results = asyncio.run(client_main(args))
    emit(results, args.json)


if __name__ == "__main__":
    main()
