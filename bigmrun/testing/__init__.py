"""Testing tools for bigmrun programs; also a pytest plugin (loaded automatically).

Fixtures (available in any test suite once bigmrun is installed):

* ``bigmrun_test_b``: a session on the in-process ``test`` system, shut down after the
  test. Machines live in the test's process but every call goes through pickling and
  the RPC layer.
* ``bigmrun_local_b``: a session on the ``local`` system (one process per machine).
* ``bigmrun_cluster``: like ``bigmrun_test_b``, but chaos is allowed (``chaos=True``).
* ``bigmrun_local_cluster``: like ``bigmrun_local_b``, with chaos allowed.
* ``bigmrun_chaos``: a :class:`Chaos` for ``bigmrun_cluster``; its faults are healed
  after the test. For a local cluster, build one yourself:
  ``Chaos(bigmrun_local_cluster)``.

Also exported: :class:`Chaos`, :func:`chaos_monkey`, :class:`ChaosMonkey`,
:func:`wait_for` (see ``bigmrun.testing.chaos``) and :func:`run_tasks` (a small
scheduler that reruns the tasks of machines that died; ``bigmrun.testing.tasks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

import bigmrun

from ..errors import BigmrunError
from .chaos import Chaos, ChaosMonkey, chaos_monkey, wait_for
from .tasks import run_tasks

__all__ = ["Chaos", "ChaosMonkey", "chaos_monkey", "run_tasks", "wait_for"]


@pytest.fixture
def bigmrun_test_b() -> Iterator[bigmrun.B]:
    """A B on the in-process test system (shut down after the test)."""
    b = bigmrun.start("test", keepalive_timeout=5.0)
    try:
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def bigmrun_local_b() -> Iterator[bigmrun.B]:
    """A B on the local system: one OS process per machine (shut down after the test)."""
    b = bigmrun.start("local", keepalive_timeout=5.0)
    try:
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def bigmrun_cluster() -> Iterator[bigmrun.B]:
    """A B on the in-process test system that allows chaos (shut down after the test)."""
    b = bigmrun.start("test", keepalive_timeout=5.0, chaos=True)
    try:
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def bigmrun_local_cluster() -> Iterator[bigmrun.B]:
    """A B on the local system that allows chaos (shut down after the test).

    Get a chaos controller for it with ``Chaos(bigmrun_local_cluster)``."""
    b = bigmrun.start("local", keepalive_timeout=5.0, chaos=True)
    try:
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def bigmrun_chaos(bigmrun_cluster: bigmrun.B) -> Iterator[Chaos]:
    """A :class:`Chaos` for ``bigmrun_cluster``; every fault is healed after the test."""
    chaos = Chaos(bigmrun_cluster)
    try:
        yield chaos
    finally:
        with contextlib.suppress(BigmrunError):
            chaos.heal()
