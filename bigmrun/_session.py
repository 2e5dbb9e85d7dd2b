"""B: a bigmrun session. Starts machines, keeps them alive, shuts them down.

How this works
--------------
On the driver, ``B`` owns the session's certificate authority and its own TLS leaf.
``B.start(n)`` creates ``n`` :class:`Machine` objects and returns them at once; each is
brought up concurrently on the I/O loop: the system launches it (handing over its own
leaf), the driver connects with mutual TLS, installs the services (``init`` hooks run
there), and the machine becomes RUNNING. A keepalive task per machine then beats every
``system.keepalive_interval``; the machine exits by itself if beats stop for
``system.keepalive_timeout``. A machine whose process ends is STOPPED at once.

On a machine, ``B`` has the machine's own leaf: ``bigmrun.current()`` returns it inside
a service so machines can ``dial`` each other.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import ssl
import threading
import time
import weakref
from typing import Any

from . import _loop
from ._machine import Machine, State
from ._output import Output
from ._progress import Progress
from .backends import System, get_system
from .backends._base import BootSpec
from .errors import BigmrunError, ConfigError, StartError
from .rpc._codec import dumps
from .rpc._tls import CertificateAuthority, Leaf, client_context

_live_sessions: weakref.WeakSet[B] = weakref.WeakSet()


def _default_nmach() -> int:
    raw = os.environ.get("BIGMRUN_NMACH", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"BIGMRUN_NMACH={raw!r} is not a whole number") from None
    return n


class B:
    """A bigmrun session (the driver's handle, or a machine's own).

    Use as a context manager: leaving the block shuts the session down.
    """

    def __init__(self, system: System | str | None = None, *, is_driver: bool = True,
                 leaf: Leaf | None = None, session_id: str | None = None,
                 name: str = "driver", output: Output | None = None,
                 chaos: bool | None = None) -> None:
        if is_driver:
            from ._supervisor import is_machine_process, serve_forever

            if is_machine_process():  # B(...) on a machine serves, as bigmrun.start() does
                serve_forever()
        self._system = get_system(system)
        self._is_driver = is_driver
        #: Whether machines accept injected network faults (bigmrun.testing's chaos).
        self.chaos_enabled = (os.environ.get("BIGMRUN_CHAOS") == "1") if chaos is None \
            else chaos
        if self.chaos_enabled:  # frames may be dropped or cut: sum streams (_connection)
            from .rpc._faults import TABLE

            TABLE.checksums = True
        self.name = name
        self.session_id = session_id or secrets.token_hex(6)
        self._ca: CertificateAuthority | None = None
        if leaf is None:
            if not is_driver:
                raise ConfigError("a machine's B needs its leaf certificate")
            self._ca = CertificateAuthority(self.session_id)
            leaf = self._ca.issue("driver")
        self._leaf = leaf
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._machines: list[Machine] = []
        self._counter = 0
        self._shutdown = False
        self.output = output or Output()
        self.started_at = time.time()
        self._supervisor: Any = None
        from .vars import Registry, default_registry

        #: This participant's cluster variables (see ``bigmrun.vars``).
        self.vars: Registry = default_registry() if is_driver else Registry()
        self.debug: Any = None
        self.progress = Progress(None if is_driver else False)
        self._system.progress = self.progress
        if is_driver:
            _live_sessions.add(self)
            self._start_debug_server()

    def __repr__(self) -> str:
        role = "driver" if self._is_driver else f"machine {self.name}"
        return f"<bigmrun.B {role} session={self.session_id} system={self._system.name}>"

    def _start_debug_server(self) -> None:
        if os.environ.get("BIGMRUN_DEBUG_SERVER", "1") in ("0", "false", "no"):
            return
        from .debug import sessions
        from .debug.server import DebugServer

        self.output.log_dir = os.path.join(sessions.state_dir(), "logs", self.session_id)
        try:
            self.debug = DebugServer(self)
            self.debug.start()
        except OSError as e:  # e.g. no loopback: run without it rather than fail
            import logging

            logging.getLogger("bigmrun").warning("debug server not started: %s", e)
            self.debug = None

    # --- properties -------------------------------------------------------------------

    @property
    def is_driver(self) -> bool:
        """True in the driver process; False on a machine."""
        return self._is_driver

    @property
    def system(self) -> System:
        """The system this session starts machines on."""
        return self._system

    def machines(self) -> list[Machine]:
        """A snapshot of the machines this B knows (started or dialed)."""
        with self._lock:
            return list(self._machines)

    def _client_ssl(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = client_context(self._leaf)
        return self._ssl

    def _attach_supervisor(self, sup: Any) -> None:
        self._supervisor = sup

    # --- starting machines ------------------------------------------------------------

    def start(self, n: int | None = None, services: dict[str, Any] | None = None,
              env: dict[str, str] | None = None) -> list[Machine]:
        """Start ``n`` machines with ``services`` installed; return them at once.

        The machines start in parallel; they are STARTING when returned. Use
        ``m.wait(State.RUNNING)`` (then check ``m.err``), or just call them: calls wait
        for the machine to run. ``n=None`` uses the launcher's ``--nmach`` (default 1).
        ``env`` adds environment variables to each machine's process.
        """
        if not self._is_driver:
            raise ConfigError("only the driver can start machines (this is a machine)")
        if self._shutdown:
            raise ConfigError("this session was shut down; create a new one to start more")
        if n is None:
            n = _default_nmach()
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(f"n must be a whole number of machines, got {n!r}")
        if n < 1:
            raise ConfigError(f"n must be at least 1 (got {n}): start(n) starts n machines")
        services = dict(services or {})
        for key in services:
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"service name {key!r} must be a Python identifier")
            if key == "Supervisor":
                raise ConfigError("'Supervisor' is reserved for bigmrun's built-in service")
        env = {str(k): str(v) for k, v in (env or {}).items()}
        # Pickle once, here: an unpicklable service fails at the call site, by name.
        blobs = {name: dumps(svc, f"service {name!r} ({type(svc).__name__})")
                 for name, svc in services.items()}
        assert self._ca is not None
        machines = []
        with self._lock:
            for _ in range(n):
                m = Machine(self, f"m{self._counter}", owned=True)
                self._counter += 1
                machines.append(m)
                self._machines.append(m)
        specs = [
            BootSpec(m.name, self.session_id, self._ca.issue(m.name),
                     self._system.keepalive_timeout, env,
                     dict(self._system.boot_settings(), chaos=self.chaos_enabled))
            for m in machines
        ]
        loop = _loop.get_loop()
        for m, spec in zip(machines, specs, strict=True):
            # STARTING before they are returned (as documented); no one can wait on
            # these machines yet, so advancing here, off the loop thread, is safe.
            m._advance(State.STARTING)
            loop.call_soon_threadsafe(self._begin, m, spec, blobs)
        return machines

    def _progress_update(self, m: Machine) -> None:
        if not self.progress.on:
            return
        if m.state == State.RUNNING:
            self.progress.machine(m.name, "RUNNING", f"at {m.addr}")
        elif m.state == State.STOPPED:
            self.progress.machine(m.name, "STOPPED", f"({m.err})" if m.err else "")
        if all(x.state >= State.RUNNING for x in self.machines() if x.owned):
            self.progress.done()

    def _begin(self, m: Machine, spec: BootSpec, blobs: dict[str, bytes]) -> None:
        self.progress.machine(m.name, "STARTING")
        if m.state == State.STARTING:  # not cancelled meanwhile
            asyncio.get_running_loop().create_task(self._bring_up_reported(m, spec, blobs))

    async def _bring_up_reported(self, m: Machine, spec: BootSpec,
                                 blobs: dict[str, bytes]) -> None:
        try:
            await self._bring_up(m, spec, blobs)
        finally:
            self._progress_update(m)

    async def _bring_up(self, m: Machine, spec: BootSpec, blobs: dict[str, bytes]) -> None:
        system = self._system
        # The system enforces start_timeout itself (with a better message: it knows
        # what the machine printed); this outer bound, a little later, is a backstop.
        backstop = system.start_timeout + 5.0
        try:
            handle = await asyncio.wait_for(system.launch(spec, self.output), backstop)
        except Exception as e:
            if isinstance(e, BigmrunError):
                err = e
            elif isinstance(e, asyncio.TimeoutError):
                err = StartError(f"machine {m.name} did not start on {system.name} "
                                 f"within {backstop:g}s")
            else:
                err = StartError(f"machine {m.name} failed to start on {system.name}: "
                                 f"{type(e).__name__}: {e}")
            if err is not e:
                err.__cause__ = e
            m._stop(err)
            return
        m.handle = handle
        m.addr = handle.addr
        m.maxprocs = handle.maxprocs
        handle.exited.add_done_callback(lambda f: m._stop(f.result()))
        if m.state == State.STOPPED:  # cancelled or shut down while launching
            await handle.kill()
            return
        try:
            m.info = await m._acall_loop("Supervisor.info", timeout=system.start_timeout)
            m.maxprocs = int(m.info.get("maxprocs", m.maxprocs))
            await m._acall_loop("Supervisor.install", blobs, timeout=None)
        except Exception as e:
            m._stop(e)
            return
        m.started_at = time.time()
        if m._advance(State.RUNNING):
            m._keepalive_task = asyncio.get_running_loop().create_task(
                m._keepalive(system.keepalive_interval, system.keepalive_timeout))

    def dial(self, addr: str, timeout: float | None = 30.0) -> Machine:
        """Connect to a machine of this session by its address (``host:port``).

        The returned machine is not owned: this B does not keep it alive or stop it.
        Raises NetworkError if it cannot be reached within ``timeout``.
        """
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"address must be 'host:port', got {addr!r}")
        with self._lock:
            m = Machine(self, f"dial:{addr}", owned=False, addr=addr)
            self._machines.append(m)
        _loop.run(self._dial(m), timeout)
        if m.state == State.STOPPED and m.err is not None:
            raise m.err
        return m

    async def _dial(self, m: Machine) -> None:
        m._advance(State.STARTING)
        try:
            m.info = await m._acall_loop("Supervisor.info", timeout=30.0)
        except Exception as e:
            m._stop(e)
            return
        m.maxprocs = int(m.info.get("maxprocs", 1))
        m._advance(State.RUNNING)

    # --- shutting down ----------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every machine this B started and release the system. Idempotent."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            machines = list(self._machines)
        if not self._is_driver:
            return
        _live_sessions.discard(self)
        try:
            _loop.run(self._ashutdown(machines), timeout + 5 + self._system.shutdown_timeout)
        except Exception:
            pass
        if self.chaos_enabled:
            # Faults are per process and keyed by name: do not let this session's
            # chaos leak into the next session's machines of the same names.
            from .rpc._faults import TABLE

            TABLE.forget({m.name for m in machines if m.owned})

    async def _ashutdown(self, machines: list[Machine]) -> None:
        owned = [m for m in machines if m.owned and m.state != State.STOPPED]

        async def ask_exit(m: Machine) -> None:
            if m.state == State.RUNNING:
                try:
                    await m._acall_loop("Supervisor.exit", 0, timeout=1.0)
                except Exception:
                    pass
            m._stop(None)
            if m.handle is not None:
                await m.handle.kill(timeout=5.0)

        await asyncio.gather(*(ask_exit(m) for m in owned), return_exceptions=True)
        for m in machines:
            if not m.owned:
                m._stop(None)
        await self._system.shutdown()
        if self.debug is not None:
            self.debug.stop()
        self.output.close()

    def __enter__(self) -> B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@atexit.register
def _shutdown_all() -> None:
    for b in list(_live_sessions):
        b.shutdown()
