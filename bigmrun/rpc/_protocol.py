"""Sans-IO wire protocol: bytes in, frames out. No sockets, no threads, no clocks.

How this works
--------------
Every frame is a 14-byte header followed by a payload::

    +----------------+--------+--------+--------------------------------+
    | length: u32 BE | type:u8|flags:u8| stream id: u64 BE              |  payload...
    +----------------+--------+--------+--------------------------------+

``length`` counts payload bytes only and may not exceed the connection's
``max_frame_size`` (checked from the header alone, before any payload is buffered, so a
hostile length field cannot make us allocate). Unknown frame types, frames that arrive
after a GOAWAY, and WINDOW frames with a malformed payload raise :class:`ProtocolError`
and the connection is dead from then on.

A *stream* is one call and its streamed arguments and reply. The caller picks stream
ids (never reused on a connection). The frame kinds:

========  ==============================================================================
REQUEST   open a call on stream id; payload = encoded method + arguments (``_codec``)
RESPONSE  the call's reply; flag ``STREAM`` says DATA frames follow with the items
ERROR     the call failed; payload = encoded error
DATA      one chunk of a streamed argument or reply
END       end of a stream; flag ``ERROR`` says the payload is an encoded error, else
          the payload is the stream's trailer: u64 total DATA payload bytes and a u32
          CRC-32 of them, meaningful with flag ``CRC``. The receiver checks the total
          always and the CRC when both ends summed (a stream that lost or damaged a
          frame fails instead of delivering wrong data)
CANCEL    the caller gave up on the call (timeout or cancel); the callee should stop
WINDOW    flow-control credit: the receiver of DATA lets the sender send u32 more bytes
GOAWAY    the sender closes the connection in order; nothing may follow it
========  ==============================================================================

Flow control is credit based (per stream, in payload bytes) and enforced by the stream
layer (``_streams.py``); this module only frames and validates.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ProtocolError

HEADER = struct.Struct(">IBBQ")
HEADER_SIZE = HEADER.size  # 14
WINDOW_PAYLOAD = struct.Struct(">I")
END_TRAILER = struct.Struct(">QI")  # total payload bytes, CRC-32

REQUEST = 1
RESPONSE = 2
ERROR = 3
DATA = 4
END = 5
CANCEL = 6
WINDOW = 7
GOAWAY = 8

FRAME_NAMES = {
    REQUEST: "REQUEST",
    RESPONSE: "RESPONSE",
    ERROR: "ERROR",
    DATA: "DATA",
    END: "END",
    CANCEL: "CANCEL",
    WINDOW: "WINDOW",
    GOAWAY: "GOAWAY",
}

# Flags.
FLAG_STREAM = 0x01  # RESPONSE: the reply is a stream of DATA frames ending with END
FLAG_ERROR = 0x02  # END: the stream failed; payload is an encoded error
FLAG_MORE = 0x04  # DATA of a streamed reply: the item continues in the next DATA frame
FLAG_RAW = 0x08  # DATA, an item's last part: the item is raw bytes, not a pickle
FLAG_CRC = 0x10  # END: the trailer's CRC-32 was computed (see _connection.checksums)

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: Payloads this large that arrive in pieces are collected as chunks (see FrameDecoder).
LARGE_FRAME = 64 * 1024
MAX_STREAM_ID = 2**64 - 1


class Frame(NamedTuple):
    """One decoded frame: the only event this layer produces."""

    type: int
    flags: int
    stream_id: int
    payload: bytes

    def __repr__(self) -> str:
        name = FRAME_NAMES.get(self.type, str(self.type))
        return f"Frame({name}, flags={self.flags}, stream={self.stream_id}, {len(self.payload)}B)"


def encode_frame(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Encode one frame. Payload may be any bytes-like object."""
    return HEADER.pack(len(payload), ftype, flags, stream_id) + payload


