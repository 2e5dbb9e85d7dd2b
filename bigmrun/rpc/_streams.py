"""Streams with credit-based flow control, shared by the client and the server side.

How this works
--------------
A stream carries either raw bytes (a streamed *argument*: a binary file or an iterator of
bytes) or pickled items (a streamed *reply*: what a service's generator yields). The
receiver starts by granting ``WINDOW`` bytes of credit implicitly; the sender never has
more than the granted credit in flight, and the receiver grants more (a WINDOW frame)
only as its consumer actually reads. So neither side ever holds more than about one
window of a stream in memory, however long the stream is.

The event loop thread feeds received chunks in (:meth:`Inbox.put`) and the consumer
takes them out from any thread (blocking) or from the loop (``await``). Credit going
back to the sender is batched: a WINDOW frame is sent once half a window was consumed.
"""

from __future__ import annotations

import asyncio
import collections
import io
import threading
from collections.abc import Callable
from typing import Any

from ..errors import BigmrunError, CallCancelledError
from ._codec import dumps

WINDOW = 8 * 1024 * 1024  # initial credit per stream, bytes
CHUNK = 1024 * 1024  # how much a sender reads from a file argument at a time
#: Largest DATA payload a sender emits: a CHUNK plus room for a pickle's header, so that
#: a streamed reply item of CHUNK bytes (pickled: a few bytes more) travels as one frame
#: instead of a full frame, a tiny one, and a join on the receiver.
PART = CHUNK + 4096


