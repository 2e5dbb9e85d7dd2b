"""bigmrun: Bigmachine for Python.

One ordinary program starts its own machines (in-process, local processes, SSH hosts,
EC2), installs stateful services on them and calls their methods over mutual TLS::

    import bigmrun

    class Counter:
        def __init__(self):
            self.n = 0
        def add(self, k):
            self.n += k
            return self.n

    if __name__ == "__main__":
        with bigmrun.start() as b:               # on a machine, this never returns
            m, = b.start(1, services={"C": Counter()})
            print(m.call("C.add", 5))            # 5
"""

from __future__ import annotations

from typing import Any

from ._context import current_b, current_call, process_b
from ._machine import Machine, RetryPolicy, State
from ._session import B
from .backends import System
from .errors import (
    BigmrunError,
    CallCancelledError,
    CallTimeoutError,
    ConfigError,
    MachineLostError,
    NetworkError,
    NoSuchMethodError,
    ProtocolError,
    RemoteError,
    SerializationError,
    StartError,
)

__version__ = "0.1.0"

__all__ = [
    "B",
    "BigmrunError",
    "CallCancelledError",
    "CallTimeoutError",
    "ConfigError",
    "Machine",
    "MachineLostError",
    "NetworkError",
    "NoSuchMethodError",
    "ProtocolError",
    "RemoteError",
    "RetryPolicy",
    "SerializationError",
    "StartError",
    "State",
    "System",
    "__version__",
    "cancelled",
    "current",
    "start",
]


def start(system: str | System | None = None, *, chaos: bool | None = None,
          **options: Any) -> B:
    """Start bigmrun: the driver gets its ``B``; on a machine this never returns.

    ``system`` is "local" (default), "test", "ssh", "ec2" or a :class:`System` object;
    without it, ``$BIGMRUN_SYSTEM`` (set by the ``bigmrun`` launcher) decides.
    ``options`` go to the system's constructor (e.g. ``keepalive_timeout=5``).
    ``chaos=True`` lets ``bigmrun.testing.chaos`` inject network faults into the machines
    (default: ``$BIGMRUN_CHAOS == "1"``).

    In a process started as a machine, this call becomes the machine's supervisor: it
    serves calls until the driver goes away, then exits the process.
    """
    from ._supervisor import is_machine_process, serve_forever

    if is_machine_process():
        serve_forever()  # never returns
    from .backends import get_system

    return B(get_system(system, **options), chaos=chaos)


def current() -> B:
    """Inside a service method or ``init``: the machine's own ``B`` (to dial peers)."""
    b = current_b.get() or process_b[0]
    if b is None:
        raise BigmrunError(
            "bigmrun.current() is only available on a machine (inside a service method)"
        )
    return b


def cancelled() -> bool:
    """Inside a service method: True once the caller cancelled (or timed out) this call.

    Long-running regular (``def``) methods can poll this to stop early; ``async def``
    methods are cancelled directly (they receive ``asyncio.CancelledError``).
    """
    state = current_call.get()
    return state is not None and state.is_cancelled()
