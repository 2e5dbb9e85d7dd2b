"""Shared fixtures: a started ``B`` on each system, and a bounded polling helper."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import bigmrun

SYSTEMS = ["test", "local"]


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


@pytest.fixture(params=SYSTEMS)
def system(request: pytest.FixtureRequest) -> str:
    """The name of the system under test (the conformance suite runs on each)."""
    return str(request.param)


@pytest.fixture
def b(system: str) -> Iterator[bigmrun.B]:
    """A started driver session on ``system``, always shut down after the test."""
    session = bigmrun.start(system, keepalive_timeout=5)
    try:
        yield session
    finally:
        session.shutdown()


@pytest.fixture
def local_b() -> Iterator[bigmrun.B]:
    """A started driver session on the local system (short keepalive timeout)."""
    session = bigmrun.start("local", keepalive_timeout=2)
    try:
        yield session
    finally:
        session.shutdown()
