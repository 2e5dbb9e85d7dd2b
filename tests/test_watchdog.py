"""The machine's keepalive watchdog, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from bigmrun._supervisor import Watchdog


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_not_expired_before_the_timeout(clock: FakeClock) -> None:
    w = Watchdog(10.0, clock)
    assert not w.expired()
    assert w.silent_for() == 0.0
    clock.advance(9.999)
    assert not w.expired()
    assert w.silent_for() == pytest.approx(9.999)


def test_expired_after_the_timeout(clock: FakeClock) -> None:
    w = Watchdog(10.0, clock)
    clock.advance(10.0)
    assert not w.expired()  # exactly the timeout: not yet (strictly longer expires)
    clock.advance(0.001)
    assert w.expired()
    clock.advance(1000)
    assert w.expired()
    assert w.silent_for() == pytest.approx(1010.001)


def test_starts_counting_at_construction(clock: FakeClock) -> None:
    clock.advance(500)  # time before the watchdog exists does not count
    w = Watchdog(10.0, clock)
    assert not w.expired()
    clock.advance(11)
    assert w.expired()


def test_beat_resets(clock: FakeClock) -> None:
    w = Watchdog(10.0, clock)
    for _ in range(100):  # regular beats keep it alive indefinitely
        clock.advance(9.0)
        assert not w.expired()
        w.beat()
        assert w.silent_for() == 0.0
    clock.advance(10.5)
    assert w.expired()
    w.beat()  # a late beat revives it
    assert not w.expired()
    assert w.timeout == 10.0


def test_beat_with_timeout_changes_the_timeout(clock: FakeClock) -> None:
    w = Watchdog(10.0, clock)
    clock.advance(5)
    w.beat(2.0)
    assert w.timeout == 2.0
    assert not w.expired()
    clock.advance(2.5)
    assert w.expired()  # would not be with the old 10 s timeout
    w.beat(60.0)
    assert w.timeout == 60.0
    clock.advance(59)
    assert not w.expired()
    w.beat()  # no timeout given: keeps the current one
    assert w.timeout == 60.0
    clock.advance(61)
    assert w.expired()


def test_lowered_timeout_applies_from_the_beat(clock: FakeClock) -> None:
    w = Watchdog(100.0, clock)
    clock.advance(30)
    w.beat(0.5)
    clock.advance(0.4)
    assert not w.expired()
    clock.advance(0.2)
    assert w.expired()


def test_uses_the_injected_clock_only(clock: FakeClock) -> None:
    w = Watchdog(1.0, clock)
    # Real time passing (the test's own runtime) must not matter: the clock is frozen.
    for _ in range(1000):
        assert not w.expired()
    clock.advance(1.5)
    assert w.expired()
