"""TLS over a non-blocking socket: read by the event loop, written from any thread.

asyncio's own TLS transport may only be touched from its loop's thread, so every reply a
worker thread produced and every request a user thread made had to hop onto the loop
first (``call_soon_threadsafe``: a wake-up of the loop thread, on the critical path of
each call). This transport keeps the loop for what it is good at (waiting for the socket
to become readable, handshakes, timers) but lets any thread *write*: a write encrypts
under the transport's lock (``ssl.SSLObject`` over memory BIOs) and sends straight to the
socket; only what the kernel does not take at once is left for the loop to flush.

Closing and every protocol callback (``connection_made``, ``data_received``,
``eof_received``, ``resume_writing``, ``connection_lost``) happen on the loop thread, as
with asyncio's transports; ``pause_writing`` is called by the thread whose write crossed
the high-water mark (the protocol only sets a flag). Reading is the loop's too, except
while a thread that would otherwise only wait has taken it over (``take_reading``,
``read_here``, ``give_reading``): a caller waiting for its reply, a worker waiting for
the next request. That saves the loop's wake-up and its hand-off to the waiting thread.

The TLS handshake completes before the protocol is made, so no byte of an
unauthenticated peer reaches it: the server's context requires a client certificate of
the session, the client's verifies the server's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("bigmrun.rpc")

READ_SIZE = 256 * 1024
DEFAULT_HIGH_WATER = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0

ProtocolFactory = Callable[[], asyncio.Protocol]
_P = TypeVar("_P", bound=asyncio.Protocol)


class TlsTransport(asyncio.Transport):
    """One established TLS connection (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._lock = threading.Lock()
        self._wbuf: collections.deque[bytes | memoryview] = collections.deque()
        self._wbuf_size = 0
        self._writer_on = False
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._paused = False
        self._closing = False
        self._done = False  # connection_lost is scheduled
        self._protocol: asyncio.Protocol | None = None
        self._loop_thread = threading.get_ident()
        # Reading: whoever holds _rlock reads and decodes, the loop or a thread that took
        # the reading over (see take_reading). The loop watches _ep, an epoll set that
        # holds the socket only while the loop is to read it, so that handing reading
        # over and back needs no call into the loop (which only one thread may touch).
        # Without epoll (not Linux) the loop watches the socket itself and keeps the
        # reading.
        self._rlock = threading.Lock()
        self._ep: Any = None
        self._watched = self._fd
        self._poll: Any = None
        if hasattr(select, "epoll"):
            self._ep = select.epoll()
            self._ep.register(self._fd, 0)
            self._watched = self._ep.fileno()
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        self._read_paused = False
        self._extra: dict[str, Any] = {
            "socket": sock,
            "ssl_object": sslobj,
            "peercert": sslobj.getpeercert(),
            "cipher": sslobj.cipher(),
            "compression": sslobj.compression(),
        }
        try:
            self._extra["sockname"] = sock.getsockname()
            self._extra["peername"] = sock.getpeername()
        except OSError:
            pass

    # --- start ------------------------------------------------------------------------

    def start(self, protocol: asyncio.Protocol) -> None:
        """Hand the connection to ``protocol`` and start reading (loop thread)."""
        self._protocol = protocol
        self._loop_thread = threading.get_ident()
        protocol.connection_made(self)
        if self._done:
            return
        if self._ep is not None:
            self._ep.modify(self._fd, select.EPOLLIN)
        self._loop.add_reader(self._watched, self._on_readable)
        # Application data that came in the same reads as the end of the handshake
        # (a TLS 1.3 client may send its first request right behind its Finished).
        with self._rlock:
            self._receive(b"")

    # --- reading (loop thread) ----------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._rlock.acquire(False):
            return  # a thread has taken the reading over (and took the socket out of _ep)
        try:
            try:
                data = self._sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._fatal(e)
                return
            if not data:
                self._on_eof()
                return
            self._receive(data)
        finally:
            self._rlock.release()

    def _receive(self, data: bytes) -> None:
        chunks, eof, error = self._decrypt(data)
        protocol = self._protocol
        if chunks and protocol is not None:
            protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if error is not None:
            self._fatal(error)
        elif eof:
            self._on_eof()

    def _decrypt(self, data: bytes) -> tuple[list[bytes], bool, BaseException | None]:
        chunks: list[bytes] = []
        eof = False
        error: BaseException | None = None
        with self._lock:
            if self._done:
                return chunks, False, None
            if data:
                self._in.write(data)
            ssl_read = self._ssl.read
            try:
                while True:
                    chunk = ssl_read(READ_SIZE)
                    if not chunk:
                        eof = True
                        break
                    chunks.append(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                eof = True
            except (ssl.SSLError, OSError) as e:
                error = e
            if self._out.pending:  # post-handshake messages (tickets, key updates)
                self._send_locked(self._out.read())
        return chunks, eof, error

    # --- reading from another thread ------------------------------------------------------

    def take_reading(self) -> bool:
        """Take the reading over from the loop (any thread); False if the loop or another
        thread is reading now. Until :meth:`give_reading` the caller reads with
        :meth:`read_here` and hands what is not its own to the loop, in order."""
        if (self._ep is None or self._done or self._read_paused
                or not self._rlock.acquire(False)):
            return False
        try:
            self._ep.modify(self._fd, 0)
        except (OSError, ValueError):  # closed meanwhile
            self._rlock.release()
            return False
        return True

    def give_reading(self) -> None:
        """Hand the reading back to the loop (by the thread that took it)."""
        try:
            if not self._done and not self._closing and not self._read_paused:
                self._ep.modify(self._fd, select.EPOLLIN)
        except (OSError, ValueError):
            pass
        finally:
            self._rlock.release()

    def read_here(self, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` s for data and return it decrypted (by the thread that
        took the reading). None: nothing came; b"": nothing to use (the end of the
        connection, or an error, both passed to the loop to handle)."""
        if not self._poll.poll(timeout * 1000):
            return None
        with self._lock:
            if self._done:
                return b""
            try:
                data = self._sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                data = None
                error: BaseException = e
        if data is None:
            self._fatal_threadsafe(error)
            return b""
        if not data:
            self._eof_threadsafe()
            return b""
        chunks, eof, err = self._decrypt(data)
        if err is not None:
            self._fatal_threadsafe(err)
        elif eof:
            self._eof_threadsafe()
        if not chunks:  # only TLS's own records (a ticket), or the end
            return b"" if err is not None or eof else None
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _eof_threadsafe(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_eof)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _on_eof(self) -> None:
        if self._done:
            return
        self._watch(False)
        keep_open = False
        if self._protocol is not None:
            try:
                keep_open = bool(self._protocol.eof_received())
            except Exception:
                log.exception("eof_received failed")
        if not keep_open:
            self.close()

    # --- writing (any thread) -------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data`` (thread-safe; frames written whole stay whole)."""
        if data:
            self.writelines((data,))

    def writelines(self, list_of_data: Any) -> None:
        """Write several buffers as one: no other thread's write comes between them."""
        with self._lock:
            if self._closing or self._done:
                return
            try:
                for data in list_of_data:
                    view = memoryview(data)
                    while view:
                        n = self._ssl.write(view)
                        view = view[n:]
            except (ssl.SSLError, OSError) as e:
                self._fatal_threadsafe(e)
                return
            self._send_locked(self._out.read())
            if self._wbuf_size > self._high and not self._paused and self._protocol:
                # Under the lock, so that a resume from the loop cannot come first.
                self._paused = True
                self._protocol.pause_writing()

    def _send_locked(self, out: bytes) -> None:
        if not out:
            return
        if self._wbuf:
            self._wbuf.append(out)
            self._wbuf_size += len(out)
            return
        try:
            n = self._sock.send(out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._fatal_threadsafe(e)
            return
        if n < len(out):
            rest = memoryview(out)[n:]
            self._wbuf.append(rest)
            self._wbuf_size += len(rest)
            if not self._writer_on:
                self._writer_on = True
                if threading.get_ident() == self._loop_thread:
                    self._loop.add_writer(self._fd, self._on_writable)
                else:
                    self._loop.call_soon_threadsafe(self._add_writer)

    def _add_writer(self) -> None:
        if not self._done:
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        finish = False
        error: BaseException | None = None
        with self._lock:
            wbuf = self._wbuf
            while wbuf:
                buf = wbuf[0]
                try:
                    n = self._sock.send(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    wbuf.clear()
                    self._wbuf_size = 0
                    error = e
                    break
                self._wbuf_size -= n
                if n < len(buf):
                    wbuf[0] = memoryview(buf)[n:]
                    break
                wbuf.popleft()
            if not wbuf:
                self._writer_on = False
                self._loop.remove_writer(self._fd)
                finish = self._closing
            if self._paused and self._wbuf_size <= self._low and error is None:
                self._paused = False
                if self._protocol is not None:
                    self._protocol.resume_writing()  # sets futures: nothing runs here
        if error is not None:
            self._fatal(error)
            return
        if finish:
            self._finish(None)

    # --- flow control ---------------------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = DEFAULT_HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._wbuf_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def is_reading(self) -> bool:
        return not self._done

    # --- closing (loop thread; other threads are redirected there) -------------------------

    def is_closing(self) -> bool:
        return self._closing or self._done

    def close(self) -> None:
        """Send what is buffered and a close_notify, then close."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.close)
            return
        with self._lock:
            if self._closing or self._done:
                return
            self._closing = True
            try:
                self._ssl.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass  # the peer's close_notify is not awaited
            self._send_locked(self._out.read())
            flushed = not self._wbuf
        self._watch(False)
        if flushed:
            self._finish(None)

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.abort)
            return
        with self._lock:
            self._closing = True
            self._wbuf.clear()
            self._wbuf_size = 0
        self._finish(None)

    def _fatal_threadsafe(self, exc: BaseException) -> None:
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self._fatal, exc)
        else:
            try:
                self._loop.call_soon_threadsafe(self._fatal, exc)
            except RuntimeError:  # the loop is closed
                pass

    def _fatal(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
            log.debug("connection error: %s", exc)
        else:
            log.debug("TLS error: %s", exc)
        with self._lock:
            self._closing = True
            self._wbuf.clear()
            self._wbuf_size = 0
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._loop.remove_reader(self._watched)
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False
        try:  # wakes a thread that waits to read (see read_here)
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        if self._ep is not None:
            self._ep.close()
        if self._protocol is not None:
            self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: BaseException | None) -> None:
        assert self._protocol is not None
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]

    # --- the rest of asyncio.Transport -------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self._read_paused = True
        self._watch(False)

    def resume_reading(self) -> None:
        self._read_paused = False
        if not self._done and not self._closing:
            self._watch(True)

    def _watch(self, on: bool) -> None:
        """Let the loop read the socket, or not (loop thread)."""
        if self._ep is None:
            if on:
                self._loop.add_reader(self._fd, self._on_readable)
            else:
                self._loop.remove_reader(self._fd)
            return
        try:
            self._ep.modify(self._fd, select.EPOLLIN if on else 0)
        except (OSError, ValueError):  # closed
            pass


# --- handshakes ------------------------------------------------------------------------------


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, ctx: ssl.SSLContext,
                     server_side: bool, server_hostname: str | None) -> TlsTransport:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                          server_hostname=server_hostname)
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                await loop.sock_sendall(sock, pending)
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionResetError("the peer closed the connection during the "
                                           "TLS handshake") from None
            incoming.write(data)
    pending = outgoing.read()
    if pending:
        await loop.sock_sendall(sock, pending)
    return TlsTransport(loop, sock, sslobj, incoming, outgoing)


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(factory: Callable[[], _P], host: str, port: int, ctx: ssl.SSLContext,
                  server_hostname: str | None = None,
                  handshake_timeout: float = HANDSHAKE_TIMEOUT) -> tuple[TlsTransport, _P]:
    """Connect to ``host:port``, complete the TLS handshake, start ``factory()``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        break
    else:
        assert last is not None
        raise last
    _nodelay(sock)
    try:
        transport = await asyncio.wait_for(
            _handshake(loop, sock, ctx, False, server_hostname or host), handshake_timeout)
    except BaseException:
        sock.close()
        raise
    protocol = factory()
    transport.start(protocol)
    return transport, protocol


class Listener:
    """A listening socket whose connections are TLS :class:`TlsTransport`s."""

    def __init__(self, factory: ProtocolFactory, ctx: ssl.SSLContext,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._factory = factory
        self._ctx = ctx
        self._timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int, backlog: int = 1024) -> tuple[str, int]:
        """Bind ``host:port`` (port 0: any free port) and accept; return the address."""
        loop = self._loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        loop.add_reader(sock.fileno(), self._accept)
        name = sock.getsockname()
        return str(name[0]), int(name[1])

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(64):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next wake-up
                log.warning("accept failed: %s", e)
                return
            conn.setblocking(False)
            _nodelay(conn)
            task = self._loop.create_task(self._serve(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            transport = await asyncio.wait_for(
                _handshake(self._loop, conn, self._ctx, True, None), self._timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError) as e:
            # A peer without a certificate of this session (or a port scanner): refused
            # before any of its bytes reached a protocol.
            log.debug("TLS handshake refused: %s", e)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        transport.start(self._factory())

    def close(self) -> None:
        """Stop accepting (established connections are not touched)."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._handshakes):
            task.cancel()
