"""The System interface: how machines are started, watched and stopped.

A system is one module behind this small interface (in the spirit of httpcore's network
backends). Every method that can block takes a timeout; everything runs on bigmrun's
I/O loop. The session (``B``) does the rest: TLS, installing services, keepalives,
calls. One conformance suite (``tests/test_conformance.py``) runs against every system.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..rpc._tls import Leaf

if TYPE_CHECKING:
    from ..bootstrap.program import Program


@dataclass(frozen=True)
class BootSpec:
    """Everything a new machine needs to know; sent over a private channel, never argv.

    ``leaf`` holds the machine's private key: systems must hand it over only through a
    channel readable by the machine alone (a pipe, an SSH channel, a 0600 file).
    """

    name: str
    session_id: str
    leaf: Leaf
    keepalive_timeout: float
    env: dict[str, str] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)  # system-specific settings

    def boot_record(self, **extra: Any) -> dict[str, Any]:
        """The JSON record the machine's supervisor reads at boot."""
        return {
            "name": self.name,
            "session": self.session_id,
            "leaf": self.leaf.to_dict(),
            "keepalive_timeout": self.keepalive_timeout,
            "system": self.system,
            **extra,
        }


def default_keepalive_timeout() -> float:
    """``$BIGMRUN_KEEPALIVE_TIMEOUT`` (set by the launcher's --keepalive-timeout), or 10 s."""
    import os

    raw = os.environ.get("BIGMRUN_KEEPALIVE_TIMEOUT")
    try:
        return float(raw) if raw else 10.0
    except ValueError:
        from ..errors import ConfigError

        raise ConfigError(f"BIGMRUN_KEEPALIVE_TIMEOUT={raw!r} is not a number of seconds") \
            from None


class OutputSink(Protocol):
    """Where a system delivers each line a machine writes to stdout or stderr."""

    def line(self, machine: str, stream: str, data: bytes) -> None: ...


class MachineHandle(abc.ABC):
    """A started machine as its system sees it."""

    #: "host:port" the machine serves on.
    addr: str
    #: CPUs the machine may use.
    maxprocs: int
    #: Resolves (with the MachineLostError describing how) when the machine has ended.
    exited: asyncio.Future[BaseException]

    @abc.abstractmethod
    async def kill(self, timeout: float = 5.0) -> None:
        """Stop the machine now; returns once it is gone (or the timeout passed)."""

    def describe(self) -> dict[str, Any]:
        """System-specific facts for ``ps`` (pid, host, instance id...)."""
        return {}


class System(abc.ABC):
    """A way to get machines: in-process, local processes, SSH hosts, EC2..."""

    #: Short name: "test", "local", "ssh", "ec2".
    name: str = "?"
    #: A machine exits when it hears no keepalive for this long (seconds).
    keepalive_timeout: float = 10.0
    #: The driver sends a keepalive this often (seconds).
    keepalive_interval: float = 1.0
    #: Time allowed for one machine to start and report its address (seconds).
    start_timeout: float = 60.0
    #: After a connection to a machine breaks, how long to wait for the system to say
    #: whether the machine's process ended (calls then fail as MachineLostError, not as
    #: a NetworkError). Remote systems learn of an exit later than local ones.
    exit_grace: float = 0.5
    #: Where to report start-up progress (set by the session; see ``_progress``).
    progress: Any = None
    #: Extra time ``B.shutdown`` allows :meth:`shutdown` (seconds): EC2 waits there for
    #: its instances to terminate before deleting their security group.
    shutdown_timeout: float = 0.0

    #: What machines run (None: this program, found on first use).
    _program: Program | None = None

    def program(self) -> Program:
        """The command line that runs this program again as a machine."""
        if self._program is None:
            from ..bootstrap.program import current_program

            self._program = current_program()
        return self._program

    @abc.abstractmethod
    async def launch(self, spec: BootSpec, output: OutputSink) -> MachineHandle:
        """Start one machine and return once it serves (raise StartError otherwise)."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release what the system holds (after every machine was killed)."""

    def boot_settings(self) -> dict[str, Any]:
        """Settings a machine needs to rebuild this system for itself (see ``current()``)."""
        return {"keepalive_timeout": self.keepalive_timeout}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
