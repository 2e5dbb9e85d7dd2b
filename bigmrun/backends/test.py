"""The test system: machines inside this process, for users' unit tests.

Each machine is a real :class:`Supervisor` with its own mutual-TLS server on loopback,
so calls still go through pickling and the RPC layer (a test catches an unpicklable
value just as a real cluster would). Services are unpickled into fresh objects, so no
state is shared with the driver by accident. ``kill(machine)`` drops a machine at once,
as a crash would.

In-process machines share the process's environment: the ``env`` given to ``B.start``
is not applied to them (use the local system for that). They share its standard streams
too, but what a machine's code writes to ``sys.stdout`` or ``sys.stderr`` is captured
per machine (see ``_capture``) and reaches the driver's output prefixed with the
machine's name, as a local machine's does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .._supervisor import Supervisor
from ..errors import ConfigError, MachineLostError
from ..rpc._server import Handler
from . import _capture
from ._base import BootSpec, MachineHandle, OutputSink, System, default_keepalive_timeout


class TestHandle(MachineHandle):
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.addr = ""
        self.maxprocs = os.cpu_count() or 1
        self.exited = loop.create_future()
        self.supervisor: Any = None
        self.b: Any = None  # the machine's own B, whose output is captured

    def end(self, message: str) -> None:
        if self.supervisor is not None:
            self.supervisor.kill()
        if self.b is not None:
            _capture.unregister(self.b)
        if not self.exited.done():
            self.exited.set_result(MachineLostError(message, machine=self.name))

    async def kill(self, timeout: float = 5.0) -> None:
        self.end(f"machine {self.name} was stopped")

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "in_process": True}


class _TestSupervisor(Supervisor):
    """A supervisor that keeps its machine's output captured (see ``_capture``)."""

    def lookup(self, method: str) -> Handler:
        # Each call checks that sys.stdout/sys.stderr still capture this machine's output
        # (pytest, for one, swaps them back between a test's setup and its body).
        _capture.ensure()
        return super().lookup(method)


class TestSystem(System):
    """In-process machines. ``kill(machine)`` simulates a crash."""

    __test__ = False  # not a pytest test class
    name = "test"

    def __init__(self, keepalive_timeout: float | None = None, keepalive_interval: float = 1.0,
                 start_timeout: float = 30.0) -> None:
        self.keepalive_timeout = keepalive_timeout or default_keepalive_timeout()
        self.keepalive_interval = keepalive_interval
        self.start_timeout = start_timeout
        self._handles: dict[str, TestHandle] = {}

    async def launch(self, spec: BootSpec, output: OutputSink) -> MachineHandle:
        from .._session import B

        loop = asyncio.get_running_loop()
        handle = TestHandle(spec.name, loop)
        b = B(self, is_driver=False, leaf=spec.leaf, session_id=spec.session_id,
              name=spec.name)

        def on_exit(code: int, reason: str) -> None:
            handle.end(f"machine {spec.name} exited: {reason}")

        sup = _TestSupervisor(spec.name, spec.leaf, spec.keepalive_timeout, b, on_exit,
                              threads=64, chaos=bool(spec.system.get("chaos")))
        b._attach_supervisor(sup)
        handle.supervisor = sup
        host, port = await sup.start("127.0.0.1", 0)
        handle.addr = f"{host}:{port}"
        self._handles[spec.name] = handle
        handle.b = b
        _capture.register(b, spec.name, output)
        return handle

    def kill(self, machine: Any) -> None:
        """Kill a machine (a ``Machine`` or its name) at once, as a crash would."""
        name = getattr(machine, "name", machine)
        handle = self._handles.get(name)
        if handle is None:
            raise ConfigError(f"no machine named {name!r} on this test system")
        from .. import _loop

        _loop.get_loop().call_soon_threadsafe(
            handle.end, f"machine {name} was killed by the test system"
        )

    async def shutdown(self) -> None:
        for h in self._handles.values():
            h.end(f"machine {h.name} was stopped")
        self._handles.clear()
