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


# --- measured figures (tests/test_reliability.py, test_fuzz.py) --------------------------

#: name -> value; printed at the end of the run and written to ``figures.json`` in the
#: session's temporary directory, so they show without ``-s``.
FIGURES: dict[str, Any] = {}


def record_figure(name: str, value: Any) -> None:
    """Record a measured figure (shown in the terminal summary)."""
    FIGURES[name] = value
    print(f"FIGURE {name} = {value}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    import json
    import tempfile

    terminalreporter.section("bigmrun measured figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
    path = tempfile.mkdtemp(prefix="bigmrun-figures-") + "/figures.json"
    with open(path, "w") as f:
        json.dump(FIGURES, f, indent=2, default=str)
    terminalreporter.write_line(f"(written to {path})")
