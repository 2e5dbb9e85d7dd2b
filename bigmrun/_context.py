"""Context that service code can ask for: the machine's own B and the current call."""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._session import B

#: The B of the machine whose service is running (set per call, so that the in-process
#: test system, which hosts many machines in one process, answers per machine).
current_b: contextvars.ContextVar[B | None] = contextvars.ContextVar("bigmrun_b", default=None)

#: The process-wide B when this process is a machine (set by the supervisor).
process_b: list[Any] = [None]


_EVENT_LOCK = threading.Lock()


class CallState:
    """What a running service call can learn about itself."""

    __slots__ = ("_cancelled", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self._cancelled: threading.Event | None = None

    @property
    def cancelled(self) -> threading.Event:
        """Set once the caller cancelled the call (made on first use: most calls never
        look)."""
        ev = self._cancelled
        if ev is None:
            with _EVENT_LOCK:
                ev = self._cancelled
                if ev is None:
                    ev = self._cancelled = threading.Event()
        return ev

    def is_cancelled(self) -> bool:
        """``cancelled.is_set()``, without making the event."""
        ev = self._cancelled
        return ev is not None and ev.is_set()


current_call: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "bigmrun_call", default=None
)
