"""Testing tools for bigmrun programs; also a pytest plugin (loaded automatically).

Fixtures:

* ``bigmrun_test_b``: a session on the in-process ``test`` system, shut down after the
  test. Machines live in the test's process but every call goes through pickling and
  the RPC layer.
* ``bigmrun_local_b``: a session on the ``local`` system (one process per machine).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import bigmrun


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
