"""Credit-based flow control and streamed arguments (``bigmrun.rpc._streams``).

Producer and consumer run in real threads where the behaviour is about blocking; the
tests synchronise on conditions and events, never on sleeps, and assert no timings.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

import bigmrun
from bigmrun.errors import BigmrunError, CallCancelledError, NetworkError, RemoteError
from bigmrun.rpc import _streams as S
from bigmrun.rpc._streams import (
    CHUNK,
    WINDOW,
    Credit,
    Inbox,
    ItemInbox,
    StreamReader,
    asend_with_credit,
    send_with_credit,
)

pytestmark = pytest.mark.timeout(60)


class CreditSpy:
    """Records every ``send_credit(n)`` an inbox makes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)

    @property
    def total(self) -> int:
        return sum(self.calls)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a daemon thread; its result or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as e:
            out.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def still_blocked(t: threading.Thread) -> bool:
    """True if ``t`` has not finished (it is waiting): checked, not timed."""
    t.join(0.05)
    return t.is_alive()


# --- Credit ----------------------------------------------------------------------------


def test_take_never_exceeds_the_credit() -> None:
    c = Credit(10)
    assert c.take(4) == 4
    assert c.take(100) == 6  # only what is left
    c.grant(3)
    assert c.take(2) == 2
    assert c.take(2) == 1


def test_default_credit_is_one_window() -> None:
    c = Credit()
    assert c.take(10 * WINDOW) == WINDOW


def test_take_blocks_until_granted() -> None:
    c = Credit(0)
    t, out = in_thread(lambda: c.take(100))
    assert still_blocked(t)
    assert out == []
    c.grant(30)
    t.join(10)
    assert out == [("ok", 30)]


def test_close_wakes_a_blocked_taker_with_the_error() -> None:
    c = Credit(0)
    t, out = in_thread(lambda: c.take(1))
    assert still_blocked(t)
    err = CallCancelledError("stopped")
    c.close(err)
    t.join(10)
    assert out == [("err", err)]
    with pytest.raises(CallCancelledError):
        c.take(1)
    c.close(NetworkError("later"))  # the first reason sticks
    with pytest.raises(CallCancelledError):
        c.take(1)


def test_closed_credit_refuses_even_when_credit_is_available() -> None:
    c = Credit(100)
    c.close(NetworkError("gone"))
    with pytest.raises(NetworkError):
        c.take(1)


def test_atake_waits_for_a_grant_from_another_thread() -> None:
    async def main() -> int:
        c = Credit(0)
        task = asyncio.get_running_loop().create_task(c.atake(50))
        await asyncio.sleep(0)
        assert not task.done()
        threading.Thread(target=c.grant, args=(20,)).start()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == 20


