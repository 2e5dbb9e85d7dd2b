"""The transport: one asyncio protocol per TLS connection, feeding the sans-IO decoder.

Everything here runs on the event loop thread except where a method says it is
thread-safe. ``connection_made`` is called by asyncio only after the TLS handshake has
succeeded, i.e. after the peer proved it holds a certificate of this session; no byte
of an unauthenticated peer ever reaches :class:`FrameDecoder` or ``pickle``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable
from typing import Any

from ..errors import NetworkError, ProtocolError
from . import _protocol as P
from ._faults import TABLE as FAULTS
from ._faults import Faults
from ._streams import Credit, Inbox, ItemInbox
from ._tls import peer_name

log = logging.getLogger("bigmrun.rpc")

WRITE_HIGH_WATER = 16 * 1024 * 1024


class BaseConnection(asyncio.Protocol):
    """Framing, write back-pressure and teardown common to both ends."""

    def __init__(self, max_frame_size: int = P.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.loop = asyncio.get_running_loop()
        self.decoder = P.FrameDecoder(max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.closed_exc: BaseException | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = self.loop.create_future()
        self.local: str | None = None  # our own participant name (for fault links)
        self.faults: Faults | None = None  # chaos on frames we send (see _faults)
        self._fault_release = 0.0
        self.credits: dict[int, Credit] = {}  # streams we send: credit granted by the peer
        # Streams we send and receive: [bytes, crc32 so far, whether we sum] (see
        # checksums()).
        self._tx: dict[int, list[int]] = {}
        self._rx: dict[int, list[int]] = {}
        self.inboxes: dict[int, Inbox] = {}  # streams we receive

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        FAULTS.register(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.receive_data(data)
        except ProtocolError as e:
            self._bad_data(e)
            return
        self.frames_received(frames)

    def _bad_data(self, e: ProtocolError) -> None:
        log.warning("closing connection from %s: %s", self.peer, e)
        self.abort(e)

    def decode_here(self, data: bytes) -> list[P.Frame] | None:
        """Decode ``data`` on the thread that took the reading over (see
        ``TlsTransport.take_reading``); None if the peer broke the protocol (the loop
        then closes the connection)."""
        try:
            return self.decoder.receive_data(data)
        except ProtocolError as e:
            self.loop.call_soon_threadsafe(self._bad_data, e)
            return None

    def frames_received(self, frames: list[P.Frame]) -> None:
        """Handle decoded frames in order (loop thread)."""
        for f in frames:
            t = f.type
            if t == P.DATA:
                inbox = self.inboxes.get(f.stream_id)
                if inbox is None:
                    continue  # a stream we gave up on: drop
                tally = self._rx.get(f.stream_id)
                if tally is None:
                    tally = self._rx[f.stream_id] = [0, 0, checksums(self)]
                tally[0] += len(f.payload)
                if tally[2]:
                    tally[1] = zlib.crc32(f.payload, tally[1])
                if isinstance(inbox, ItemInbox):
                    inbox.put_part(f.payload, bool(f.flags & P.FLAG_MORE),
                                   bool(f.flags & P.FLAG_RAW))
                else:
                    inbox.put(f.payload)
            elif t == P.WINDOW:
                credit = self.credits.get(f.stream_id)
                if credit is not None:
                    credit.grant(P.decode_window(f))
            elif t == P.END:
                inbox = self.inboxes.pop(f.stream_id, None)
                tally = self._rx.pop(f.stream_id, None) or [0, 0, 0]
                if inbox is not None:
                    if f.flags & P.FLAG_ERROR:
                        inbox.finish(self.end_error(f))
                    else:
                        inbox.finish(_check_trailer(f, tally))
                self.stream_ended(f.stream_id)
            elif t == P.GOAWAY:
                self.goaway_received()
            else:
                self.frame_received(f)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        err: BaseException
        if self.closed_exc is not None:
            err = self.closed_exc
        else:
            err = NetworkError(f"connection to {self.peer or 'peer'} lost"
                               + (f": {exc}" if exc else ""))
            if exc is not None:
                err.__cause__ = exc
            self.closed_exc = err
        self.transport = None
        for credit in self.credits.values():
            credit.close(err)
        self.credits.clear()
        for inbox in self.inboxes.values():
            inbox.finish(err)
        self.inboxes.clear()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(err)
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.lost(err)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # helpers
    def credit_sender(self, stream_id: int) -> Any:
        """A thread-safe function returning ``n`` bytes of credit on ``stream_id``."""
        loop = self.loop

        def send_credit(n: int) -> None:
            frame = P.encode_window(stream_id, n)
            try:
                loop.call_soon_threadsafe(self.write, frame)
            except RuntimeError:  # loop closed: the connection is gone anyway
                pass

        return send_credit

    def data_sender(self, stream_id: int, items: bool = False,
                    direct: bool = True) -> Callable[..., None]:
        """A function ``send(part, more)`` that sends DATA of ``stream_id`` from any
        thread: straight to the transport while the link has no faults, through the loop
        once it has had (or from the start if not ``direct``), so that parts never
        overtake each other. ``items``: mark parts of a reply item (FLAG_MORE, and
        FLAG_RAW on the last part of an item sent as raw bytes: ``send(part, False,
        True)``)."""
        loop = self.loop
        via_loop = not direct

        def send(part: bytes, more: bool, raw: bool = False) -> None:
            nonlocal via_loop
            flags = (P.FLAG_MORE if more else P.FLAG_RAW if raw else 0) if items else 0
            if not via_loop and self.faults is None:
                self.write_data(stream_id, part, flags)
            else:
                via_loop = True
                loop.call_soon_threadsafe(self.write_data, stream_id, part, flags)

        return send

    def write_data(self, stream_id: int, data: bytes, flags: int = 0) -> None:
        tally = self._tx.get(stream_id)
        if tally is None:
            if stream_id not in self.credits:
                return  # a stream that ended or was given up on: nothing more goes out
            tally = self._tx[stream_id] = [0, 0, checksums(self)]
        tally[0] += len(data)
        if tally[2]:
            tally[1] = zlib.crc32(data, tally[1])
        if self.faults is not None:
            self.faults.send(self, P.encode_header(P.DATA, stream_id, len(data), flags) + data)
            return
        t = self.transport
        if t is not None:  # one write: header and payload are never split by another's
            t.writelines((P.encode_header(P.DATA, stream_id, len(data), flags), data))

    def forget_stream(self, stream_id: int) -> None:
        """Drop the integrity tallies of a stream that was given up on."""
        self._tx.pop(stream_id, None)
        self._rx.pop(stream_id, None)

    def write_end(self, stream_id: int, error_payload: bytes | None = None) -> None:
        self.credits.pop(stream_id, None)
        total, crc, summed = self._tx.pop(stream_id, None) or (0, 0, 0)
        if error_payload is None:
            self.write(P.encode_frame(P.END, stream_id, P.END_TRAILER.pack(total, crc),
                                      P.FLAG_CRC if summed else 0))
        else:
            self.write(P.encode_frame(P.END, stream_id, error_payload, P.FLAG_ERROR))

    async def drain(self) -> None:
        if self.closed_exc is not None:
            raise self.closed_exc
        if self._paused:
            fut = self.loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def write(self, data: bytes) -> None:
        """Write one whole encoded frame."""
        if self.faults is not None:
            self.faults.send(self, data)
            return
        t = self.transport
        if t is not None:
            t.write(data)

    def abort(self, exc: BaseException) -> None:
        if self.closed_exc is None:
            self.closed_exc = exc
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close in order: GOAWAY, then close the transport."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(P.encode_frame(P.GOAWAY, 0))
            self.transport.close()

    # for subclasses
    def frame_received(self, frame: P.Frame) -> None:
        """REQUEST, RESPONSE, ERROR and CANCEL frames."""
        raise NotImplementedError

    def end_error(self, frame: P.Frame) -> BaseException:
        """The error an END frame with FLAG_ERROR carries."""
        raise NotImplementedError

    def goaway_received(self) -> None:
        pass

    def stream_ended(self, stream_id: int) -> None:
        """An END frame arrived for ``stream_id`` (after its inbox was finished)."""

    def lost(self, exc: BaseException) -> None:
        raise NotImplementedError

    def is_open(self) -> bool:
        return self.transport is not None and self.closed_exc is None

    def extra(self, key: str) -> Any:
        return self.transport.get_extra_info(key) if self.transport else None


def checksums(conn: BaseConnection) -> int:
    """Whether a stream starting now on ``conn`` is summed with CRC-32, on top of the
    total every trailer carries: in a session that allows chaos, or on a link with
    faults. Elsewhere TLS already authenticates every record, in order, so the bytes
    cannot change or go missing unnoticed (only a fault of ours could do that), and the
    sum would cost ~0.3 ms per MiB on each end, a third of a bulk transfer's time."""
    return 1 if FAULTS.checksums or conn.faults is not None else 0


def _check_trailer(frame: P.Frame, tally: list[int]) -> BaseException | None:
    """None if the stream arrived whole; else the error its consumer gets. ``tally``:
    [bytes, crc32, whether it was summed] of what arrived."""
    if len(frame.payload) != P.END_TRAILER.size:
        return ProtocolError(f"stream {frame.stream_id} ended without a valid trailer")
    total, crc = P.END_TRAILER.unpack(frame.payload)
    summed = bool(frame.flags & P.FLAG_CRC) and len(tally) > 2 and bool(tally[2])
    if total != tally[0] or (summed and crc != tally[1]):
        sent, got = (f" (crc32 {crc:08x})", f" (crc32 {tally[1]:08x})") if summed else ("", "")
        return ProtocolError(
            f"stream {frame.stream_id} arrived damaged: the sender sent {total} bytes"
            f"{sent}, {tally[0]} bytes{got} arrived"
        )
    return None
