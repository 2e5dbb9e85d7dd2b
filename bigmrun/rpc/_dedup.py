"""At-most-once execution for retried calls.

``retry_call`` sends every attempt of one logical call with the same request id
(``rid``). The machine remembers, per rid, the call while it runs and its reply once it
finished (the last :data:`KEEP` replies, for :data:`TTL` seconds). An attempt whose rid
is known is not run again: it gets the remembered reply, or waits for the running one.
So a call whose first attempt ran but whose reply was lost to a broken connection is
answered, not executed a second time. A reply that is a stream cannot be replayed: a
retry of such a call that already started fails instead of running it twice.

All methods run on the I/O loop thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

KEEP = 10_000
TTL = 600.0

# A waiter is told (frame type, payload) once the call is over.
Waiter = Callable[[int, bytes], None]


class Dedup:
    def __init__(self, keep: int = KEEP, ttl: float = TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._keep = keep
        self._ttl = ttl
        self._clock = clock
        self._running: dict[str, list[Waiter]] = {}
        self._done: OrderedDict[str, tuple[float, int, bytes]] = OrderedDict()

    def begin(self, rid: str, waiter: Waiter) -> bool:
        """True if the call should run now; False if ``waiter`` was answered or queued."""
        self._expire()
        done = self._done.get(rid)
        if done is not None:
            waiter(done[1], done[2])
            return False
        waiters = self._running.get(rid)
        if waiters is not None:
            waiters.append(waiter)
            return False
        self._running[rid] = []
        return True

    def finish(self, rid: str, ftype: int, payload: bytes, cache: bool = True) -> None:
        """The call is over: remember its reply and answer every queued attempt."""
        waiters = self._running.pop(rid, [])
        if cache:
            self._done[rid] = (self._clock(), ftype, payload)
            while len(self._done) > self._keep:
                self._done.popitem(last=False)
        for w in waiters:
            w(ftype, payload)

    def _expire(self) -> None:
        cutoff = self._clock() - self._ttl
        while self._done:
            rid, (t, _, _) = next(iter(self._done.items()))
            if t >= cutoff:
                break
            del self._done[rid]
