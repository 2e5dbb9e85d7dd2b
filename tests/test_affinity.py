"""The local system's ``pin_cpus``: the driver and each machine on CPUs of their own."""

from __future__ import annotations

import os

import pytest
import services as S

import bigmrun
from bigmrun import State
from bigmrun.backends import _affinity as A
from bigmrun.errors import ConfigError

pytestmark = pytest.mark.timeout(90)

CPUS = A.available_cpus()


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """The CPUs each thread of process ``pid`` may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:
            continue
    return out


def test_the_plan_gives_the_driver_the_first_cpu_and_machines_the_others() -> None:
    assert [A.machine_cpu([0, 1], k) for k in range(4)] == [1, 0, 1, 0]
    assert [A.machine_cpu([2, 5, 7], k) for k in range(4)] == [5, 7, 2, 5]
    assert [A.machine_cpu([3], k) for k in range(2)] == [3, 3]


def test_the_option_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIGMRUN_PIN_CPUS", raising=False)
    assert A.pin_option(None) is False
    assert A.pin_option(True) is True
    monkeypatch.setenv("BIGMRUN_PIN_CPUS", "yes")
    assert A.pin_option(None) is True
    assert A.pin_option(False) is False  # the argument wins
    monkeypatch.setenv("BIGMRUN_PIN_CPUS", "sometimes")
    with pytest.raises(ConfigError, match=r"BIGMRUN_PIN_CPUS='sometimes'.*use 1 or 0"):
        A.pin_option(None)


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs at least 2 CPUs to show anything")
def test_pinned_session_binds_driver_and_machines_then_gives_the_driver_back() -> None:
    before = thread_cpus(os.getpid())
    b = bigmrun.start("local", pin_cpus=True)
    try:
        ms = b.start(2, services={"E": S.Echo()})
        for m in ms:
            assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
        pinned = []
        for m in ms:
            assert m.maxprocs == 1
            got = thread_cpus(m.call("E.pid"))
            assert len(got) >= 2  # the loop thread and the worker that answered
            (cpus,) = {frozenset(c) for c in got.values()}  # every thread on the same CPU
            pinned.append(set(cpus))
            assert m.call("E.echo", "pinned") == (("pinned",), {})
        # Started in parallel, so in either order: the CPUs of machines 0 and 1.
        assert sorted(min(c) for c in pinned) == sorted(
            A.machine_cpu(CPUS, k) for k in range(2))
        assert all(len(c) == 1 for c in pinned)
        driver = thread_cpus(os.getpid())
        assert all(cpus == {CPUS[0]} for cpus in driver.values()), driver
    finally:
        b.shutdown()
    after = thread_cpus(os.getpid())
    for tid, cpus in after.items():
        assert cpus == before.get(tid, set(CPUS)), (tid, cpus)


def test_unpinned_machines_may_use_every_cpu(local_b: bigmrun.B) -> None:
    (m,) = local_b.start(1, services={"E": S.Echo()})
    assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
    assert m.maxprocs == len(CPUS)
    assert set().union(*thread_cpus(m.call("E.pid")).values()) == set(CPUS)