class Credit:
    """Send credit for one stream: granted on the loop thread, taken from any thread."""

    __slots__ = ("_available", "_closed", "_cond", "_waiters")

    def __init__(self, initial: int = WINDOW) -> None:
        self._available = initial
        self._cond = threading.Condition(threading.Lock())
        self._closed: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def grant(self, n: int) -> None:
        with self._cond:
            self._available += n
            self._cond.notify_all()
        self._wake_async()

    def close(self, exc: BaseException) -> None:
        """Stop the sender: every wait raises ``exc`` from now on."""
        with self._cond:
            if self._closed is None:
                self._closed = exc
            self._cond.notify_all()
        self._wake_async()

    def _wake_async(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.get_loop().call_soon_threadsafe(_set_none, w)

    def take(self, want: int) -> int:
        """Block until some credit is available; take up to ``want`` bytes of it."""
        with self._cond:
            while self._available <= 0 and self._closed is None:
                self._cond.wait()
            if self._closed is not None:
                raise self._closed
            n = min(want, self._available)
            self._available -= n
            return n

    async def atake(self, want: int) -> int:
        """Like :meth:`take`, for code running on an event loop."""
        while True:
            with self._cond:
                if self._closed is not None:
                    raise self._closed
                if self._available > 0:
                    n = min(want, self._available)
                    self._available -= n
                    return n
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
            await fut


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Inbox:
    """Received chunks of one stream, waiting for their consumer.

    ``send_credit(n)`` is called (from the consumer's thread) to return ``n`` bytes of
    credit to the sender; it must be thread-safe (it schedules a WINDOW frame).
    """

    __slots__ = ("_chunks", "_cond", "_consumed", "_error", "_finished", "_send_credit",
                 "_waiters")

    def __init__(self, send_credit: Callable[[int], None]) -> None:
        # (chunk, credit to return when consumed)
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._finished = False
        self._error: BaseException | None = None
        self._consumed = 0
        self._send_credit = send_credit
        self._waiters: list[asyncio.Future[None]] = []

    # producer side (event loop thread)
    def put(self, chunk: bytes, credit: int | None = None) -> None:
        with self._cond:
            if self._finished:
                return
            self._chunks.append((chunk, len(chunk) if credit is None else credit))
            self._cond.notify()
        self._wake_async()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            if self._finished:
                return
            self._finished = True
            self._error = error
            self._cond.notify_all()
        self._wake_async()

    def _wake_async(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.get_loop().call_soon_threadsafe(_set_none, w)

    # consumer side (any thread)
    def _account(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= WINDOW // 2:
            n, self._consumed = self._consumed, 0
            self._send_credit(n)

    def get(self) -> bytes | None:
        """The next chunk (blocking), or None at the end of the stream."""
        with self._cond:
            while not self._chunks and not self._finished:
                self._cond.wait()
            if self._chunks:
                chunk, credit = self._chunks.popleft()
            elif self._error is not None:
                raise self._error
            else:
                return None
        self._account(credit)
        return chunk

    def push_back(self, rest: bytes) -> None:
        """Return the unread tail of a chunk to the front (its credit was already counted)."""
        with self._cond:
            self._chunks.appendleft((rest, 0))

    async def aget(self) -> bytes | None:
        """The next chunk, awaited on an event loop; None at the end of the stream."""
        while True:
            with self._cond:
                if self._chunks:
                    chunk, credit = self._chunks.popleft()
                    break
                if self._finished:
                    if self._error is not None:
                        raise self._error
                    return None
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
            await fut
        self._account(credit)
        return chunk


class StreamReader(io.RawIOBase):
    """What a service method receives for a streamed argument: a readable binary file.

    ``read(n)`` blocks until data arrives (use it from a regular ``def`` method, which
    runs in a worker thread). ``async def`` methods use ``await stream.aread(n)``.
    """

    def __init__(self, inbox: Inbox, loop_thread: int | None = None) -> None:
        super().__init__()
        self._inbox = inbox
        self._loop_thread = loop_thread
        self._eof = False

    def readable(self) -> bool:
        return True

    def _check_thread(self) -> None:
        if self._loop_thread is not None and threading.get_ident() == self._loop_thread:
            raise BigmrunError(
                "a blocking read of a streamed argument inside an async method would stall "
                "the machine's event loop: use `await stream.aread(n)` there, or make the "
                "method a regular `def`"
            )

    def read(self, n: int | None = -1) -> bytes:
        self._check_thread()
        if n is None or n < 0:
            return self.readall()
        if n == 0 or self._eof:
            return b""
        chunk = self._inbox.get()
        if chunk is None:
            self._eof = True
            return b""
        if len(chunk) > n:
            self._inbox.push_back(chunk[n:])
            chunk = chunk[:n]
        return chunk

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        self._check_thread()
        parts: list[bytes] = []
        while True:
            chunk = self.read(CHUNK)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def __iter__(self) -> Any:  # iterate over chunks, not lines: streams are binary
        while True:
            chunk = self.read(CHUNK)
            if not chunk:
                return
            yield chunk

    async def aread(self, n: int = CHUNK) -> bytes:
        """Read up to ``n`` bytes without blocking the event loop."""
        if self._eof or n == 0:
            return b""
        chunk = await self._inbox.aget()
        if chunk is None:
            self._eof = True
            return b""
        if len(chunk) > n:
            self._inbox.push_back(chunk[n:])
            chunk = chunk[:n]
        return chunk


class ItemInbox(Inbox):
    """Inbox of a streamed reply: each item is one pickle, possibly split over DATA frames.

    Parts flagged MORE are held until the item's last part arrives; their credit is
    returned at once (a whole item must be in memory to be unpickled anyway), so an item
    larger than the window cannot stall the stream.
    """

    __slots__ = ("_parts",)

    def __init__(self, send_credit: Callable[[int], None]) -> None:
        super().__init__(send_credit)
        self._parts: list[bytes] = []

    def put_part(self, payload: bytes, more: bool, raw: bool = False) -> None:
        if more:
            self._parts.append(payload)
            self._send_credit(len(payload))
            return
        credit = len(payload)
        if self._parts:
            # Credit for the earlier parts was already returned; count only the last.
            self._parts.append(payload)
            payload, self._parts = b"".join(self._parts), []
        self.put(RawItem(payload) if raw else payload, credit)  # type: ignore[arg-type]


class RawItem:
    """An item of a streamed reply that was sent as raw ``bytes`` (no pickle)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def encode_item(item: Any, what: str) -> tuple[bytes, bool]:
    """An item of a streamed reply as (payload, raw): ``bytes`` go as they are (no
    pickling: a copy saved on each end), anything else is pickled."""
    if type(item) is bytes:
        return item, True
    return dumps(item, what), False


def stream_cancelled(what: str) -> CallCancelledError:
    return CallCancelledError(f"{what} was cancelled")


def send_with_credit(
    credit: Credit, data: bytes, send: Callable[..., None], chunk: int = PART,
    raw: bool = False,
) -> None:
    """Send ``data`` in parts no larger than ``chunk`` and never beyond the credit.

    ``send(part, more)`` is called for each part; ``more`` is True on every part but the
    last (a reply item is reassembled from its parts). With ``raw`` (an item that is
    ``bytes``, not a pickle) the last part is sent as ``send(part, False, True)``.
    Blocks while credit is exhausted.
    """
    view = memoryview(data)
    off = 0
    while True:
        n = credit.take(min(chunk, len(view) - off)) if len(view) - off else 0
        off = _send_part(data, view, off, n, send, raw)
        if off >= len(view):
            return


async def asend_with_credit(
    credit: Credit, data: bytes, send: Callable[..., None], chunk: int = PART,
    raw: bool = False,
) -> None:
    """:func:`send_with_credit` for code running on the event loop."""
    view = memoryview(data)
    off = 0
    while True:
        n = await credit.atake(min(chunk, len(view) - off)) if len(view) - off else 0
        off = _send_part(data, view, off, n, send, raw)
        if off >= len(view):
            return


def _send_part(data: bytes, view: memoryview, off: int, n: int, send: Callable[..., None],
               raw: bool) -> int:
    """Send the ``n`` bytes of ``data`` at ``off`` (credit already taken); the new offset."""
    # A whole ``bytes`` goes as it is (immutable: no copy needed); parts are copied.
    part = data if n == len(view) and type(data) is bytes else bytes(view[off : off + n])
    off += n
    if off < len(view):
        send(part, True)
    elif raw:
        send(part, False, True)
    else:
        send(part, False)
    return off
