"""Testing a bigmrun program under chaos: an example to copy into your own test suite.

The fixtures come from bigmrun's pytest plugin (installed with bigmrun): no conftest
needed. ``bigmrun_cluster`` is an in-process cluster that allows chaos,
``bigmrun_chaos`` its chaos controller. Run with ``pytest examples/test_example_chaos.py``.
"""

from __future__ import annotations

import threading
import time

import pytest

import bigmrun
from bigmrun.testing import Chaos, chaos_monkey, run_tasks


class Counter:
    """The service under test: counts the tokens it has seen, once each."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def add(self, token: str) -> int:
        with self.lock:
            self.seen.add(token)
            return len(self.seen)

    def square(self, x: int) -> int:
        time.sleep(0.02)  # some work, so the monkey strikes mid-run
        return x * x


def test_partition_then_heal(bigmrun_cluster: bigmrun.B, bigmrun_chaos: Chaos) -> None:
    m0, m1 = bigmrun_cluster.start(2, services={"C": Counter()})
    assert m0.wait(timeout=30) == bigmrun.State.RUNNING
    assert m1.wait(timeout=30) == bigmrun.State.RUNNING

    bigmrun_chaos.partition(m0)  # the driver can no longer reach m0
    with pytest.raises(bigmrun.BigmrunError) as err:
        m0.call("C.add", "a", timeout=5)
    assert err.value.temporary  # a network error: worth retrying
    assert m1.call("C.add", "b", timeout=5) == 1  # m1 is unaffected

    bigmrun_chaos.heal()
    # retry_call sends one request id on every attempt: the call runs at most once.
    assert m0.retry_call("C.add", "a", timeout=5) == 1


def test_work_survives_a_chaos_monkey(bigmrun_cluster: bigmrun.B) -> None:
    b = bigmrun_cluster
    b.start(3, services={"C": Counter()})

    def replace() -> list[bigmrun.Machine]:
        return b.start(1, services={"C": Counter()})

    with chaos_monkey(b, every=0.2, replace=replace) as monkey:
        # run_tasks reruns, on a live machine, every task whose machine died.
        squares = run_tasks(b, "C.square", [(i,) for i in range(300)], timeout=120)
    assert squares == [i * i for i in range(300)]
    assert monkey.kills, "the monkey killed nobody"
    assert not monkey.errors
