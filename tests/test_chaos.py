"""The chaos controller on the test and local systems: every kind of fault it injects.

Latency and bandwidth are checked as lower bounds (a call through a slowed link cannot
be faster than the delay put in its way); load on the machine only makes calls slower,
so these bounds cannot fail by noise.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

import pytest
import services as S

import bigmrun
from bigmrun import State
from bigmrun.errors import BigmrunError, ConfigError, NetworkError
from bigmrun.rpc._faults import TABLE
from bigmrun.testing import Chaos


class Svc:
    """Echo and checksum, for chaos tests."""

    def echo(self, x: object) -> object:
        return x

    def sha256(self, f: object) -> str:
        h = hashlib.sha256()
        while True:
            chunk = f.read(1 << 20)  # type: ignore[attr-defined]
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


@pytest.fixture(params=["test", "local"])
def cb(request: pytest.FixtureRequest) -> Iterator[bigmrun.B]:
    b = bigmrun.start(request.param, keepalive_timeout=10, chaos=True)
    try:
        yield b
    finally:
        b.shutdown()


def running(b: bigmrun.B, n: int, **services: object) -> list[bigmrun.Machine]:
    ms = b.start(n, services=dict(services))
    for m in ms:
        assert m.wait(State.RUNNING, 60) == State.RUNNING, m.err
    return ms


def test_chaos_needs_a_session_that_allows_it() -> None:
    with bigmrun.start("test") as b, pytest.raises(ConfigError, match="chaos=True"):
        Chaos(b)


def test_machine_to_machine_partition_and_heal(cb: bigmrun.B) -> None:
    m0, m1 = running(cb, 2, P=S.Peer(), E=Svc())
    chaos = Chaos(cb)
    assert m0.call("P.call_peer", m1.addr, "E.echo", 1, timeout=30)["result"] == 1
    chaos.partition(m0, m1)
    with pytest.raises(BigmrunError) as err:  # m0 cannot reach m1 ...
        m0.call("P.call_peer", m1.addr, "E.echo", 2, timeout=30)
    assert "NetworkError" in str(err.value) or isinstance(err.value, NetworkError)
    assert m0.call("E.echo", 3, timeout=10) == 3  # ... but the driver reaches both
    assert m1.call("E.echo", 4, timeout=10) == 4
    chaos.heal()
    assert m0.call("P.call_peer", m1.addr, "E.echo", 5, timeout=30)["result"] == 5
    assert TABLE.links() == {} or cb.system.name == "local"


def test_latency_and_jitter_slow_every_call_down(cb: bigmrun.B) -> None:
    (m,) = running(cb, 1, E=Svc())
    chaos = Chaos(cb)
    chaos.degrade(m, latency=0.1, jitter=0.05, seed=3)
    t0 = time.monotonic()
    for i in range(3):
        assert m.call("E.echo", i, timeout=30) == i
    # Each call crosses the link twice, each way at least 0.1 s late.
    assert time.monotonic() - t0 >= 3 * 2 * 0.1
    chaos.heal()
    assert m.call("E.echo", "ok", timeout=10) == "ok"


def test_bandwidth_limit_paces_a_stream(cb: bigmrun.B) -> None:
    (m,) = running(cb, 1, F=Svc())
    chaos = Chaos(cb)
    data = os.urandom(1 << 20)
    chaos.degrade(m, bandwidth=512 * 1024, both_ways=False)  # m -> driver untouched
    chaos.degrade("driver", m, bandwidth=512 * 1024, both_ways=False)
    t0 = time.monotonic()
    digest = m.call("F.sha256", iter([data]), timeout=60)
    assert digest == hashlib.sha256(data).hexdigest()
    assert time.monotonic() - t0 >= 1.5  # 1 MiB at 512 KiB/s: at least ~2 s
    chaos.heal()


def test_truncated_frames_never_deliver_wrong_data(cb: bigmrun.B) -> None:
    (m,) = running(cb, 1, F=Svc(), E=Svc())
    chaos = Chaos(cb)
    chaos.degrade(m, truncate=0.2, seed=7)
    ok = failed = 0
    for i in range(30):
        blob = os.urandom(300_000)
        try:
            got = m.call("F.sha256", iter([blob[:150_000], blob[150_000:]]), timeout=5)
        except BigmrunError:
            failed += 1
            continue
        assert got == hashlib.sha256(blob).hexdigest()
        ok += 1
        try:
            assert m.call("E.echo", i, timeout=5) == i
        except BigmrunError:
            failed += 1
    chaos.heal()
    assert ok + failed >= 30 and failed > 0  # faults happened, and no answer was wrong
    assert m.call("E.echo", "healed", timeout=10) == "healed"


def test_kill_random_stops_a_running_machine(cb: bigmrun.B) -> None:
    ms = running(cb, 3, E=Svc())
    chaos = Chaos(cb)
    victim = chaos.kill_random()
    assert victim in ms and chaos.killed == [victim.name]
    assert victim.wait(State.STOPPED, 30) == State.STOPPED
    for m in ms:
        if m is not victim:
            assert m.call("E.echo", m.name, timeout=10) == m.name