def test_atake_raises_when_closed() -> None:
    async def main() -> None:
        c = Credit(0)
        task = asyncio.get_running_loop().create_task(c.atake(50))
        await asyncio.sleep(0)
        c.close(CallCancelledError("x"))
        with pytest.raises(CallCancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_sender_never_sends_more_than_granted() -> None:
    credit = Credit(0)
    data = bytes(range(256)) * 40  # 10240 bytes
    sent: list[tuple[bytes, bool]] = []
    cond = threading.Condition()
    granted = 0
    violations: list[str] = []

    def send(part: bytes, more: bool) -> None:
        with cond:
            sent.append((part, more))
            total = sum(len(p) for p, _ in sent)
            if total > granted:
                violations.append(f"sent {total} with only {granted} granted")
            cond.notify_all()

    t, out = in_thread(lambda: send_with_credit(credit, data, send, chunk=1000))
    def sent_at_least(n: int) -> Callable[[], bool]:
        return lambda: sum(len(p) for p, _ in sent) >= n

    for step in (1, 999, 1500, 7, 5000, 10_000):
        with cond:
            granted += step
        credit.grant(step)
        with cond:
            assert cond.wait_for(sent_at_least(min(granted, len(data))), 10)
    t.join(10)
    assert out == [("ok", None)]
    assert violations == []
    assert b"".join(p for p, _ in sent) == data
    assert all(len(p) <= 1000 for p, _ in sent)
    assert [m for _, m in sent] == [True] * (len(sent) - 1) + [False]


def test_send_with_credit_of_empty_data_sends_one_final_part() -> None:
    sent: list[tuple[bytes, bool]] = []
    send_with_credit(Credit(0), b"", lambda p, m: sent.append((p, m)))
    assert sent == [(b"", False)]


def test_asend_with_credit_respects_the_credit() -> None:
    async def main() -> list[tuple[bytes, bool]]:
        credit = Credit(5)
        sent: list[tuple[bytes, bool]] = []
        task = asyncio.get_running_loop().create_task(
            asend_with_credit(credit, b"0123456789abc", lambda p, m: sent.append((p, m)),
                              chunk=4))
        for _ in range(5):
            await asyncio.sleep(0)
        assert sum(len(p) for p, _ in sent) == 5  # stuck at the credit
        assert not task.done()
        credit.grant(100)
        await asyncio.wait_for(task, 10)
        return sent

    sent = asyncio.run(main())
    assert b"".join(p for p, _ in sent) == b"0123456789abc"
    assert [len(p) for p, _ in sent] == [4, 1, 4, 4]
    assert [m for _, m in sent] == [True, True, True, False]


def test_sender_stops_when_credit_is_closed() -> None:
    credit = Credit(3)
    sent: list[bytes] = []
    t, out = in_thread(lambda: send_with_credit(credit, b"x" * 10,
                                                lambda p, m: sent.append(p)))
    assert still_blocked(t)
    credit.close(CallCancelledError("cancelled"))
    t.join(10)
    assert out and out[0][0] == "err" and isinstance(out[0][1], CallCancelledError)
    assert b"".join(sent) == b"xxx"


# --- Inbox -----------------------------------------------------------------------------


def test_inbox_returns_credit_only_as_the_consumer_reads() -> None:
    spy = CreditSpy()
    inbox = Inbox(spy)
    n = 2 * WINDOW // CHUNK
    for _ in range(n):
        inbox.put(bytes(CHUNK))
    assert spy.calls == []  # receiving is not consuming
    consumed = 0
    for _ in range(n):
        assert len(inbox.get() or b"") == CHUNK
        consumed += CHUNK
        # Credit is batched (half a window) and never exceeds what was consumed.
        assert spy.total <= consumed
        assert consumed - spy.total < WINDOW // 2
    assert spy.total == 2 * WINDOW
    assert all(c >= WINDOW // 2 for c in spy.calls)


def test_inbox_small_reads_are_batched() -> None:
    spy = CreditSpy()
    inbox = Inbox(spy)
    for _ in range(10):
        inbox.put(b"abc")
    for _ in range(10):
        inbox.get()
    assert spy.calls == []  # 30 bytes: far below half a window


def test_inbox_credit_override_and_push_back_are_not_double_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "WINDOW", 20)  # a threshold of 10 bytes
    spy = CreditSpy()
    inbox = Inbox(spy)
    inbox.put(b"0123456789ab")  # 12 bytes
    chunk = inbox.get()
    assert chunk == b"0123456789ab"
    assert spy.calls == [12]
    inbox.push_back(b"89ab")  # the reader used only 8: the rest is already counted
    assert inbox.get() == b"89ab"
    assert spy.calls == [12]
    inbox.put(b"xyz", credit=0)  # a part whose credit was already returned
    inbox.put(b"0123456789", credit=10)
    assert inbox.get() == b"xyz"
    assert spy.calls == [12]
    assert inbox.get() == b"0123456789"
    assert spy.calls == [12, 10]


def test_inbox_get_blocks_until_data_or_end() -> None:
    inbox = Inbox(CreditSpy())
    t, out = in_thread(inbox.get)
    assert still_blocked(t)
    inbox.put(b"late")
    t.join(10)
    assert out == [("ok", b"late")]
    t, out = in_thread(inbox.get)
    assert still_blocked(t)
    inbox.finish()
    t.join(10)
    assert out == [("ok", None)]


def test_inbox_delivers_buffered_chunks_before_the_error() -> None:
    inbox = Inbox(CreditSpy())
    inbox.put(b"a")
    inbox.put(b"b")
    err = NetworkError("connection lost")
    inbox.finish(err)
    inbox.put(b"ignored after finish")
    inbox.finish(None)  # the first finish wins
    assert inbox.get() == b"a"
    assert inbox.get() == b"b"
    with pytest.raises(NetworkError) as info:
        inbox.get()
    assert info.value is err
    with pytest.raises(NetworkError):
        inbox.get()


def test_inbox_aget() -> None:
    async def main() -> list[bytes | None]:
        inbox = Inbox(CreditSpy())
        got: list[bytes | None] = []
        task = asyncio.get_running_loop().create_task(inbox.aget())
        await asyncio.sleep(0)
        assert not task.done()
        threading.Thread(target=inbox.put, args=(b"from a thread",)).start()
        got.append(await asyncio.wait_for(task, 10))
        inbox.finish()
        got.append(await inbox.aget())
        return got

    assert asyncio.run(main()) == [b"from a thread", None]


def test_inbox_aget_raises_the_error() -> None:
    async def main() -> None:
        inbox = Inbox(CreditSpy())
        inbox.finish(CallCancelledError("stream was cancelled"))
        with pytest.raises(CallCancelledError):
            await inbox.aget()

    asyncio.run(main())


# --- ItemInbox ---------------------------------------------------------------------------


def test_item_inbox_reassembles_parts_and_returns_their_credit_at_once() -> None:
    spy = CreditSpy()
    inbox = ItemInbox(spy)
    inbox.put_part(b"he", more=True)
    inbox.put_part(b"ll", more=True)
    assert spy.calls == [2, 2]  # parts of an unfinished item do not hold the window
    inbox.put_part(b"o", more=False)
    inbox.put_part(b"world", more=False)
    assert spy.calls == [2, 2]
    assert inbox.get() == b"hello"
    assert inbox.get() == b"world"
    inbox.finish()
    assert inbox.get() is None


def test_item_inbox_item_larger_than_the_window_cannot_stall(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "WINDOW", 8)
    spy = CreditSpy()
    inbox = ItemInbox(spy)
    for _ in range(5):
        inbox.put_part(b"1234", more=True)  # 20 bytes pending, window is 8
    assert spy.total == 20
    inbox.put_part(b"!", more=False)
    assert inbox.get() == b"1234" * 5 + b"!"


# --- StreamReader ------------------------------------------------------------------------


def reader_with(*chunks: bytes, error: BaseException | None = None) -> StreamReader:
    inbox = Inbox(CreditSpy())
    for c in chunks:
        inbox.put(c)
    inbox.finish(error)
    return StreamReader(inbox)


def test_read_n_returns_at_most_n_and_short_reads_at_chunk_boundaries() -> None:
    r = reader_with(b"0123456789", b"abc")
    assert r.readable()
    assert r.read(4) == b"0123"
    assert r.read(100) == b"456789"  # short: the rest of the chunk, not the next one
    assert r.read(2) == b"ab"
    assert r.read(2) == b"c"
    assert r.read(2) == b""  # EOF
    assert r.read(2) == b""  # and stays at EOF


def test_read_zero_and_read_all() -> None:
    r = reader_with(b"ab", b"cd", b"ef")
    assert r.read(0) == b""
    assert r.read(1) == b"a"
    assert r.read() == b"bcdef"
    assert r.read() == b""

    assert reader_with(b"xy", b"z").read(-1) == b"xyz"
    assert reader_with(b"xy", b"z").read(None) == b"xyz"
    assert reader_with(b"xy", b"z").readall() == b"xyz"
    assert reader_with().readall() == b""


def test_readinto_and_iteration() -> None:
    r = reader_with(b"hello", b"world")
    buf = bytearray(3)
    assert r.readinto(buf) == 3 and buf == bytearray(b"hel")
    assert list(r) == [b"lo", b"world"]
    buf = bytearray(3)
    assert r.readinto(buf) == 0


def test_reader_works_with_io_helpers() -> None:
    import io
    import shutil

    out = io.BytesIO()
    shutil.copyfileobj(reader_with(b"a" * 5, b"b" * 5), out)
    assert out.getvalue() == b"aaaaabbbbb"
    buffered = io.BufferedReader(reader_with(b"line1\nli", b"ne2\n"))
    assert buffered.readlines() == [b"line1\n", b"line2\n"]


def test_error_propagates_after_the_data() -> None:
    err = NetworkError("connection to driver lost")
    r = reader_with(b"part", error=err)
    assert r.read(10) == b"part"
    with pytest.raises(NetworkError) as info:
        r.read(10)
    assert info.value is err


def test_readall_raises_the_error() -> None:
    r = reader_with(b"a", b"b", error=CallCancelledError("stream was cancelled"))
    with pytest.raises(CallCancelledError):
        r.readall()


def test_read_blocks_until_the_producer_delivers() -> None:
    inbox = Inbox(CreditSpy())
    r = StreamReader(inbox)
    t, out = in_thread(lambda: r.read(10))
    assert still_blocked(t)
    inbox.put(b"data")
    t.join(10)
    assert out == [("ok", b"data")]


def test_reader_returns_credit_as_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "WINDOW", 32)  # credit goes back in batches of 16 bytes
    spy = CreditSpy()
    inbox = Inbox(spy)
    for _ in range(4):
        inbox.put(b"x" * 8)
    inbox.finish()
    r = StreamReader(inbox)
    assert spy.calls == []
    assert r.read(3) == b"xxx"  # takes the first chunk: 8 bytes consumed
    assert spy.calls == []
    assert r.read(100) == b"xxxxx"  # its pushed-back tail: not counted again
    assert spy.calls == []
    assert r.read(100) == b"x" * 8  # second chunk: 16 consumed, one batch returned
    assert spy.calls == [16]
    assert r.readall() == b"x" * 16
    assert spy.calls == [16, 16]


