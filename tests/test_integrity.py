"""At-most-once replies for retried calls, and end-of-stream integrity checks."""

from __future__ import annotations

from bigmrun.rpc import _protocol as P
from bigmrun.rpc._connection import _check_trailer
from bigmrun.rpc._dedup import Dedup


def test_dedup_runs_once_and_replays_the_reply():
    d = Dedup()
    got: list[tuple[int, bytes]] = []
    assert d.begin("r1", lambda t, p: got.append((t, p))) is True
    # A retry while the first attempt still runs waits for it...
    assert d.begin("r1", lambda t, p: got.append((t, p))) is False
    assert got == []
    d.finish("r1", P.RESPONSE, b"answer")
    assert got == [(P.RESPONSE, b"answer")]
    # ...and a retry after it finished gets the remembered reply without running.
    assert d.begin("r1", lambda t, p: got.append((t, p))) is False
    assert got == [(P.RESPONSE, b"answer")] * 2
    # Another request id runs.
    assert d.begin("r2", lambda t, p: None) is True


def test_dedup_forgets_uncached_and_old_replies():
    now = [0.0]
    d = Dedup(keep=2, ttl=10, clock=lambda: now[0])
    assert d.begin("a", lambda t, p: None)
    d.finish("a", P.ERROR, b"cancelled", cache=False)
    assert d.begin("a", lambda t, p: None) is True  # not remembered: may run afresh
    d.finish("a", P.RESPONSE, b"1")
    for rid in ("b", "c"):
        assert d.begin(rid, lambda t, p: None)
        d.finish(rid, P.RESPONSE, b"x")
    assert d.begin("a", lambda t, p: None) is True  # pushed out (keep=2)
    d.finish("a", P.RESPONSE, b"1")
    now[0] = 11.0
    assert d.begin("c", lambda t, p: None) is True  # expired (ttl=10)


def _end(total: int, crc: int, flags: int = P.FLAG_CRC) -> P.Frame:
    return P.Frame(P.END, flags, 5, P.END_TRAILER.pack(total, crc))


def test_trailer_accepts_a_whole_stream_and_rejects_a_damaged_one():
    import zlib

    parts = [b"abc", b"defg"]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    assert _check_trailer(_end(7, crc), [7, crc, 1]) is None
    lost = _check_trailer(_end(7, crc), [3, zlib.crc32(b"abc"), 1])
    assert lost is not None and "damaged" in str(lost) and "7 bytes" in str(lost)
    flipped = _check_trailer(_end(7, crc), [7, zlib.crc32(b"abcdefh"), 1])
    assert flipped is not None and "damaged" in str(flipped) and "crc32" in str(flipped)
    # Streams are summed only where frames can be dropped or cut (chaos); elsewhere, or
    # when one end did not sum, the total is still checked.
    assert _check_trailer(_end(7, 0, 0), [7, 0, 0]) is None
    assert _check_trailer(_end(7, crc), [7, 0, 0]) is None
    assert _check_trailer(_end(7, 0, 0), [7, crc, 1]) is None
    short = _check_trailer(_end(7, 0, 0), [6, 0, 0])
    assert short is not None and "7 bytes" in str(short) and "crc32" not in str(short)
    bad = _check_trailer(P.Frame(P.END, 0, 5, b""), [0, 0, 0])
    assert bad is not None and "trailer" in str(bad)


def test_streams_are_summed_where_frames_can_be_dropped_or_cut(monkeypatch):
    """The CRC-32 is computed in sessions that allow chaos, on links with faults, and
    for good once a fault was set in the process; the total is checked everywhere."""
    from types import SimpleNamespace

    import bigmrun
    from bigmrun.rpc._connection import FAULTS, checksums
    from bigmrun.rpc._faults import Faults

    monkeypatch.setattr(FAULTS, "checksums", False)
    conn = SimpleNamespace(faults=None)
    assert checksums(conn) == 0
    conn.faults = Faults(drop=0.1)
    assert checksums(conn) == 1
    conn.faults = None
    FAULTS.set("integrity-a", "integrity-b", Faults(truncate=0.5))
    FAULTS.set("integrity-a", "integrity-b", None)
    assert checksums(conn) == 1  # stays on after the fault is lifted
    monkeypatch.setattr(FAULTS, "checksums", False)
    with bigmrun.start("test", chaos=False):
        assert checksums(conn) == 0
    with bigmrun.start("test", chaos=True):
        assert checksums(conn) == 1
