"""Client end of a connection: sends calls, matches replies, streams arguments out.

Stream ids come from one process-wide counter, so the caller can pick them (and encode
``StreamRef`` markers) on its own thread before it knows which connection will carry the
call. Replies for calls we already gave up on (cancelled, timed out) are dropped.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import BigmrunError, CallCancelledError, SerializationError
from . import _protocol as P
from ._codec import decode_error, encode_error, loads
from ._connection import BaseConnection
from ._streams import CHUNK, Credit, ItemInbox, RawItem, send_with_credit
from ._transport import TlsTransport

# How often a caller reading its own reply (ClientConnection.read_reply_here) looks up
# from the socket to see whether the call was resolved otherwise (the machine was lost).
READ_WAIT = 0.1

_ids = itertools.count(1)


def new_stream_id() -> int:
    """A stream id unique in this process (thread-safe)."""
    return next(_ids)


class PendingCall:
    """A call in flight. ``resolve(ok, value)`` runs on the loop thread, exactly once."""

    __slots__ = ("method", "resolve", "sid", "streams")

    def __init__(self, sid: int, method: str, resolve: Callable[[bool, Any], None],
                 streams: list[int]) -> None:
        self.sid = sid
        self.method = method
        self.resolve = resolve
        self.streams = streams


class ReplyStream:
    """Iterator over the items a remote generator yields (sync ``for`` or ``async for``).

    Items are fetched as they are consumed (bounded by flow control). Closing the
    iterator early, or dropping it, cancels the remote generator.
    """

    def __init__(self, inbox: ItemInbox, cancel: Callable[[], None], what: str) -> None:
        self._inbox = inbox
        self._cancel = cancel
        self._what = what
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            data = self._inbox.get()
        except BaseException:
            self._done = True
            raise
        if data is None:
            self._done = True
            raise StopIteration
        if type(data) is RawItem:
            return data.data
        return loads(data, self._what)

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            data = await self._inbox.aget()
        except BaseException:
            self._done = True
            raise
        if data is None:
            self._done = True
            raise StopAsyncIteration
        if type(data) is RawItem:
            return data.data
        return loads(data, self._what)

    def close(self) -> None:
        """Stop the stream; the remote generator is cancelled if it is still running."""
        if not self._done:
            self._done = True
            self._cancel()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientConnection(BaseConnection):
    """Calls out over one connection. ``on_lost(conn, exc, pending)`` reports a break."""

    def __init__(
        self,
        machine: str,
        on_lost: Callable[[ClientConnection, BaseException, list[PendingCall]], None],
        local: str | None = None,
    ) -> None:
        super().__init__()
        self.local = local
        self.machine = machine
        self.pending: dict[int, PendingCall] = {}
        # Calls answered by a streamed reply that still stream arguments out: those
        # stop when the reply stream ends or is cancelled.
        self.reply_args: dict[int, PendingCall] = {}
        self._on_lost = on_lost

    def start_call(self, payload: bytes, call: PendingCall,
                   sources: list[tuple[int, Any]]) -> None:
        """Send a REQUEST and start pumping its streamed arguments (loop thread)."""
        if self.closed_exc is not None:
            call.resolve(False, self.closed_exc)
            return
        self.pending[call.sid] = call
        self.write(P.encode_frame(P.REQUEST, call.sid, payload))
        for ssid, source in sources:
            credit = Credit()
            self.credits[ssid] = credit
            threading.Thread(
                target=_pump, args=(self, ssid, source, credit, call.method),
                name=f"bigmrun-stream-{ssid}", daemon=True,
            ).start()

    def cancel_call(self, sid: int) -> None:
        """Give up on a call: tell the machine, stop its streams (loop thread)."""
        call = self.pending.pop(sid, None) or self.reply_args.pop(sid, None)
        inbox = self.inboxes.pop(sid, None)
        self.forget_stream(sid)
        if call is None and inbox is None:
            return
        if call is not None:
            self._stop_streams(call, CallCancelledError(f"{call.method} was cancelled"))
        if inbox is not None:
            inbox.finish(CallCancelledError("stream was cancelled"))
        self.write(P.encode_frame(P.CANCEL, sid))

    def _stop_streams(self, call: PendingCall, exc: BaseException) -> None:
        for ssid in call.streams:
            self.forget_stream(ssid)
            credit = self.credits.pop(ssid, None)
            if credit is not None:
                credit.close(exc)

    def frame_received(self, frame: P.Frame) -> None:
        t = frame.type
        sid = frame.stream_id
        if t == P.RESPONSE:
            call = self.pending.pop(sid, None)
            if call is None:
                return
            if frame.flags & P.FLAG_STREAM:
                inbox = ItemInbox(self.credit_sender(sid))
                self.inboxes[sid] = inbox
                if call.streams:
                    self.reply_args[sid] = call
                loop = self.loop

                def cancel(sid: int = sid) -> None:
                    try:
                        loop.call_soon_threadsafe(self.cancel_call, sid)
                    except RuntimeError:
                        pass

                call.resolve(True, ReplyStream(inbox, cancel, f"item of {call.method}"))
                return
            # The call is over: stop sending whatever of its streamed arguments the
            # method did not read (the machine dropped them).
            self._stop_streams(call, CallCancelledError(f"{call.method} returned"))
            try:
                value = loads(frame.payload, f"reply of {call.method}")
            except SerializationError as e:
                call.resolve(False, e)
                return
            call.resolve(True, value)
        elif t == P.ERROR:
            call = self.pending.pop(sid, None)
            if call is None:
                return
            err = decode_error(frame.payload, self.machine)
            self._stop_streams(call, err)
            call.resolve(False, err)
        else:
            self.abort(BigmrunError(f"unexpected {P.FRAME_NAMES[t]} frame from a server"))

    def end_error(self, frame: P.Frame) -> BaseException:
        return decode_error(frame.payload, self.machine)

    def stream_ended(self, stream_id: int) -> None:
        call = self.reply_args.pop(stream_id, None)
        if call is not None:  # the generator is done: so are the arguments it streamed
            self._stop_streams(call, CallCancelledError(f"{call.method} is over"))

    def read_reply_here(self, sid: int) -> None:
        """Read the reply to call ``sid`` on this (its caller's) thread, sent straight
        from it on an idle connection: the loop thread then is not woken to read it and
        wake the caller in turn (two thread wake-ups, each tens of µs on a VM, where the
        caller's own wait is one). Returns when the call is resolved, or as soon as
        anything else arrives (handed to the loop, in order, which reads from then on);
        the caller then waits for the reply as usual."""
        t = self.transport
        if self.faults is not None or not isinstance(t, TlsTransport) or not t.take_reading():
            return
        try:
            while sid in self.pending:
                data = t.read_here(READ_WAIT)
                if data is None:
                    continue
                if not data:
                    return
                frames = self.decode_here(data)
                if frames is None:
                    return
                others = []
                mine = None
                for f in frames:
                    if (mine is None and f.stream_id == sid
                            and (f.type == P.ERROR or (f.type == P.RESPONSE
                                                       and not f.flags & P.FLAG_STREAM))):
                        mine = f
                    else:
                        others.append(f)
                if others:
                    self.loop.call_soon_threadsafe(self.frames_received, others)
                if mine is not None:
                    self.frame_received(mine)
                if others:
                    return
        finally:
            t.give_reading()

    def take_pending(self) -> list[PendingCall]:
        """Remove and return every pending call. Atomic per call (``popitem``), so a call
        added by another thread meanwhile is either taken here or still in ``pending``
        for its sender to find (see ``Machine._send_direct``)."""
        taken = []
        pending = self.pending
        while pending:
            try:
                taken.append(pending.popitem()[1])
            except KeyError:  # emptied by another thread meanwhile
                break
        return taken

    def lost(self, exc: BaseException) -> None:
        pending = self.take_pending()
        self.reply_args.clear()  # their credits were closed with the connection
        self._on_lost(self, exc, pending)


def _is_bytes(x: Any) -> bool:
    return isinstance(x, (bytes, bytearray, memoryview))


def _pump(conn: ClientConnection, sid: int, source: Any, credit: Credit, method: str) -> None:
    """Stream one argument out, within the credit the machine grants (own thread)."""
    loop = conn.loop
    send = conn.data_sender(sid)
    try:
        if hasattr(source, "read"):
            while True:
                n = credit.take(CHUNK)
                data = source.read(n)
                if not data:
                    credit.grant(n)
                    break
                if not _is_bytes(data):
                    raise SerializationError(
                        f"a streamed argument of {method} is a text file: open it in "
                        f"binary mode ('rb')"
                    )
                if len(data) < n:
                    credit.grant(n - len(data))
                send(bytes(data), False)
        else:
            for chunk in source:
                if not _is_bytes(chunk):
                    raise SerializationError(
                        f"a streamed argument of {method} yielded {type(chunk).__name__}, "
                        f"not bytes: an iterator argument must yield bytes"
                    )
                if chunk:
                    send_with_credit(credit, bytes(chunk), send)
        loop.call_soon_threadsafe(conn.write_end, sid, None)
    except BigmrunError as e:
        if credit_closed(credit):
            return  # the call ended or the connection broke: nothing more to send
        _send_end_error(conn, sid, e)
    except Exception as e:
        _send_end_error(conn, sid, e)


def credit_closed(credit: Credit) -> bool:
    return credit._closed is not None


def _send_end_error(conn: ClientConnection, sid: int, e: BaseException) -> None:
    try:
        conn.loop.call_soon_threadsafe(conn.write_end, sid, encode_error(e))
    except RuntimeError:
        pass
