"""The fast call path: threads that read the socket themselves.

On an idle connection a blocking call's own thread reads its reply, and a machine's
worker that answered the only call running reads the next request and runs a plain
``def`` call itself (``ClientConnection.read_reply_here``, ``ServerConnection._next_here``).
Everything else such a thread reads goes to the event loop, in order, and the loop
reads from then on. These tests mix every kind of traffic into that path and check
that nothing is lost, reordered or left unread; they run on both systems (real TLS
connections either way).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import signal
import threading
import uuid
from typing import Any

import pytest
import services as S
from conftest import wait_until

import bigmrun
from bigmrun import State

pytestmark = pytest.mark.timeout(120)

PROMPT = 10.0


def running(b: bigmrun.B, **services: Any) -> bigmrun.Machine:
    (m,) = b.start(1, services=services)
    assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
    return m


def token() -> str:
    return uuid.uuid4().hex


def test_every_kind_of_call_follows_a_plain_call(b: bigmrun.B) -> None:
    """After each plain call the machine's worker (and the caller) read the next
    frames themselves; whatever kind of call comes next must still be served."""
    m = running(b, E=S.Echo(), G=S.Gen(), F=S.Files(), C=S.Counter())
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    for i in range(15):
        assert m.call("E.combine", i, 1) == i + 1  # plain: read by the worker
        assert m.call("E.acombine", i, 2) == i + 2  # async def: handed to the loop
        assert m.call("E.combine", i, 3, scale=2) == 2 * (i + 3)
        assert list(m.call("G.count", 5)) == [0, 1, 2, 3, 4]  # a streamed reply
        assert m.call("E.combine", 1, i) == i + 1
        assert m.call("F.sha256", io.BytesIO(data)) == (digest, len(data))  # streamed arg
        assert m.call("C.add", 1) == i + 1
        assert m.retry_call("E.combine", i, 4) == i + 4  # a request id: dedup on the loop
        with pytest.raises(bigmrun.RemoteError, match="boom"):
            m.call("E.fail", "boom")
        with pytest.raises(bigmrun.BigmrunError, match="nosuch"):
            m.call("E.nosuch")
        assert m.call("E.combine", i, 5, timeout=30) == i + 5  # a timeout: loop path
    assert m.state == State.RUNNING


def test_a_call_run_by_the_worker_that_read_it_can_be_cancelled(b: bigmrun.B) -> None:
    m = running(b, Z=S.Sleeper())
    for _ in range(3):
        assert m.call("Z.nap", 0) == 0  # the worker now reads the next request itself
        tok = token()
        f = m.submit("Z.wait_cancel", tok, 60)
        wait_until(lambda tok=tok: m.call("Z.status", tok) == "running", PROMPT,
                   what="the call to start")
        assert f.cancel()
        wait_until(lambda tok=tok: m.call("Z.status", tok) == "cancelled", PROMPT,
                   what="the machine to see the cancellation")


def test_calls_from_many_threads_while_one_reads_its_own_replies(b: bigmrun.B) -> None:
    """One thread makes blocking calls one at a time (each may read its own reply);
    others submit and call at once, so their replies reach whichever thread holds
    the reading and must be handed on."""
    m = running(b, E=S.Echo(), Z=S.Sleeper())
    errors: list[BaseException] = []

    def blocking(k: int) -> None:
        try:
            for i in range(150):
                assert m.call("E.combine", k, i) == k + i
                if i % 50 == 0:
                    assert m.call("Z.nap", 0.05) == 0.05  # a reply that takes a while
        except BaseException as e:
            errors.append(e)

    def submitting(k: int) -> None:
        try:
            for i in range(0, 150, 10):
                fs = [m.submit("E.combine", k, j) for j in range(i, i + 10)]
                assert [f.result(60) for f in fs] == [k + j for j in range(i, i + 10)]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=blocking, args=(k,)) for k in (0, 1000, 2000)]
    threads += [threading.Thread(target=submitting, args=(k,)) for k in (3000, 4000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not any(t.is_alive() for t in threads), "a caller never got its reply"
    assert errors == []
    assert m.call("E.combine", 2, 2) == 4


class Interrupted(Exception):
    """Raised by the test's SIGINT handler in place of KeyboardInterrupt."""


def test_an_interrupted_call_is_cancelled_and_the_connection_stays_usable(
        b: bigmrun.B) -> None:
    """A signal arrives while the caller waits in the socket for its reply: the call is
    given up and cancelled on the machine, and reading goes back to the loop."""
    m = running(b, Z=S.Sleeper(), E=S.Echo())
    assert m.call("E.combine", 1, 1) == 2
    tok = token()

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    def interrupt_when_running() -> None:
        wait_until(lambda: m.call("Z.status", tok) == "running", PROMPT,
                   what="the call to start")
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, handler)
    try:
        t = threading.Thread(target=interrupt_when_running, daemon=True)
        t.start()
        with pytest.raises(Interrupted):
            m.call("Z.wait_cancel", tok, 60)
        t.join(PROMPT)
    finally:
        signal.signal(signal.SIGINT, old)
    wait_until(lambda: m.call("Z.status", tok) == "cancelled", PROMPT,
               what="the machine to see the cancellation")
    for i in range(20):  # the connection is read again, by the loop or a caller
        assert m.call("E.combine", i, i) == 2 * i
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: m.call("E.combine", i, 1), range(40))) == [
            i + 1 for i in range(40)]
