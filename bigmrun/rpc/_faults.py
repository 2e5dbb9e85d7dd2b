"""Fault injection for chaos tests: bad networks, simulated in user space, per link.

How this works
--------------
A *link* is an ordered pair of participants (``"driver"``, ``"m0"``, ...) named by
their certificates: the faults of link (A, B) apply to every frame A sends to B. Each
process holds a :class:`FaultTable`; every connection looks up the faults of its own
link when it is made and whenever the table changes. A connection without faults
writes straight to its transport (one attribute test per write); one with faults
passes every whole frame through :meth:`Faults.send`, which may

* drop it (``drop``: the fraction of frames lost),
* cut its payload short, keeping the frame well formed (``truncate``),
* hold it back (``latency`` + a uniform ``jitter``; frames never overtake each other,
  as on TCP), or pace it to a ``bandwidth`` in bytes per second,
* or, for a ``partitioned`` link, refuse it altogether: live connections are aborted
  and new ones refused until the link heals, as when a network splits.

The kernel here has no netem; this layer needs no root and works the same on the
in-process test system and on local processes (the driver pushes each machine its part
of the table with ``Supervisor.chaos`` when the session allows chaos). Integrity is the
RPC layer's job: a truncated reply fails to unpickle, a damaged stream fails its
trailer check, a lost frame is bounded by the call's timeout.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _protocol as P


@dataclass
class Faults:
    """What goes wrong on one link. All zero: nothing."""

    drop: float = 0.0
    truncate: float = 0.0
    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float = 0.0  # bytes per second; 0 means unlimited
    partitioned: bool = False
    seed: int | None = None
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("drop", "truncate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a fraction of frames, 0..1 (got {v})")
        if min(self.latency, self.jitter, self.bandwidth) < 0:
            raise ValueError("latency, jitter and bandwidth cannot be negative")
        if self.seed is not None:
            self._rng = random.Random(self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_rng", None)
        return d

    @property
    def active(self) -> bool:
        return bool(self.drop or self.truncate or self.latency or self.jitter
                    or self.bandwidth or self.partitioned)

    # --- the send path (event loop thread) ------------------------------------------
    def send(self, conn: Any, frame: bytes) -> None:
        """Send one whole encoded frame through this link's faults."""
        t = conn.transport
        if t is None:
            return
        rng = self._rng
        if self.drop and rng.random() < self.drop:
            return
        if self.truncate and len(frame) > P.HEADER_SIZE and rng.random() < self.truncate:
            length, ftype, flags, sid = P.HEADER.unpack_from(frame, 0)
            keep = rng.randrange(0, length) if length else 0
            frame = P.HEADER.pack(keep, ftype, flags, sid) + frame[P.HEADER_SIZE:
                                                                   P.HEADER_SIZE + keep]
        if not (self.latency or self.jitter or self.bandwidth):
            t.write(frame)
            return
        now = time.monotonic()
        delay = self.latency + (rng.uniform(0, self.jitter) if self.jitter else 0.0)
        release = max(now + delay, conn._fault_release)
        if self.bandwidth:
            release += len(frame) / self.bandwidth
        conn._fault_release = release
        conn.loop.call_at(conn.loop.time() + (release - now), _late_write, conn, frame)


def _late_write(conn: Any, frame: bytes) -> None:
    t = conn.transport
    if t is not None:
        t.write(frame)


class FaultTable:
    """The faults of every link, for the connections of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[tuple[str, str], Faults] = {}
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        #: Whether streams of this process carry a CRC-32 in their trailers: set in a
        #: session that allows chaos, and for good once any fault was set here.
        self.checksums = False

    def register(self, conn: Any) -> None:
        """Called by every connection once it knows both ends (loop thread)."""
        self._conns.add(conn)
        self._apply(conn)

    def faults(self, local: str, peer: str) -> Faults | None:
        with self._lock:
            f = self._links.get((local, peer))
        return f if f is not None and f.active else None

    def set(self, local: str, peer: str, faults: Faults | None) -> None:
        """Set (or clear, with None) the faults of frames ``local`` sends to ``peer``."""
        with self._lock:
            if faults is None or not faults.active:
                self._links.pop((local, peer), None)
            else:
                self._links[(local, peer)] = faults
                self.checksums = True

    def clear(self) -> None:
        with self._lock:
            self._links.clear()

    def forget(self, names: Collection[str]) -> None:
        """Drop the faults of every link with an end in ``names`` (a session's machines,
        when it shuts down: a later session's machines reuse the names ``m0``...)."""
        with self._lock:
            for link in [k for k in self._links if k[0] in names or k[1] in names]:
                del self._links[link]

    def links(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {f"{a}->{b}": f.to_dict() for (a, b), f in self._links.items()}

    def apply(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-read the table on every live connection (call after changes)."""
        def go() -> None:
            for conn in list(self._conns):
                self._apply(conn)

        loop.call_soon_threadsafe(go)

    def _apply(self, conn: Any) -> None:
        local, peer = getattr(conn, "local", None), conn.peer
        f = self.faults(local, peer) if local and peer else None
        conn.faults = f
        if f is not None and f.partitioned and conn.transport is not None:
            from ..errors import NetworkError

            conn.abort(NetworkError(f"link {local} -> {peer} is partitioned (chaos)"))

    def partitioned(self, local: str, peer: str) -> bool:
        f = self.faults(local, peer)
        return f is not None and f.partitioned


#: This process's table.
TABLE = FaultTable()