def test_blocking_read_on_the_loop_thread_raises_a_clear_error() -> None:
    r = StreamReader(Inbox(CreditSpy()), loop_thread=threading.get_ident())
    for op in (lambda: r.read(1), r.readall, lambda: r.read(-1)):
        with pytest.raises(BigmrunError, match="aread"):
            op()


def test_blocking_read_from_another_thread_is_allowed() -> None:
    inbox = Inbox(CreditSpy())
    inbox.put(b"ok")
    r = StreamReader(inbox, loop_thread=threading.get_ident())
    t, out = in_thread(lambda: r.read(10))
    t.join(10)
    assert out == [("ok", b"ok")]


def test_aread() -> None:
    async def main() -> list[bytes]:
        inbox = Inbox(CreditSpy())
        r = StreamReader(inbox, loop_thread=threading.get_ident())
        inbox.put(b"0123456789")
        inbox.finish()
        return [await r.aread(4), await r.aread(), await r.aread(0), await r.aread()]

    assert asyncio.run(main()) == [b"0123", b"456789", b"", b""]


# --- through the RPC layer (the in-process test system) ---------------------------------


class Reader:
    async def blocking_read_in_async(self, f: Any) -> bytes:
        return bytes(f.read(10))

    async def aread_all(self, f: Any) -> int:
        n = 0
        while True:
            chunk = await f.aread(1 << 16)
            if not chunk:
                return n
            n += len(chunk)

    def read_all(self, f: Any) -> int:
        return len(f.read())


