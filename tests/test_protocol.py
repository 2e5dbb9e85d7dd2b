"""The sans-IO framing layer, byte by byte (in the manner of h11's tests).

Nothing here touches a socket: frames are encoded to bytes, the bytes are fed to a
:class:`FrameDecoder` in every possible split, and the frames that come out are compared
with what went in. Malformed input must raise :class:`ProtocolError` (and nothing else),
as early as the header allows, and leave the decoder refusing all further input.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmrun.errors import BigmrunError, ProtocolError
from bigmrun.rpc import _protocol as P
from bigmrun.rpc._protocol import (
    CANCEL,
    DATA,
    END,
    ERROR,
    FLAG_ERROR,
    FLAG_MORE,
    FLAG_STREAM,
    GOAWAY,
    HEADER_SIZE,
    MAX_STREAM_ID,
    REQUEST,
    RESPONSE,
    WINDOW,
    Frame,
    FrameDecoder,
    decode_window,
    encode_frame,
    encode_header,
    encode_window,
)

ALL_TYPES = [REQUEST, RESPONSE, ERROR, DATA, END, CANCEL, WINDOW, GOAWAY]

# One frame of every type (GOAWAY last: nothing may follow it), with a variety of
# flags, stream ids (including the extremes) and payload sizes (including empty).
SAMPLE_FRAMES = [
    Frame(REQUEST, 0, 1, b"\x00\x0bPI.sample\x80\x05payload"),
    Frame(RESPONSE, FLAG_STREAM, 1, b""),
    Frame(DATA, FLAG_MORE, 1, bytes(range(256))),
    Frame(DATA, 0, 1, b"x"),
    Frame(WINDOW, 0, 1, struct.pack(">I", 65536)),
    Frame(END, FLAG_ERROR, 1, b"encoded error"),
    Frame(ERROR, 0, 2, b"\xff" * 17),
    Frame(CANCEL, 0, MAX_STREAM_ID, b""),
    Frame(END, 0, 0, b""),
    Frame(RESPONSE, 0xFF, 3, b"reply"),
    Frame(GOAWAY, 0, 0, b""),
]


def encode(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.type, f.stream_id, f.payload, f.flags) for f in frames)


def header(length: int, ftype: int, flags: int = 0, sid: int = 0) -> bytes:
    return struct.pack(">IBBQ", length, ftype, flags, sid)


# --- encoding --------------------------------------------------------------------------


def test_header_is_14_bytes_big_endian() -> None:
    assert HEADER_SIZE == 14
    raw = encode_frame(DATA, 0x0102030405060708, b"abc", FLAG_MORE)
    assert raw == (b"\x00\x00\x00\x03"  # length
                   + bytes([DATA, FLAG_MORE])
                   + b"\x01\x02\x03\x04\x05\x06\x07\x08"  # stream id
                   + b"abc")


@pytest.mark.parametrize("ftype", ALL_TYPES)
def test_every_frame_type_round_trips(ftype: int) -> None:
    payload = struct.pack(">I", 123) if ftype == WINDOW else b"payload of %d" % ftype
    flags = {RESPONSE: FLAG_STREAM, DATA: FLAG_MORE, END: FLAG_ERROR}.get(ftype, 0)
    raw = encode_frame(ftype, 42, payload, flags)
    assert len(raw) == HEADER_SIZE + len(payload)
    d = FrameDecoder()
    assert d.receive_data(raw) == [Frame(ftype, flags, 42, payload)]
    assert d.buffered == 0


def test_encode_accepts_bytes_like_payloads() -> None:
    for payload in (bytearray(b"abc"), memoryview(b"abc")):
        raw = encode_frame(DATA, 5, payload)  # type: ignore[arg-type]  # bytes-like works
        assert isinstance(raw, bytes)
        assert FrameDecoder().receive_data(raw) == [Frame(DATA, 0, 5, b"abc")]


def test_encode_header_then_payload_equals_encode_frame() -> None:
    payload = b"z" * 1000
    assert (encode_header(DATA, 9, len(payload), FLAG_MORE) + payload
            == encode_frame(DATA, 9, payload, FLAG_MORE))


def test_window_round_trip_and_extremes() -> None:
    for credit in (0, 1, 8 * 1024 * 1024, 2**32 - 1):
        raw = encode_window(77, credit)
        assert raw == encode_frame(WINDOW, 77, struct.pack(">I", credit))
        (frame,) = FrameDecoder().receive_data(raw)
        assert frame.type == WINDOW and frame.stream_id == 77
        assert decode_window(frame) == credit


def test_stream_id_extremes() -> None:
    for sid in (0, 1, MAX_STREAM_ID):
        (frame,) = FrameDecoder().receive_data(encode_frame(CANCEL, sid))
        assert frame.stream_id == sid
    with pytest.raises(struct.error):
        encode_frame(CANCEL, MAX_STREAM_ID + 1)


def test_frame_repr_names_the_type_and_hides_the_payload() -> None:
    r = repr(Frame(DATA, FLAG_MORE, 3, b"secret bytes"))
    assert "DATA" in r and "stream=3" in r and "12B" in r
    assert "secret" not in r


# --- incremental decoding --------------------------------------------------------------


def test_all_sample_frames_in_one_piece() -> None:
    d = FrameDecoder()
    assert d.receive_data(encode(SAMPLE_FRAMES)) == SAMPLE_FRAMES
    assert d.buffered == 0


def test_split_at_every_byte_offset() -> None:
    raw = encode(SAMPLE_FRAMES)
    for i in range(len(raw) + 1):
        d = FrameDecoder()
        out = d.receive_data(raw[:i])
        out += d.receive_data(raw[i:])
        assert out == SAMPLE_FRAMES, f"split at {i}"
        assert d.buffered == 0


def test_split_at_every_pair_of_offsets() -> None:
    frames = [*SAMPLE_FRAMES[:5], SAMPLE_FRAMES[-1]]
    raw = encode(frames)
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            d = FrameDecoder()
            out = d.receive_data(raw[:i]) + d.receive_data(raw[i:j]) + d.receive_data(raw[j:])
            assert out == frames, f"split at {i}, {j}"


def test_one_byte_at_a_time() -> None:
    raw = encode(SAMPLE_FRAMES)
    d = FrameDecoder()
    out: list[Frame] = []
    ends = set()
    pos = 0
    for f in SAMPLE_FRAMES:
        pos += HEADER_SIZE + len(f.payload)
        ends.add(pos)
    last_end = 0
    for i in range(len(raw)):
        got = d.receive_data(raw[i : i + 1])
        # A frame comes out exactly when its last byte arrives, never earlier.
        if i + 1 in ends:
            assert len(got) == 1, f"byte {i}"
            last_end = i + 1
        else:
            assert got == [], f"byte {i}"
        out += got
        assert d.buffered == i + 1 - last_end
    assert out == SAMPLE_FRAMES
    assert d.buffered == 0


def test_empty_input_is_harmless() -> None:
    d = FrameDecoder()
    assert d.receive_data(b"") == []
    raw = encode_frame(DATA, 1, b"abc")
    assert d.receive_data(raw[:3]) == []
    assert d.receive_data(b"") == []
    assert d.receive_data(raw[3:]) == [Frame(DATA, 0, 1, b"abc")]


def test_buffered_counts_undelivered_bytes() -> None:
    d = FrameDecoder()
    assert d.buffered == 0
    first = encode_frame(DATA, 1, b"0123456789")
    second = encode_frame(DATA, 2, b"abcdef")
    assert d.receive_data(first[:5]) == []
    assert d.buffered == 5
    assert d.receive_data(first[5:20]) == []
    assert d.buffered == 20
    # Completes the first frame and starts the second: only the second's bytes remain.
    got = d.receive_data(first[20:] + second[:7])
    assert got == [Frame(DATA, 0, 1, b"0123456789")]
    assert d.buffered == 7
    assert d.receive_data(second[7:]) == [Frame(DATA, 0, 2, b"abcdef")]
    assert d.buffered == 0


def test_payload_is_an_independent_bytes_copy() -> None:
    d = FrameDecoder()
    (f,) = d.receive_data(encode_frame(DATA, 1, b"hello") + encode_frame(DATA, 2, b"x")[:3])
    assert type(f.payload) is bytes
    d.receive_data(encode_frame(DATA, 2, b"x")[3:])
    assert f.payload == b"hello"


def test_frame_of_exactly_max_size_is_accepted() -> None:
    d = FrameDecoder(max_frame_size=100)
    payload = b"p" * 100
    assert d.receive_data(encode_frame(DATA, 1, payload)) == [Frame(DATA, 0, 1, payload)]


# --- malformed input -------------------------------------------------------------------


def test_oversized_length_raises_from_the_header_alone() -> None:
    d = FrameDecoder(max_frame_size=1024)
    hdr = header(1025, DATA, 0, 1)
    assert len(hdr) == HEADER_SIZE
    # 13 bytes are not a header yet: nothing can be said.
    assert d.receive_data(hdr[:13]) == []
    # The 14th byte completes the header: refused before a single payload byte came.
    with pytest.raises(ProtocolError, match="exceeds the maximum frame size"):
        d.receive_data(hdr[13:])
    assert d.buffered == 0


def test_hostile_length_does_not_buffer_payload() -> None:
    d = FrameDecoder()  # default 16 MiB limit
    hdr = header(2**32 - 1, REQUEST, 0, 1)
    with pytest.raises(ProtocolError) as info:
        d.receive_data(hdr)
    assert isinstance(info.value, BigmrunError)
    assert str(2**32 - 1) in str(info.value)
    assert d.buffered == 0
    # Later bytes of the would-be payload are refused, not buffered.
    with pytest.raises(ProtocolError):
        d.receive_data(b"\x00" * 4096)
    assert d.buffered == 0


def test_oversized_frame_after_valid_frames_in_one_chunk() -> None:
    d = FrameDecoder(max_frame_size=16)
    with pytest.raises(ProtocolError):
        d.receive_data(encode_frame(DATA, 1, b"ok") + header(17, DATA, 0, 1))


@pytest.mark.parametrize("ftype", [0, 9, 42, 255])
def test_unknown_frame_type(ftype: int) -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match=f"unknown frame type {ftype}"):
        d.receive_data(header(0, ftype, 0, 1))
    assert d.buffered == 0


def test_unknown_frame_type_is_refused_before_its_payload() -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError):
        d.receive_data(header(1000, 99, 0, 1))  # payload never sent


@pytest.mark.parametrize("size", [0, 1, 3, 5, 8, 1000])
def test_window_with_wrong_payload_size(size: int) -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="WINDOW"):
        d.receive_data(header(size, WINDOW, 0, 1))  # refused from the header alone
    assert d.buffered == 0


@pytest.mark.parametrize("ftype", ALL_TYPES)
def test_any_frame_after_goaway(ftype: int) -> None:
    d = FrameDecoder()
    payload = struct.pack(">I", 1) if ftype == WINDOW else b""
    assert d.receive_data(encode_frame(GOAWAY, 0)) == [Frame(GOAWAY, 0, 0, b"")]
    with pytest.raises(ProtocolError, match="after GOAWAY"):
        d.receive_data(encode_frame(ftype, 1, payload))


def test_frame_after_goaway_in_the_same_chunk() -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="after GOAWAY"):
        d.receive_data(encode_frame(GOAWAY, 0) + encode_frame(DATA, 1, b"late"))


def test_partial_bytes_after_goaway_are_not_yet_an_error() -> None:
    d = FrameDecoder()
    d.receive_data(encode_frame(GOAWAY, 0))
    assert d.receive_data(b"\x00\x00") == []  # not a header yet
    with pytest.raises(ProtocolError):
        d.receive_data(b"\x00" * 12)


@pytest.mark.parametrize(
    "bad",
    [
        header(10**6, DATA, 0, 1),
        header(0, 0, 0, 1),
        header(2, WINDOW, 0, 1),
        encode_frame(GOAWAY, 0) + encode_frame(CANCEL, 1),
    ],
    ids=["oversized", "unknown-type", "bad-window", "after-goaway"],
)
def test_decoder_refuses_all_input_after_a_protocol_error(bad: bytes) -> None:
    d = FrameDecoder(max_frame_size=1000)
    with pytest.raises(ProtocolError):
        d.receive_data(bad)
    assert d.buffered == 0
    for good in (encode_frame(CANCEL, 1), b"", b"\x00"):
        with pytest.raises(ProtocolError, match="already failed"):
            d.receive_data(good)
    assert d.buffered == 0


# --- properties ------------------------------------------------------------------------

NON_GOAWAY = [t for t in ALL_TYPES if t != GOAWAY]


@st.composite
def frames_strategy(draw: st.DrawFn) -> list[Frame]:
    n = draw(st.integers(0, 12))
    frames = []
    for _ in range(n):
        ftype = draw(st.sampled_from(NON_GOAWAY))
        if ftype == WINDOW:
            payload = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
        else:
            payload = draw(st.binary(max_size=300))
        frames.append(Frame(ftype, draw(st.integers(0, 255)),
                            draw(st.integers(0, MAX_STREAM_ID)), payload))
    if draw(st.booleans()):
        frames.append(Frame(GOAWAY, draw(st.integers(0, 255)),
                            draw(st.integers(0, MAX_STREAM_ID)), draw(st.binary(max_size=20))))
    return frames


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy(), data=st.data())
def test_property_any_resplit_decodes_to_the_same_frames(
        frames: list[Frame], data: st.DataObject) -> None:
    raw = encode(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    d = FrameDecoder()
    out: list[Frame] = []
    prev = 0
    for c in [*cuts, len(raw)]:
        out += d.receive_data(raw[prev:c])
        prev = c
    assert out == frames
    assert d.buffered == 0


SMALL_MAX = 4096

# Pieces of a hostile byte stream: pure noise, well-formed frames, and headers whose
# fields are random but plausible (small lengths, any type), so that the decoder's
# "frames come out" path is exercised as much as its refusals.
_noise = st.binary(max_size=200)
_valid = frames_strategy().map(encode)
_plausible_header = st.builds(
    lambda n, t, fl, sid, body: header(n, t, fl, sid) + body,
    st.integers(0, SMALL_MAX + 10), st.integers(0, 12), st.integers(0, 255),
    st.integers(0, MAX_STREAM_ID), st.binary(max_size=64),
)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.one_of(_noise, _valid, _plausible_header), max_size=12),
       data=st.data())
def test_property_random_bytes_give_frames_or_protocol_error(
        pieces: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    d = FrameDecoder(max_frame_size=SMALL_MAX)
    failed = False
    prev = 0
    for c in [*cuts, len(raw)]:
        chunk, prev = raw[prev:c], c
        try:
            frames = d.receive_data(chunk)
        except ProtocolError:
            failed = True
            assert d.buffered == 0
            continue  # every later call must raise ProtocolError as well
        assert not failed, "a failed decoder accepted input"
        for f in frames:
            assert isinstance(f, Frame) and P.REQUEST <= f.type <= P.GOAWAY
            assert len(f.payload) <= SMALL_MAX
            assert f.type != WINDOW or len(f.payload) == 4
        assert d.buffered <= SMALL_MAX + HEADER_SIZE


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
    ftype=st.integers(0, 255),
    chunk=st.integers(1, 64),
)
def test_property_headers_with_random_lengths_never_overbuffer(
        lengths: list[int], ftype: int, chunk: int) -> None:
    # Valid-looking headers followed by a trickle of payload bytes: the decoder either
    # waits for at most max_frame_size payload bytes or refuses the header outright.
    d = FrameDecoder(max_frame_size=SMALL_MAX)
    stream = b"".join(header(n, ftype, 0, 1) + b"\x00" * min(n, 2 * SMALL_MAX) for n in lengths)
    bad_type = not P.REQUEST <= ftype <= P.GOAWAY
    too_big = any(n > SMALL_MAX for n in lengths)
    bad_window = ftype == WINDOW and any(n != 4 for n in lengths)
    after_goaway = ftype == GOAWAY and len(lengths) > 1
    should_fail = bad_type or too_big or bad_window or after_goaway
    decoded = 0
    try:
        for i in range(0, len(stream), chunk):
            decoded += len(d.receive_data(stream[i : i + chunk]))
            assert d.buffered <= SMALL_MAX + HEADER_SIZE
    except ProtocolError:
        assert d.buffered == 0
        assert should_fail
    else:
        assert not should_fail
        assert decoded == len(lengths)
