"""The cross-system conformance suite: every test runs on the test AND local systems.

It covers issue 2's numbered points (machines, services, calls, streaming, errors,
machine-to-machine calls) and each bad input, through the public API only (a few
assertions look at documented attributes such as ``RemoteError.remote_traceback``).
Waiting is done by polling a condition with a deadline, never by sleeping blindly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import os
import socket
import threading
import time
import uuid
from typing import Any

import psutil
import pytest
import services as S
from conftest import wait_until

import bigmrun
from bigmrun import State

pytestmark = pytest.mark.timeout(90)

#: A generous bound for "at once" / "promptly": far above the real figure (ms), far
#: below anything that would mean "it waited for a timeout".
PROMPT = 5.0


def running(b: bigmrun.B, n: int = 1, **services: Any) -> list[bigmrun.Machine]:
    ms = b.start(n, services=services)
    for m in ms:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
        assert m.err is None
    return ms


def token() -> str:
    return uuid.uuid4().hex


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- 3. machines ---------------------------------------------------------------------------

def test_start_returns_n_machines_at_once_then_they_run(b: bigmrun.B) -> None:
    ms = b.start(3, services={"C": S.Counter()})
    assert len(ms) == 3
    # Returned at once: already STARTING (or even RUNNING), never UNSTARTED or STOPPED.
    for m in ms:
        assert m.state in (State.STARTING, State.RUNNING)
        assert m.owned is True
    assert len({m.name for m in ms}) == 3
    for m in ms:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING
        assert m.state == State.RUNNING
        assert m.err is None
        assert m.call("C.add", 1) == 1  # each machine has its own copy
    assert b.machines() == ms


def test_machine_attributes(b: bigmrun.B) -> None:
    m0, m1 = running(b, 2, E=S.Echo())
    for m in (m0, m1):
        host, _, port = m.addr.rpartition(":")
        assert host == "127.0.0.1"
        assert port.isdigit() and 0 < int(port) < 65536
        assert m.maxprocs == len(os.sched_getaffinity(0))
        assert m.name in repr(m)
    assert m0.addr != m1.addr
    assert m0.name != m1.name and m0.name.startswith("m") and m1.name.startswith("m")
    assert b.is_driver is True
    # Inside a service, current() is the machine's own B, named like the machine.
    assert m0.call("E.info") == {"name": m0.name, "is_driver": False}
    assert m1.call("E.info") == {"name": m1.name, "is_driver": False}


def test_machine_stats(b: bigmrun.B) -> None:
    (m,) = running(b)
    mem = m.mem_info()
    assert mem["process"]["rss"] > 0 and mem["system"]["total"] >= mem["process"]["rss"]
    disk = m.disk_info()
    assert disk["usage"]["total"] > 0 and os.path.isdir(disk["path"])
    load = m.load_info()
    assert load["cpus"] == m.maxprocs and load["load1"] >= 0


def test_states_only_move_forward(b: bigmrun.B) -> None:
    seen: list[State] = []
    stop = threading.Event()
    (m,) = b.start(1, services={"C": S.Counter()})

    def watch() -> None:
        while not stop.is_set():
            seen.append(m.state)
            if m.state == State.STOPPED:
                return
            time.sleep(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING
        assert m.call("C.add", 2) == 2
        # A call takes well under a millisecond: let the watcher (polling every 0.5 ms,
        # when it gets the GIL) see RUNNING before the machine moves on.
        wait_until(lambda: State.RUNNING in seen, timeout=PROMPT)
        m.cancel()
        assert m.wait(State.STOPPED, timeout=PROMPT) == State.STOPPED
    finally:
        t.join(PROMPT)
        stop.set()
    assert seen == sorted(seen), f"state went backwards: {seen}"
    assert seen[-1] == State.STOPPED
    assert State.RUNNING in seen
    # Once STOPPED, the machine stays STOPPED (and wait returns at once).
    assert m.wait(State.RUNNING, timeout=0) == State.STOPPED
    assert m.state == State.STOPPED
    assert State.UNSTARTED < State.STARTING < State.RUNNING < State.STOPPED


def test_wait_with_timeout_returns_current_state(b: bigmrun.B) -> None:
    (m,) = running(b)
    t0 = time.monotonic()
    assert m.wait(State.STOPPED, timeout=0.2) == State.RUNNING
    assert time.monotonic() - t0 < PROMPT


def test_dial_by_address_is_not_owned(b: bigmrun.B) -> None:
    (m,) = running(b, C=S.Counter())
    assert m.call("C.add", 5) == 5
    d = b.dial(m.addr)
    assert d.owned is False
    assert d.addr == m.addr
    assert d.state == State.RUNNING
    assert d.maxprocs == m.maxprocs
    assert d in b.machines() and m in b.machines()
    # The same machine, the same service state.
    assert d.call("C.add", 1) == 6
    assert m.call("C.get") == 6
    # Shutting down stops what this B owns; the dialed handle is closed with it.
    b.shutdown()
    assert m.state == State.STOPPED and m.err is None
    assert d.state == State.STOPPED


def test_dial_bad_addresses(b: bigmrun.B) -> None:
    with pytest.raises(bigmrun.ConfigError, match="host:port"):
        b.dial("no-port-here")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(bigmrun.NetworkError):
        b.dial(f"127.0.0.1:{port}", timeout=30)


def test_shutdown_stops_owned_machines_and_is_idempotent(b: bigmrun.B) -> None:
    ms = running(b, 2, E=S.Echo())
    pids = [m.call("E.pid") for m in ms]
    b.shutdown()
    for m in ms:
        assert m.state == State.STOPPED
        assert m.err is None  # a clean shutdown is not an error
    if b.system.name == "local":
        for pid in pids:
            wait_until(lambda pid=pid: process_gone(pid), PROMPT, what=f"pid {pid} to end")
    # A call to a stopped machine fails at once, as "machine lost".
    t0 = time.monotonic()
    with pytest.raises(bigmrun.MachineLostError, match=ms[0].name):
        ms[0].call("E.pid")
    assert time.monotonic() - t0 < PROMPT
    b.shutdown()  # idempotent
    with pytest.raises(bigmrun.ConfigError):
        b.start(1)


def test_with_block_shuts_down(system: str) -> None:
    with bigmrun.start(system, keepalive_timeout=5) as b:
        assert isinstance(b, bigmrun.B)
        (m,) = running(b, E=S.Echo())
        assert m.call("E.combine", 1, 2) == 3
    assert m.state == State.STOPPED
    with pytest.raises(bigmrun.MachineLostError):
        m.call("E.combine", 1, 2)


def test_machine_cancel_stops_it_and_fails_pending_calls(b: bigmrun.B) -> None:
    m, other = running(b, 2, Z=S.Sleeper(), E=S.Echo())
    pid = m.call("E.pid")
    tok = token()
    fut = m.submit("Z.wait_cancel", tok, 60)
    wait_until(lambda: m.call("Z.status", tok) == "running", what="call to start")
    t0 = time.monotonic()
    m.cancel()
    with pytest.raises(bigmrun.MachineLostError) as ei:
        fut.result(timeout=PROMPT)
    assert time.monotonic() - t0 < PROMPT
    assert m.name in str(ei.value)
    assert m.wait(State.STOPPED, timeout=PROMPT) == State.STOPPED
    assert isinstance(m.err, bigmrun.CallCancelledError)
    with pytest.raises(bigmrun.MachineLostError):
        m.call("E.pid")
    if b.system.name == "local":
        wait_until(lambda: process_gone(pid), PROMPT, what="cancelled machine's process to end")
    # The rest of the cluster is unaffected.
    assert other.state == State.RUNNING
    assert other.call("E.combine", 2, 3) == 5


# --- bad input to start ------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -1, "x", 1.5, True, "2"])
def test_start_bad_n(b: bigmrun.B, n: Any) -> None:
    with pytest.raises(bigmrun.ConfigError) as ei:
        b.start(n, services={"C": S.Counter()})
    assert isinstance(ei.value, bigmrun.BigmrunError)
    assert "n must" in str(ei.value)
    assert b.machines() == []
    # The session stays usable.
    (m,) = running(b, C=S.Counter())
    assert m.call("C.add", 1) == 1


def test_start_bad_service_names(b: bigmrun.B) -> None:
    with pytest.raises(bigmrun.ConfigError, match="identifier"):
        b.start(1, services={"not a name": S.Counter()})
    with pytest.raises(bigmrun.ConfigError, match="reserved"):
        b.start(1, services={"Supervisor": S.Counter()})
    assert b.machines() == []


def test_start_default_n_comes_from_the_launcher(b: bigmrun.B,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIGMRUN_NMACH", raising=False)
    assert len(b.start(services={"C": S.Counter()})) == 1
    monkeypatch.setenv("BIGMRUN_NMACH", "2")
    ms = b.start(services={"C": S.Counter()})
    assert len(ms) == 2
    monkeypatch.setenv("BIGMRUN_NMACH", "two")
    with pytest.raises(bigmrun.ConfigError, match="BIGMRUN_NMACH"):
        b.start()
    for m in ms:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING


def test_machine_crash_fails_pending_calls_as_lost(b: bigmrun.B) -> None:
    """A machine that dies (the test system's kill(), SIGKILL on local) is STOPPED at
    once and its pending calls fail with MachineLostError carrying the cause."""
    m, other = running(b, 2, Z=S.Sleeper(), E=S.Echo())
    pid = m.call("E.pid")
    tok = token()
    fut = m.submit("Z.wait_cancel", tok, 60)
    wait_until(lambda: m.call("Z.status", tok) == "running", what="the call to start")
    t0 = time.monotonic()
    if b.system.name == "test":
        b.system.kill(m)  # type: ignore[attr-defined]
    else:
        os.kill(pid, 9)
    with pytest.raises(bigmrun.MachineLostError) as ei:
        fut.result(timeout=PROMPT)
    assert m.wait(State.STOPPED, timeout=PROMPT) == State.STOPPED
    assert time.monotonic() - t0 < PROMPT
    assert isinstance(m.err, bigmrun.MachineLostError)
    assert ei.value.__cause__ is m.err
    with pytest.raises(bigmrun.MachineLostError):
        m.call("E.pid")
    assert other.call("E.combine", 4, 4) == 8


def test_unknown_system() -> None:
    with pytest.raises(bigmrun.ConfigError, match="unknown system 'nope'"):
        bigmrun.start("nope")


def test_unpicklable_service_fails_at_start_naming_it(b: bigmrun.B) -> None:
    with pytest.raises(bigmrun.SerializationError) as ei:
        b.start(1, services={"Good": S.Counter(), "Broken": S.UnpicklableService()})
    msg = str(ei.value)
    assert "'Broken'" in msg and "UnpicklableService" in msg
    assert "'Good'" not in msg
    assert b.machines() == []
    (m,) = running(b, C=S.Counter())
    assert m.call("C.add", 3) == 3


# --- 4. services -------------------------------------------------------------------------

def test_services_are_shipped_by_value(b: bigmrun.B) -> None:
    c = S.Counter(10)
    m0, m1 = running(b, 2, C=c)
    assert m0.call("C.add", 5) == 15
    assert m0.call("C.add", 5) == 20
    assert m1.call("C.get") == 10  # each machine has its own copy
    assert c.n == 10  # the driver's object never changed
    c.n = 1000  # ...and changing it does not reach the machines
    assert m0.call("C.get") == 20


def test_init_runs_once_on_the_machine_with_current(b: bigmrun.B) -> None:
    w = S.WhoAmI()
    m0, m1 = running(b, 2, W=w, C=S.Counter())
    for m in (m0, m1):
        r = m.call("W.report")
        assert r["inits"] == 1
        assert r["name"] == m.name and r["current_name"] == m.name
        assert r["is_driver"] is False
        assert r["current_is_b"] is True
    assert m0.call("W.report")["inits"] == 1  # not re-run by later calls
    assert w.inits == 0  # never ran on the driver's copy
    if b.system.name == "local":
        assert m0.call("W.report")["pid"] != os.getpid()


def test_current_outside_a_machine_raises() -> None:
    with pytest.raises(bigmrun.BigmrunError, match="only available on a machine"):
        bigmrun.current()
    assert bigmrun.cancelled() is False


def test_positional_and_keyword_arguments(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    assert m.call("E.combine", 1, 2) == 3
    assert m.call("E.combine", 1, b=2, scale=10) == 30
    assert m.call("E.combine", a=1, b=2, scale=2, offset=1) == 7
    assert m.call("E.acombine", 2, 3, scale=4) == 20
    args, kwargs = m.call("E.echo", 1, "two", [3], {"four": 4}, x=None, y=b"bytes")
    assert args == (1, "two", [3], {"four": 4})
    assert kwargs == {"x": None, "y": b"bytes"}
    # Arguments may be any picklable value, including ones only dill can encode.
    args, _ = m.call("E.echo", S.CustomError("as a value"), frozenset({1, 2}))
    assert isinstance(args[0], S.CustomError) and args[0].args == ("as a value",)
    args, _ = m.call("E.echo", lambda x: x + 1)
    assert args[0](1) == 2


def test_blocking_methods_run_in_threads_async_methods_on_the_loop(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    sync = m.call("E.where")
    assert sync["thread"].startswith("bigmrun-")
    assert sync["thread"] != "bigmrun-io"
    asy = m.call("E.awhere")
    assert asy["thread"] == "bigmrun-io"
    if b.system.name == "local":
        assert sync["pid"] == asy["pid"] != os.getpid()
    else:
        assert sync["pid"] == asy["pid"] == os.getpid()


def test_concurrent_calls_run_concurrently(b: bigmrun.B) -> None:
    (m,) = running(b, Y=S.Sync(2), A=S.Sync(3))
    # Each call waits at a barrier for the other: both return only if they overlap.
    f1 = m.submit("Y.meet", 20)
    f2 = m.submit("Y.meet", 20)
    names = {f1.result(timeout=30), f2.result(timeout=30)}
    assert len(names) == 2  # two different worker threads
    # The same for async methods on the machine's event loop.
    fs = [m.submit("A.ameet", 20) for _ in range(3)]
    assert sorted(f.result(timeout=30) for f in fs) == [3, 3, 3]


def test_many_calls_in_flight(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    fs = [m.submit("E.combine", i, i) for i in range(200)]
    assert [f.result(timeout=60) for f in fs] == [2 * i for i in range(200)]


# --- 5. calls ------------------------------------------------------------------------------

def test_call_submit_acall(b: bigmrun.B) -> None:
    (m,) = running(b, C=S.Counter())
    assert m.call("C.add", 1) == 1
    f = m.submit("C.add", 2)
    assert isinstance(f, concurrent.futures.Future)
    assert f.result(timeout=30) == 3

    async def main() -> list[int]:
        one = await m.acall("C.add", 3)
        more = await asyncio.gather(*(m.acall("C.add", 1) for _ in range(5)))
        return [one, *sorted(more)]

    assert asyncio.run(main()) == [6, 7, 8, 9, 10, 11]


def test_calls_wait_for_the_machine_to_run(b: bigmrun.B) -> None:
    (m,) = b.start(1, services={"C": S.Counter()})
    # Called right away, before it is RUNNING: the call waits for it.
    assert m.call("C.add", 4, timeout=60) == 4
    assert m.state == State.RUNNING


def test_retry_call_succeeds_and_does_not_retry_remote_errors(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo(), F=S.Flaky())
    assert m.retry_call("E.combine", 1, 2) == 3
    sleeps: list[float] = []
    policy = bigmrun.RetryPolicy(max_attempts=5, sleep=sleeps.append)
    with pytest.raises(bigmrun.RemoteError):
        m.retry_call("E.fail", "not temporary", retry_policy=policy)
    assert sleeps == []  # a remote error is final: no retry


def test_retry_call_retries_a_broken_connection(b: bigmrun.B) -> None:
    (m,) = running(b, F=S.Flaky())
    tok = token()
    # A plain call sees the network error (temporary), and the machine lives on.
    with pytest.raises(bigmrun.NetworkError) as ei:
        m.call("F.drop_once", tok, timeout=30)
    assert ei.value.temporary is True
    assert m.state == State.RUNNING
    assert m.call("F.drop_once", tok) == 2  # reconnects by itself
    # retry_call retries it, with backoff from the (injected) policy.
    tok = token()
    sleeps: list[float] = []
    policy = bigmrun.RetryPolicy(max_attempts=4, initial=0.5, maximum=1.0,
                                 sleep=sleeps.append)
    # The first attempt ran (its reply was lost with the connection): the retry gets
    # that reply, and the method ran exactly once (at most once, by request id).
    assert m.retry_call("F.drop_once", tok, timeout=30, retry_policy=policy) == 1
    assert m.call("F.count", tok) == 1
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.5
    # An iterator argument cannot be replayed: the first temporary error is final.
    tok = token()
    sleeps.clear()
    with pytest.raises(bigmrun.NetworkError):
        m.retry_call("F.drop_once", tok, iter([b"abc"]), timeout=30, retry_policy=policy)
    assert sleeps == []
    assert m.call("F.count", tok) == 1
    # A seekable file can be rewound and replayed.
    tok = token()
    assert m.retry_call("F.drop_once", tok, io.BytesIO(b"x" * 1000), timeout=30,
                        retry_policy=policy) == 1
    assert m.call("F.count", tok) == 1


def test_retry_policy_backoff_is_capped_with_jitter() -> None:
    import random

    p = bigmrun.RetryPolicy(initial=0.1, maximum=1.0, rng=random.Random(1))
    for attempt in range(12):
        cap = min(1.0, 0.1 * 2**attempt)
        for _ in range(50):
            assert 0 <= p.delay(attempt) <= cap
    assert len({p.delay(3) for _ in range(20)}) > 1  # jittered
    with pytest.raises(bigmrun.ConfigError):
        bigmrun.RetryPolicy(max_attempts=0)


def test_call_timeout_cancels_on_the_machine(b: bigmrun.B) -> None:
    (m,) = running(b, Z=S.Sleeper())
    tok = token()
    t0 = time.monotonic()
    with pytest.raises(bigmrun.CallTimeoutError) as ei:
        m.call("Z.wait_cancel", tok, 60, timeout=0.3)
    assert time.monotonic() - t0 < PROMPT
    assert isinstance(ei.value, TimeoutError)
    assert "Z.wait_cancel" in str(ei.value)
    # The machine saw the cancellation: bigmrun.cancelled() became true in the method.
    wait_until(lambda: m.call("Z.status", tok) == "cancelled", PROMPT,
               what="the machine to see the cancellation")
    # The same for an async method: its task is cancelled.
    tok = token()
    with pytest.raises(bigmrun.CallTimeoutError):
        m.call("Z.await_cancel", tok, 60, timeout=0.3)
    wait_until(lambda: m.call("Z.status", tok) == "cancelled", PROMPT,
               what="the async method to be cancelled")
    # A call that finishes in time is unaffected by its timeout.
    assert m.call("Z.nap", 0.01, timeout=30) == 0.01


def test_future_cancel_cancels_on_the_machine(b: bigmrun.B) -> None:
    (m,) = running(b, Z=S.Sleeper())
    for method in ("Z.wait_cancel", "Z.await_cancel"):
        tok = token()
        f = m.submit(method, tok, 60)
        wait_until(lambda tok=tok: m.call("Z.status", tok) == "running", PROMPT,
                   what="the call to start")
        assert f.cancel() is True
        assert f.cancelled()
        wait_until(lambda tok=tok: m.call("Z.status", tok) == "cancelled", PROMPT,
                   what=f"{method} to see the cancellation")
    assert m.state == State.RUNNING


def test_acall_timeout_and_task_cancel(b: bigmrun.B) -> None:
    (m,) = running(b, Z=S.Sleeper())
    tok1, tok2 = token(), token()

    async def main() -> None:
        with pytest.raises(bigmrun.CallTimeoutError):
            await m.acall("Z.await_cancel", tok1, 60, timeout=0.3)
        task = asyncio.ensure_future(m.acall("Z.wait_cancel", tok2, 60))
        while await m.acall("Z.status", tok2) != "running":
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for tok in (tok1, tok2):
        wait_until(lambda tok=tok: m.call("Z.status", tok) == "cancelled", PROMPT,
                   what="the machine to see the cancellation")


# --- streaming -----------------------------------------------------------------------------

def test_stream_file_and_iterator_to_machine(b: bigmrun.B, tmp_path: Any) -> None:
    (m,) = running(b, F=S.Files())
    data = os.urandom(3 * S.MiB + 12345)
    want = hashlib.sha256(data).hexdigest()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert m.call("F.sha256", f) == (want, len(data))
    with open(path, "rb") as f:
        assert tuple(m.call("F.sha256", f=f)) == (want, len(data))  # as a keyword
    assert tuple(m.call("F.sha256", io.BytesIO(data))) == (want, len(data))
    chunks = (data[i:i + 100_000] for i in range(0, len(data), 100_000))
    assert tuple(m.call("F.sha256", chunks)) == (want, len(data))
    assert tuple(m.call("F.asha256", io.BytesIO(data))) == (want, len(data))
    assert tuple(m.call("F.sha256", iter([]))) == (hashlib.sha256().hexdigest(), 0)
    other = b"second stream" * 1000
    assert tuple(m.call("F.sha256_two", io.BytesIO(data), iter([other]))) == (
        want, hashlib.sha256(other).hexdigest())


def test_stream_bad_sources(b: bigmrun.B, tmp_path: Any) -> None:
    (m,) = running(b, F=S.Files(), E=S.Echo())
    with pytest.raises(bigmrun.BigmrunError, match="not bytes"):
        m.call("F.sha256", iter(["text, not bytes"]), timeout=30)
    p = tmp_path / "t.txt"
    p.write_text("hello")
    with open(p) as f, pytest.raises(bigmrun.BigmrunError, match="binary mode"):
        m.call("F.sha256", f, timeout=30)
    assert m.call("E.combine", 1, 1) == 2  # still serving


def test_timing_out_a_streaming_call_stops_both_ends(b: bigmrun.B) -> None:
    (m,) = running(b, F=S.Files())
    tok = token()
    sent = [0]
    pumps: list[threading.Thread] = []

    def endless() -> Any:
        pumps.append(threading.current_thread())  # the thread that streams it out
        while True:
            sent[0] += 1
            yield b"z" * 65536

    with pytest.raises(bigmrun.CallTimeoutError):
        m.call("F.consume", tok, endless(), timeout=0.5)
    # The machine stops reading (it is told), and the driver stops sending.
    wait_until(lambda: m.call("F.status", tok) in ("cancelled", "stream error CallCancelledError"),
               PROMPT, what="the machine to stop reading the stream")
    assert len(pumps) == 1 and pumps[0] is not threading.current_thread()
    wait_until(lambda: not pumps[0].is_alive(), PROMPT,
               what="the driver to stop pumping the iterator")
    assert sent[0] > 1  # it did stream for a while
    assert m.call("F.sha256", iter([b"abc"])) == (hashlib.sha256(b"abc").hexdigest(), 3)


def test_a_method_that_reads_part_of_a_stream_stops_the_sender(b: bigmrun.B) -> None:
    (m,) = running(b, F=S.Files(), G=S.Gen())
    pumps: list[threading.Thread] = []

    def endless() -> Any:
        pumps.append(threading.current_thread())
        i = 0
        while True:
            yield i.to_bytes(4, "big") * 16384
            i += 1

    for _ in range(3):
        assert m.call("F.head", endless(), 8, timeout=30) == b"\x00" * 4 * 2
    # The same for a generator method: its reply stream ends, so does the argument's.
    assert list(m.call("G.head_items", endless(), 4, timeout=30)) == [b"\x00" * 4]
    wait_until(lambda: not any(t.is_alive() for t in pumps), PROMPT,
               what="the driver to stop streaming arguments nobody reads")
    assert m.call("F.sha256", iter([b"abc"])) == (hashlib.sha256(b"abc").hexdigest(), 3)


def test_generator_streams_back(b: bigmrun.B) -> None:
    (m,) = running(b, G=S.Gen())
    assert list(m.call("G.count", 1000)) == list(range(1000))
    assert list(m.call("G.count", 0)) == []
    assert list(m.call("G.acount", 50)) == list(range(50))
    got = [hashlib.sha256(x).hexdigest() for x in m.call("G.blocks", 5, 100_000)]
    assert got == [hashlib.sha256(x).hexdigest() for x in S.blocks(5, 100_000)]

    async def consume() -> list[int]:
        it = await m.acall("G.count", 20)
        return [x async for x in it]

    assert asyncio.run(consume()) == list(range(20))


def test_generator_errors_arrive_after_the_items(b: bigmrun.B) -> None:
    (m,) = running(b, G=S.Gen())
    got = []
    with pytest.raises(bigmrun.RemoteError) as ei:
        for x in m.call("G.fail_after", 3):
            got.append(x)
    assert got == [0, 1, 2]
    assert isinstance(ei.value, ValueError)
    assert "generator failed after 3 items" in str(ei.value)
    got = []
    with pytest.raises(bigmrun.SerializationError, match=r"item of G\.bad_items"):
        for x in m.call("G.bad_items"):
            got.append(x)
    assert got == [1]
    assert list(m.call("G.count", 3)) == [0, 1, 2]


def test_closing_a_reply_stream_stops_the_generator(b: bigmrun.B) -> None:
    (m,) = running(b, G=S.Gen())
    tok = token()
    it = m.call("G.endless", tok)
    for _ in range(3):
        next(it)
    it.close()
    wait_until(lambda: m.call("G.status", tok) == "closed", PROMPT,
               what="the remote generator to be closed")


@pytest.mark.timeout(120)
def test_64mib_each_way(b: bigmrun.B) -> None:
    (m,) = running(b, F=S.Files(), G=S.Gen())
    n = 64
    want = S.blocks_sha256(n)
    assert tuple(m.call("F.sha256", S.blocks(n))) == (want, n * S.MiB)
    h = hashlib.sha256()
    total = 0
    for block in m.call("G.blocks", n):
        h.update(block)
        total += len(block)
    assert (h.hexdigest(), total) == (want, n * S.MiB)


@pytest.mark.timeout(180)
def test_big_streams_never_sit_whole_in_memory(b: bigmrun.B) -> None:
    """256 MiB each way; the machine's (and the driver's) RSS grows far less.

    The 1 GiB property, scaled down to keep the suite fast: growth is bounded by flow
    control windows, not by the stream's size.
    """
    (m,) = running(b, F=S.Files(), G=S.Gen())
    n = 256
    limit = 64 * S.MiB
    want = S.blocks_sha256(n)
    driver_base = S.rss()
    driver_peak = [driver_base]

    def source() -> Any:
        for i, block in enumerate(S.blocks(n)):
            if i % 4 == 0:
                driver_peak[0] = max(driver_peak[0], S.rss())
            yield block

    r = m.call("F.sha256_mem", source(), timeout=120)
    assert (r["sha256"], r["n"]) == (want, n * S.MiB)
    assert r["growth"] < limit, f"machine RSS grew {r['growth'] / S.MiB:.0f} MiB"
    assert driver_peak[0] - driver_base < limit

    h = hashlib.sha256()
    driver_base = S.rss()
    peak = driver_base
    last: Any = None
    for i, item in enumerate(m.call("G.blocks_mem", n, timeout=120)):
        if isinstance(item, dict):
            last = item
            continue
        h.update(item)
        if i % 4 == 0:
            peak = max(peak, S.rss())
    assert h.hexdigest() == want
    assert last is not None and last["growth"] < limit, last
    assert peak - driver_base < limit, f"driver RSS grew {(peak - driver_base) / S.MiB:.0f} MiB"


# --- 7. errors ---------------------------------------------------------------------------

def test_unknown_service_and_method(b: bigmrun.B) -> None:
    (m,) = running(b, Counter=S.Counter())
    with pytest.raises(bigmrun.NoSuchMethodError) as ei:
        m.call("Countr.add", 1)
    assert "'Countr'" in str(ei.value) and "Counter" in str(ei.value)  # with a hint
    with pytest.raises(bigmrun.NoSuchMethodError) as ei:
        m.call("Counter.ad", 1)
    assert "'ad'" in str(ei.value) and "'add'" in str(ei.value)
    assert isinstance(ei.value, bigmrun.BigmrunError)
    with pytest.raises(bigmrun.NoSuchMethodError, match="_secret"):
        m.call("Counter._secret")
    with pytest.raises(bigmrun.NoSuchMethodError, match="'n'"):
        m.call("Counter.n")  # an attribute, not a method
    with pytest.raises(bigmrun.ConfigError, match=r"Service\.method"):
        m.call("no_dot_here")
    assert m.call("Counter.add", 1) == 1  # still serving


def test_wrong_arguments_name_the_signature(b: bigmrun.B) -> None:
    (m,) = running(b, C=S.Counter(), E=S.Echo())
    with pytest.raises(bigmrun.RemoteError) as ei:
        m.call("C.add")
    assert isinstance(ei.value, TypeError)
    assert "C.add(k" in str(ei.value) and "'k'" in str(ei.value)
    with pytest.raises(TypeError, match=r"C\.add\(k"):
        m.call("C.add", 1, 2)
    with pytest.raises(TypeError, match=r"E\.combine\(a.*, b.*, \*, scale.*, offset.*\).*'colour'"):
        m.call("E.combine", 1, 2, colour="red")
    with pytest.raises(TypeError, match=r"E\.acombine\(a.*, b.*, \*, scale.*\).*'b'"):
        m.call("E.acombine", 1)
    # A TypeError raised inside the method is reported as itself, not as bad arguments.
    with pytest.raises(TypeError) as ei:
        m.call("E.inner_type_error")
    assert "wrong arguments" not in str(ei.value)
    assert "len()" in str(ei.value)
    assert m.call("C.add", 1) == 1


def test_unpicklable_argument_is_named(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    with pytest.raises(bigmrun.SerializationError) as ei:
        m.call("E.echo", 1, S.Unpicklable("arg"))
    assert "argument 2" in str(ei.value) and "Unpicklable" in str(ei.value)
    assert "E.echo" in str(ei.value)
    with pytest.raises(bigmrun.SerializationError, match="keyword argument 'bad'"):
        m.submit("E.echo", bad=S.Unpicklable("kw"))
    assert m.call("E.combine", 1, 2) == 3


def test_unpicklable_reply_is_named(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    with pytest.raises(bigmrun.SerializationError) as ei:
        m.call("E.bad_reply")
    assert "reply of E.bad_reply" in str(ei.value)
    assert m.call("E.combine", 1, 2) == 3


def test_init_raising_stops_the_machine_with_the_traceback(b: bigmrun.B) -> None:
    bad, good = b.start(1, services={"X": S.BadInit()}) + b.start(1, services={"C": S.Counter()})
    assert bad.wait(State.RUNNING, timeout=60) == State.STOPPED
    err = bad.err
    assert isinstance(err, bigmrun.RemoteError)
    assert isinstance(err, RuntimeError)
    assert err.type_name == "RuntimeError"
    assert "init went boom" in str(err)
    assert "def init" in err.remote_traceback or "in init" in err.remote_traceback
    assert "raise RuntimeError" in err.remote_traceback
    t0 = time.monotonic()
    with pytest.raises(bigmrun.MachineLostError) as ei:
        bad.call("X.hello")
    assert time.monotonic() - t0 < PROMPT
    assert ei.value.__cause__ is err
    assert good.wait(State.RUNNING, timeout=60) == State.RUNNING
    assert good.call("C.add", 1) == 1


def test_method_raising_is_a_remote_error_catchable_by_cause(b: bigmrun.B) -> None:
    (m,) = running(b, E=S.Echo())
    with pytest.raises(bigmrun.RemoteError) as ei:
        m.call("E.fail", "bad value 42")
    err = ei.value
    assert isinstance(err, ValueError)
    assert isinstance(err, bigmrun.BigmrunError)
    assert err.type_name == "ValueError"
    assert err.message == "bad value 42"
    assert err.machine == m.name
    assert "in fail" in err.remote_traceback and "raise ValueError" in err.remote_traceback
    assert "bad value 42" in str(err)
    with pytest.raises(S.CustomError) as ei2:
        m.call("E.fail_custom", "custom")
    assert isinstance(ei2.value, bigmrun.RemoteError)
    assert ei2.value.type_name == "services.CustomError"
    with pytest.raises(KeyError):
        m.call("E.afail", "async failure")
    # via submit/acall too
    with pytest.raises(ValueError, match="via submit"):
        m.submit("E.fail", "via submit").result(timeout=30)
    with pytest.raises(ValueError, match="via acall"):
        asyncio.run(m.acall("E.fail", "via acall"))
    assert m.state == State.RUNNING
    assert m.call("E.combine", 1, 2) == 3


def test_error_types_are_distinct() -> None:
    kinds = [bigmrun.RemoteError, bigmrun.MachineLostError, bigmrun.NetworkError,
             bigmrun.CallTimeoutError, bigmrun.CallCancelledError,
             bigmrun.SerializationError, bigmrun.NoSuchMethodError, bigmrun.ConfigError,
             bigmrun.StartError, bigmrun.ProtocolError]
    for k in kinds:
        assert issubclass(k, bigmrun.BigmrunError)
        for other in kinds:
            if other is not k:
                assert not issubclass(k, other), (k, other)
    assert bigmrun.NetworkError.temporary is True
    assert not any(k.temporary for k in kinds if k is not bigmrun.NetworkError)


# --- machine to machine --------------------------------------------------------------------

def test_machines_call_each_other(b: bigmrun.B) -> None:
    m0, m1 = running(b, 2, P=S.Peer(), C=S.Counter())
    r = m0.call("P.call_peer", m1.addr, "C.add", 7)
    assert r == {"result": 7, "caller": m0.name, "owned": False,
                 "peer_state": int(State.RUNNING)}
    assert m1.call("C.get") == 7
    assert m0.call("C.get") == 0
    r = m1.call("P.call_peer", m0.addr, "C.add", 2)
    assert r["result"] == 2 and r["caller"] == m1.name