def test_streamed_argument_through_the_test_system() -> None:
    with bigmrun.start("test") as b:
        (m,) = b.start(1, services={"R": Reader()})
        assert m.wait(bigmrun.State.RUNNING, timeout=30) == bigmrun.State.RUNNING
        data = iter([b"a" * 1000, b"b" * (3 * CHUNK), b"c"])
        assert m.call("R.read_all", data, timeout=30) == 1001 + 3 * CHUNK
        assert m.call("R.aread_all", iter([b"xyz"] * 100), timeout=30) == 300
        with pytest.raises(RemoteError) as info:
            m.call("R.blocking_read_in_async", iter([b"zz"]), timeout=30)
        assert "aread" in info.value.message
        assert "BigmrunError" in info.value.type_name
        # The machine keeps serving.
        assert m.call("R.read_all", iter([b"q"]), timeout=30) == 1


class Items:
    """Generators of items of every kind a raw-bytes fast path could confuse."""

    def mixed(self) -> Any:
        yield b""
        yield b"raw"
        yield bytearray(b"pickled: a bytearray stays one")
        yield Tagged(b"a bytes subclass keeps its type")
        yield b"\x80\x05pickle-looking raw bytes"
        yield b"x" * (3 * CHUNK + 7)  # several DATA frames, the last one flagged raw
        yield {"k": b"v"}

    async def amixed(self) -> Any:
        for item in self.mixed():
            yield item


class Tagged(bytes):
    pass


EXPECTED = [b"", b"raw", bytearray(b"pickled: a bytearray stays one"),
            Tagged(b"a bytes subclass keeps its type"), b"\x80\x05pickle-looking raw bytes",
            b"x" * (3 * CHUNK + 7), {"k": b"v"}]


@pytest.mark.parametrize("system", ["test", "local"])
def test_bytes_items_travel_raw_and_every_other_item_as_a_pickle(system: str) -> None:
    with bigmrun.start(system) as b:
        (m,) = b.start(1, services={"I": Items()})
        assert m.wait(bigmrun.State.RUNNING, timeout=60) == bigmrun.State.RUNNING, m.err
        for method in ("I.mixed", "I.amixed"):
            got = list(m.call(method, timeout=60))
            assert got == EXPECTED
            assert [type(x) for x in got] == [type(x) for x in EXPECTED]


def test_item_inbox_marks_raw_items() -> None:
    spy = CreditSpy()
    inbox = S.ItemInbox(spy)
    inbox.put_part(b"ab", True)
    inbox.put_part(b"cd", False, True)
    inbox.put_part(b"\x80pickle", False)
    raw = inbox.get()
    assert isinstance(raw, S.RawItem) and raw.data == b"abcd"
    assert inbox.get() == b"\x80pickle"


def test_send_with_credit_flags_only_the_last_part_of_a_raw_item() -> None:
    sent: list[tuple[Any, ...]] = []
    credit = S.Credit()
    S.send_with_credit(credit, b"z" * 10, lambda *a: sent.append(a), chunk=4, raw=True)
    assert sent == [(b"zzzz", True), (b"zzzz", True), (b"zz", False, True)]