def encode_header(ftype: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    """Encode a header alone, for writing a large payload without copying it."""
    return HEADER.pack(length, ftype, flags, stream_id)


def encode_window(stream_id: int, credit: int) -> bytes:
    """A WINDOW frame granting ``credit`` more payload bytes on ``stream_id``."""
    return HEADER.pack(4, WINDOW, 0, stream_id) + WINDOW_PAYLOAD.pack(credit)


def decode_window(frame: Frame) -> int:
    """The credit carried by a WINDOW frame."""
    return int(WINDOW_PAYLOAD.unpack(frame.payload)[0])


class FrameDecoder:
    """Incremental decoder: feed it bytes in any split, get whole frames back.

    Small frames are parsed out of one buffer. A frame whose payload is at least
    ``large_frame`` bytes and did not arrive whole is collected as a list of the chunks
    that carry it and joined once when its last byte arrives, so a 1 MiB DATA frame
    that comes in over several reads is copied once, not once per read.

    >>> d = FrameDecoder()
    >>> d.receive_data(encode_frame(CANCEL, 7)[:5])
    []
    >>> d.receive_data(encode_frame(CANCEL, 7)[5:])
    [Frame(CANCEL, flags=0, stream=7, 0B)]
    """

    __slots__ = ("_buf", "_closed", "_dead", "_large", "_large_head", "_large_left",
                 "_large_len", "_need", "large_frame", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 large_frame: int = LARGE_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self.large_frame = large_frame
        self._buf = bytearray()
        self._closed = False  # a GOAWAY was received
        self._dead = False  # a protocol error was raised
        self._need = HEADER_SIZE  # bytes buffered before the next parse is worthwhile
        # A large frame being collected: its chunks, header, bytes still missing, and
        # bytes collected so far (header included).
        self._large: list[bytes] | None = None
        self._large_head: tuple[int, int, int] = (0, 0, 0)
        self._large_left = 0
        self._large_len = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) + self._large_len

    def receive_data(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return every frame it completes, in order.

        Raises ProtocolError on a malformed stream; the decoder then refuses all input.
        """
        if self._dead:
            raise ProtocolError("connection already failed with a protocol error")
        frames: list[Frame] = []
        large = self._large
        if large is not None:  # the rest of a large frame's payload comes first
            left = self._large_left
            n = len(data)
            if n < left:
                large.append(bytes(data))
                self._large_left = left - n
                self._large_len += n
                return frames
            large.append(bytes(data[:left]))
            ftype, flags, sid = self._large_head
            self._large = None
            self._large_len = 0
            frames.append(Frame(ftype, flags, sid, b"".join(large)))
            if ftype == GOAWAY:
                self._closed = True
            if n == left:
                return frames
            data = data[left:]
        buf = self._buf
        buf += data
        if len(buf) < self._need:
            return frames
        off = 0
        end = len(buf)
        unpack = HEADER.unpack_from
        limit = self.max_frame_size
        need = HEADER_SIZE
        while end - off >= HEADER_SIZE:
            length, ftype, flags, sid = unpack(buf, off)
            if length > limit:
                self._fail(f"frame of {length} bytes exceeds the maximum frame size {limit}")
            if not REQUEST <= ftype <= GOAWAY:
                self._fail(f"unknown frame type {ftype}")
            if self._closed:
                self._fail(f"{FRAME_NAMES[ftype]} frame after GOAWAY")
            if ftype == WINDOW and length != 4:
                self._fail(f"WINDOW frame with a {length}-byte payload (expected 4)")
            total = HEADER_SIZE + length
            if end - off < total:
                if length >= self.large_frame:
                    # Collect the rest as chunks: buffer what came, then wait.
                    self._large = [bytes(buf[off + HEADER_SIZE : end])]
                    self._large_head = (ftype, flags, sid)
                    self._large_left = total - (end - off)
                    self._large_len = end - off
                    off = end
                else:
                    need = total
                break
            frames.append(Frame(ftype, flags, sid, bytes(buf[off + HEADER_SIZE : off + total])))
            off += total
            if ftype == GOAWAY:
                self._closed = True
        if off:
            del buf[:off]
        self._need = need
        return frames

    def _fail(self, message: str) -> None:
        self._dead = True
        self._buf = bytearray()
        self._large = None
        self._large_len = 0
        raise ProtocolError(message)
