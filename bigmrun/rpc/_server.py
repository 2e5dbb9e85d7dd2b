"""Server end of a connection: decode calls, run them, send replies.

Regular ``def`` methods run in a worker thread pool, so several calls into one machine
run at once and a slow method never stalls the event loop; ``async def`` methods (and
async generators) run as tasks on the loop. A CANCEL frame cancels the task, or sets
the call's ``cancelled`` event for a thread (visible through ``bigmrun.cancelled()``)
and stops its streams. A generator's items stream back under flow control.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._context import CallState, current_b, current_call
from ..errors import BigmrunError, CallCancelledError
from . import _protocol as P
from ._codec import (
    KIND_CANCELLED,
    StreamRef,
    decode_method,
    decode_request_body,
    dumps,
    encode_error,
)
from ._connection import BaseConnection
from ._dedup import Dedup
from ._stats import RpcStats
from ._streams import (
    Credit,
    Inbox,
    StreamReader,
    asend_with_credit,
    encode_item,
    send_with_credit,
)
from ._transport import Listener, TlsTransport
from ._workers import Workers

# How long a worker that answered the only call of a connection waits to read the next
# request itself before it hands the reading back to the loop (see _next_here).
READ_IDLE = 0.05


@dataclass(frozen=True)
class Handler:
    """A callable service method and how to run it."""

    fn: Callable[..., Any]
    is_async: bool
    is_asyncgen: bool

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Handler:
        return cls(fn, inspect.iscoroutinefunction(fn), inspect.isasyncgenfunction(fn))


class Dispatcher:
    """Maps ``"Service.method"`` to a :class:`Handler` (implemented by the supervisor)."""

    def lookup(self, method: str) -> Handler:
        raise NotImplementedError


class _Running:
    __slots__ = ("credit", "method", "rid", "sid", "state", "streams", "t0", "task")

    def __init__(self, sid: int, method: str, streams: list[int] | None = None) -> None:
        self.t0 = time.monotonic()
        self.rid: str | None = None  # retry_call's request id (see _dedup)
        self.sid = sid
        self.method = method
        self.state = CallState(method)
        self.task: asyncio.Task[Any] | None = None
        self.credit: Credit | None = None
        self.streams = streams or []  # ids of its streamed arguments

    def cancel(self) -> None:
        self.state.cancelled.set()
        if self.task is not None:
            self.task.cancel()
        if self.credit is not None:
            self.credit.close(CallCancelledError(f"{self.method} was cancelled"))


class ServerConnection(BaseConnection):
    """Serves calls from one authenticated peer."""

    def __init__(self, dispatcher: Dispatcher, executor: Workers, b: Any,
                 connections: set[ServerConnection] | None = None,
                 stats: RpcStats | None = None, dedup: Dedup | None = None) -> None:
        super().__init__()
        self.local = getattr(b, "name", None)
        self.stats = stats
        self.dedup = dedup
        self.dispatcher = dispatcher
        self.executor = executor
        self.b = b
        self.running: dict[int, _Running] = {}
        self._connections = connections
        self._loop_thread: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        import threading

        self._loop_thread = threading.get_ident()
        if self._connections is not None:
            self._connections.add(self)

    def frame_received(self, frame: P.Frame) -> None:
        t = frame.type
        if t == P.REQUEST:
            self._request(frame)
        elif t == P.CANCEL:
            run = self.running.pop(frame.stream_id, None)
            if run is not None:
                run.cancel()
                if run.task is not None and run.rid is not None and self.dedup is not None:
                    # An async call is cancelled for good: a retry may run it afresh.
                    self.dedup.finish(run.rid, P.ERROR, encode_error(
                        CallCancelledError(f"{run.method} was cancelled")), cache=False)
                self._close_arg_streams(run)
            inbox = self.inboxes.pop(frame.stream_id, None)
            self.forget_stream(frame.stream_id)
            if inbox is not None:
                inbox.finish(CallCancelledError("stream was cancelled"))
        else:
            self.abort(BigmrunError(f"unexpected {P.FRAME_NAMES[t]} frame from a client"))

    def end_error(self, frame: P.Frame) -> BaseException:
        from ._codec import decode_error

        return decode_error(frame.payload, self.peer)

    def lost(self, exc: BaseException) -> None:
        if self._connections is not None:
            self._connections.discard(self)
        while self.running:  # popitem: a worker may add a call it read meanwhile
            try:
                _, run = self.running.popitem()
            except KeyError:
                break
            run.cancel()

    # --- running a call ------------------------------------------------------------

    def _request(self, frame: P.Frame) -> None:
        decoded = self._decode_request(frame)
        if decoded is not None:
            self._begin(frame, *decoded)

    def _decode_request(self, frame: P.Frame) -> tuple[
            str, Handler, tuple[Any, ...], dict[str, Any], dict[str, Any] | None] | None:
        """Method, handler, arguments and meta of a REQUEST; None (and the ERROR sent) if
        it names no method of this machine or its arguments cannot be decoded. Any
        thread."""
        try:
            method, off = decode_method(frame.payload)
            handler = self.dispatcher.lookup(method)
            args, kwargs, meta = decode_request_body(frame.payload, off, method)
        except Exception as e:
            self.write(P.encode_frame(P.ERROR, frame.stream_id, encode_error(e)))
            return None
        return method, handler, args, kwargs, meta

    def _begin(self, frame: P.Frame, method: str, handler: Handler, args: tuple[Any, ...],
               kwargs: dict[str, Any], meta: dict[str, Any] | None) -> None:
        """Start a decoded call (loop thread)."""
        sid = frame.stream_id
        streams: list[int] = []
        try:
            rid = meta.get("rid") if meta else None
            if rid is not None and self.dedup is not None:
                def answer(ftype: int, payload: bytes, sid: int = sid) -> None:
                    self.write(P.encode_frame(ftype, sid, payload))

                if not self.dedup.begin(str(rid), answer):
                    return  # a retry of a call that ran or runs: answered by it
            if meta and meta.get("streams"):
                args, kwargs = self._attach_streams(args, kwargs, streams)
        except Exception as e:
            self.write(P.encode_frame(P.ERROR, sid, encode_error(e)))
            return
        run = _Running(sid, method, streams)
        run.rid = rid
        self.running[sid] = run
        if self.stats is not None:
            self.stats.started(method, len(frame.payload))
        if handler.is_async or handler.is_asyncgen:
            run.task = self.loop.create_task(self._run_async(run, handler, args, kwargs))
        else:
            self.executor.run(self._run_sync, run, handler.fn, args, kwargs)

    def _next_here(self) -> tuple[_Running, Callable[..., Any], tuple[Any, ...],
                                  dict[str, Any]] | None:
        """Worker thread, its call just answered and none other running: read the next
        request itself instead of going back to the pool, so that a plain ``def`` call
        runs without waking the loop and then a worker (two thread wake-ups, each tens
        of µs on a VM). Returns that call, registered as running, to run on this
        thread; None when anything else came (handed to the loop, in order), nothing
        came for a while, or the loop is reading. Reading goes back to the loop before
        the call runs, so other calls are read and run meanwhile as usual."""
        t = self.transport
        if (self.running or self.faults is not None or not isinstance(t, TlsTransport)
                or not t.take_reading()):
            return None
        try:
            while True:
                data = t.read_here(READ_IDLE)
                if not data:
                    return None
                frames = self.decode_here(data)
                if frames is None:
                    return None
                if not frames:
                    continue  # part of a frame: read on
                if len(frames) == 1 and frames[0].type == P.REQUEST:
                    frame = frames[0]
                    decoded = self._decode_request(frame)
                    if decoded is None:
                        continue  # answered with an ERROR
                    method, handler, args, kwargs, meta = decoded
                    if (handler.is_async or handler.is_asyncgen
                            or (meta and (meta.get("rid") is not None
                                          or meta.get("streams")))):
                        self.loop.call_soon_threadsafe(self._begin, frame, *decoded)
                        return None
                    run = _Running(frame.stream_id, method)
                    self.running[run.sid] = run
                    if self.stats is not None:
                        self.stats.started(method, len(frame.payload))
                    return run, handler.fn, args, kwargs
                self.loop.call_soon_threadsafe(self.frames_received, frames)
                return None
        finally:
            t.give_reading()

    def _attach_streams(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                        ids: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def attach(v: Any) -> Any:
            if isinstance(v, StreamRef):
                ids.append(v.stream_id)
                inbox = Inbox(self.credit_sender(v.stream_id))
                self.inboxes[v.stream_id] = inbox
                return StreamReader(inbox, self._loop_thread)
            return v

        return tuple(attach(a) for a in args), {k: attach(v) for k, v in kwargs.items()}

    def _run_sync(self, run: _Running, fn: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
        """Worker thread: run the call, then the calls it reads itself (``_next_here``)."""
        while self._run_one(run, fn, args, kwargs):
            following = self._next_here()
            if following is None:
                return
            run, fn, args, kwargs = following

    def _run_one(self, run: _Running, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> bool:
        """Run one method and send its reply; True if this thread sent the reply and no
        other call is running."""
        loop = self.loop
        b_token = current_b.set(self.b)
        c_token = current_call.set(run.state)
        try:
            result = fn(*args, **kwargs)
            if inspect.isgenerator(result):
                self._stream_sync(run, result)
                return False
            payload = dumps(result, f"reply of {run.method}")
            if (run.rid is None and not run.streams and self.faults is None
                    and len(self.running) == 1):
                # The only call running, with nothing of the loop's to update: reply from
                # this thread (the transport is thread-safe), sparing the loop thread a
                # wake-up. With several calls running, the loop's one thread writes
                # their replies faster than the workers taking turns at the socket.
                self._respond(run, payload)
                return True
            loop.call_soon_threadsafe(self._respond, run, payload)
        except BaseException as e:
            self._fail_threadsafe(run, e)
        finally:
            current_call.reset(c_token)
            current_b.reset(b_token)
        return False

    def _fail_threadsafe(self, run: _Running, e: BaseException) -> None:
        kind = KIND_CANCELLED if run.state.is_cancelled() else None
        try:
            self.loop.call_soon_threadsafe(self._fail, run, encode_error(e, kind))
        except RuntimeError:  # loop closed: the machine is exiting
            pass

    def _close_arg_streams(self, run: _Running) -> None:
        """The call is over: drop what is left of its streamed arguments (the client
        stops sending them when it sees the call end)."""
        for ssid in run.streams:
            self.forget_stream(ssid)
            inbox = self.inboxes.pop(ssid, None)
            if inbox is not None:
                inbox.finish(CallCancelledError(f"{run.method} is over: stream closed"))

    def _record(self, run: _Running, ok: bool, nbytes: int) -> None:
        if self.stats is not None:
            self.stats.finished(run.method, ok, nbytes, time.monotonic() - run.t0)

    def _respond(self, run: _Running, payload: bytes) -> None:
        """Send a call's reply (loop thread; or its worker when the call has no request
        id and no streamed argument: then nothing here is the loop's own state)."""
        if run.rid is not None and self.dedup is not None:
            self.dedup.finish(run.rid, P.RESPONSE, payload)
        if self.running.pop(run.sid, None) is run:
            self._record(run, True, len(payload))
            self._close_arg_streams(run)
            self.write(P.encode_frame(P.RESPONSE, run.sid, payload))

    def _fail(self, run: _Running, payload: bytes) -> None:
        if run.rid is not None and self.dedup is not None:
            self.dedup.finish(run.rid, P.ERROR, payload)
        if self.running.pop(run.sid, None) is run:
            self._record(run, False, len(payload))
            self._close_arg_streams(run)
            self.write(P.encode_frame(P.ERROR, run.sid, payload))

    def _open_stream(self, run: _Running) -> None:
        if run.rid is not None and self.dedup is not None:
            self.dedup.finish(run.rid, P.ERROR, encode_error(BigmrunError(
                f"{run.method} returned a stream, which a retry cannot replay; it already "
                f"started, so it was not run again")))
        if self.running.get(run.sid) is run and run.credit is not None:
            self.credits[run.sid] = run.credit
            self.write(P.encode_frame(P.RESPONSE, run.sid, b"", P.FLAG_STREAM))

    def _end_stream(self, run: _Running, error: bytes | None) -> None:
        if self.running.pop(run.sid, None) is run:
            self._record(run, error is None, 0)
            self._close_arg_streams(run)
            self.write_end(run.sid, error)

    def _stream_sync(self, run: _Running, gen: Any) -> None:
        loop = self.loop
        sid = run.sid
        run.credit = Credit()
        # The stream's RESPONSE must go before its first item: from this thread when the
        # items can go from it too, else both through the loop.
        direct = run.rid is None and self.faults is None
        if direct:
            self._open_stream(run)
        else:
            loop.call_soon_threadsafe(self._open_stream, run)
        send = self.data_sender(sid, items=True, direct=direct)
        try:
            for item in gen:
                if run.state.is_cancelled():
                    break
                payload, raw = encode_item(item, f"an item of {run.method}")
                send_with_credit(run.credit, payload, send, raw=raw)
            else:
                loop.call_soon_threadsafe(self._end_stream, run, None)
                return
        except CallCancelledError:
            pass
        except BaseException as e:
            if not run.state.is_cancelled():
                loop.call_soon_threadsafe(self._end_stream, run, encode_error(e))
                return
        finally:
            gen.close()

    async def _run_async(self, run: _Running, handler: Handler, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
        current_b.set(self.b)
        current_call.set(run.state)
        try:
            if handler.is_asyncgen:
                await self._stream_async(run, handler.fn(*args, **kwargs))
                return
            result = await handler.fn(*args, **kwargs)
            self._respond(run, dumps(result, f"reply of {run.method}"))
        except asyncio.CancelledError:
            if not run.state.is_cancelled():
                raise
        except BaseException as e:
            self._fail(run, encode_error(e))

    async def _stream_async(self, run: _Running, agen: Any) -> None:
        run.credit = Credit()
        self._open_stream(run)
        sid = run.sid

        def send(part: bytes, more: bool, raw: bool = False) -> None:
            self.write_data(sid, part, P.FLAG_MORE if more else P.FLAG_RAW if raw else 0)

        try:
            async for item in agen:
                payload, raw = encode_item(item, f"an item of {run.method}")
                await asend_with_credit(run.credit, payload, send, raw=raw)
            self._end_stream(run, None)
        except (asyncio.CancelledError, CallCancelledError):
            if not run.state.is_cancelled():
                raise
        except BaseException as e:
            self._end_stream(run, encode_error(e))
        finally:
            await agen.aclose()


class Server:
    """A listening TLS endpoint serving one dispatcher; tracks its live connections."""

    def __init__(self, dispatcher: Dispatcher, executor: Workers, b: Any) -> None:
        self.dispatcher = dispatcher
        self.executor = executor
        self.b = b
        self.connections: set[ServerConnection] = set()
        self.stats = RpcStats()
        self.dedup = Dedup()
        self._server: Listener | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self._server = Listener(
            lambda: ServerConnection(self.dispatcher, self.executor, self.b, self.connections,
                                     self.stats, self.dedup),
            ctx,
        )
        self.host, self.port = await self._server.listen(host, port)

    def abort_all(self) -> None:
        """Close the listener and drop every connection at once (as a crash would)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort(BigmrunError("server killed"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
