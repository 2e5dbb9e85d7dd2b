"""Chaos for tests: kill machines, split the network, make links slow, lossy or narrow.

::

    b = bigmrun.B("local", chaos=True)        # or the bigmrun_chaos fixture
    ms = b.start(3, services={"W": Worker()})
    chaos = Chaos(b)
    chaos.partition(ms[0])                    # driver <-> m0 cut
    chaos.partition(ms[1], ms[2])             # m1 <-> m2 cut
    chaos.degrade(ms[0], drop=0.1, latency=0.02, jitter=0.01)
    chaos.heal()                              # everything back to normal
    chaos.kill_random()

Works on the ``test`` and ``local`` systems (and SSH machines) without root: faults are
injected on frames in user space (``bigmrun.rpc._faults``), not in the kernel. Machines
accept faults only in a session started with ``chaos=True``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import _loop
from .._machine import Machine, State
from .._session import B
from ..errors import BigmrunError, ConfigError
from ..rpc._faults import TABLE, Faults

Peer = Machine | str


class Chaos:
    """Injects failures into one session (the driver's ``B``)."""

    def __init__(self, b: B, rng: random.Random | None = None) -> None:
        if not b.is_driver:
            raise ConfigError("Chaos needs the driver's B")
        if not b.chaos_enabled:
            raise ConfigError("this session does not allow chaos: create it with "
                              "bigmrun.B(system, chaos=True) or set BIGMRUN_CHAOS=1")
        self.b = b
        self.rng = rng or random.Random()
        self._links: set[tuple[str, str]] = set()
        self.killed: list[str] = []

    # --- machines -------------------------------------------------------------------
    def kill(self, m: Machine) -> None:
        """Kill a machine at once, as a crash would (SIGKILL for a process)."""
        system = self.b.system
        if system.name == "test":
            system.kill(m)  # type: ignore[attr-defined]
        elif m.handle is not None and hasattr(m.handle, "proc"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.handle.proc.pid, signal.SIGKILL)
        elif m.handle is not None:
            _loop.run(m.handle.kill(), 30)
        else:
            raise ConfigError(f"cannot kill {m.name}: it is not a machine this B started")
        self.killed.append(m.name)

    def kill_random(self) -> Machine:
        """Kill a random RUNNING machine; returns it."""
        alive = [m for m in self.b.machines() if m.owned and m.state == State.RUNNING]
        if not alive:
            raise ConfigError("no running machine to kill")
        m = self.rng.choice(alive)
        self.kill(m)
        return m

    # --- links ----------------------------------------------------------------------
    @staticmethod
    def _name(x: Peer) -> str:
        return x.name if isinstance(x, Machine) else str(x)

    def _machine(self, name: str) -> Machine | None:
        for m in self.b.machines():
            if m.name == name and m.owned:
                return m
        return None

    def _set(self, local: str, peer: str, faults: Faults | None) -> None:
        in_process = self.b.system.name == "test"
        if local == "driver" or in_process:
            TABLE.set(local, peer, faults)
            TABLE.apply(_loop.get_loop())
        else:
            m = self._machine(local)
            if m is None:
                raise ConfigError(f"no machine {local!r} in this session")
            if m.state != State.RUNNING:
                return
            m.retry_call("Supervisor.chaos", [(local, peer, faults.to_dict() if faults else None)],
                         timeout=10)
        if faults is None:
            self._links.discard((local, peer))
        else:
            self._links.add((local, peer))

    def partition(self, a: Peer, b: Peer = "driver") -> None:
        """Cut the link between ``a`` and ``b`` (default: the driver) both ways."""
        x, y = self._name(a), self._name(b)
        if x == y:
            raise ConfigError("cannot partition a participant from itself")
        cut = Faults(partitioned=True)
        if "driver" in (x, y):
            # Cut on the driver's side only: its connections drop and no new one is made,
            # while the driver can still reach the machine to heal... once healed.
            other = y if x == "driver" else x
            self._set("driver", other, cut)
        else:
            self._set(x, y, cut)
            self._set(y, x, cut)

    def degrade(self, a: Peer, b: Peer = "driver", *, drop: float = 0.0,
                truncate: float = 0.0, latency: float = 0.0, jitter: float = 0.0,
                bandwidth: float = 0.0, seed: int | None = None, both_ways: bool = True
                ) -> None:
        """Make the link ``a`` -> ``b`` (and back, unless ``both_ways=False``) bad:
        ``drop``/``truncate`` a fraction of frames, add ``latency`` + uniform ``jitter``
        seconds, limit to ``bandwidth`` bytes/s."""
        x, y = self._name(a), self._name(b)
        pairs = [(x, y), (y, x)] if both_ways else [(x, y)]
        # Machines first (their push travels over the still-good link), driver last.
        pairs.sort(key=lambda p: p[0] == "driver")
        for local, peer in pairs:
            self._set(local, peer, Faults(drop=drop, truncate=truncate, latency=latency,
                                          jitter=jitter, bandwidth=bandwidth, seed=seed))

    def heal(self, a: Peer | None = None, b: Peer | None = None) -> None:
        """Undo the faults of one link (both ways), or of every link."""
        if a is None:
            links = sorted(self._links, key=lambda p: p[0] != "driver")
        else:
            x, y = self._name(a), self._name(b if b is not None else "driver")
            links = [p for p in ((x, y), (y, x)) if p in self._links]
            links.sort(key=lambda p: p[0] != "driver")
        for local, peer in links:  # the driver's side first, so pushes get through
            with contextlib.suppress(BigmrunError):
                self._set(local, peer, None)
        if a is None:
            self._links.clear()


class ChaosMonkey:
    """Kills a random machine every ``every`` seconds while a workload runs."""

    def __init__(self, b: B, every: float, replace: Callable[[], Any] | None = None,
                 rng: random.Random | None = None, min_alive: int = 1) -> None:
        self.chaos = Chaos(b, rng)
        self.b = b
        self.every = every
        self.replace = replace
        self.min_alive = min_alive
        self.kills: list[str] = []
        self.replacements: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bigmrun-chaos-monkey",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            alive = [m for m in self.b.machines() if m.owned and m.state == State.RUNNING]
            if len(alive) <= self.min_alive:
                continue
            try:
                victim = self.chaos.kill_random()
                self.kills.append(victim.name)
                if self.replace is not None:
                    new = self.replace()
                    for m in new if isinstance(new, list) else [new]:
                        self.replacements.append(m.name)
            except Exception as e:  # keep going: the workload decides what matters
                self.errors.append(e)

    def start(self) -> ChaosMonkey:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@contextlib.contextmanager
def chaos_monkey(b: B, every: float = 2.0, replace: Callable[[], Any] | None = None,
                 rng: random.Random | None = None, min_alive: int = 1
                 ) -> Iterator[ChaosMonkey]:
    """Run the body while a monkey kills a random machine every ``every`` seconds
    (keeping at least ``min_alive``), starting a replacement with ``replace()`` if given."""
    monkey = ChaosMonkey(b, every, replace, rng, min_alive).start()
    try:
        yield monkey
    finally:
        monkey.stop()


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it is truthy (returned) or ``timeout`` passes (TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
