"""The machine side: serve the installed services, watch keepalives, report stats.

How this works
--------------
A machine is the user's own program, started by a system with ``BIGMRUN_BOOT_FD`` in
its environment. When the program calls ``bigmrun.start()``, :func:`serve_forever`
takes over: it reads its boot record (name, its own TLS leaf, the CA certificate,
keepalive timeout) from the boot file descriptor, listens with mutual TLS on port 0,
reports the address it got on the control descriptor, and serves until

* the driver's keepalives stop for longer than the timeout (:class:`Watchdog`), or
* the boot descriptor reaches end-of-file: the driver process is gone (local system;
  not for a machine whose boot record says ``"detached": true``, which the remote
  bootstrap starts to outlive its SSH session), or
* the driver calls ``Supervisor.exit``.

When the keepalives stopped (exit status :data:`EXIT_KEEPALIVE_LOST`) and the boot
record's system settings name an ``on_keepalive_loss`` command (an argv list), the
machine runs it just before exiting: the EC2 system sets ``sudo -n poweroff`` there, so
an instance whose driver vanished powers off (and, with shutdown behaviour
"terminate", is gone) instead of running up a bill.

Then the process exits with ``os._exit``: the rest of the user's program (the driver
part) never runs on a machine. The in-process test system runs the same
:class:`Supervisor` without a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _loop
from ._context import process_b
from .errors import NoSuchMethodError, SerializationError
from .rpc._codec import loads
from .rpc._server import Dispatcher, Handler, Server
from .rpc._tls import Leaf, server_context
from .rpc._workers import Workers

#: Worker threads serving regular (``def``) method calls on one machine.
DEFAULT_CALL_THREADS = 256
#: A machine's exit status when it heard no keepalive for longer than its timeout.
EXIT_KEEPALIVE_LOST = 3


class Watchdog:
    """Tracks keepalives; ``expired()`` once none came for ``timeout`` seconds.

    Time is injected (``clock``) so tests can drive it without sleeping.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last = clock()

    def beat(self, timeout: float | None = None) -> None:
        if timeout is not None:
            self.timeout = timeout
        self._last = self._clock()

    def silent_for(self) -> float:
        return self._clock() - self._last

    def expired(self) -> bool:
        return self.silent_for() > self.timeout


def public_methods(service: Any) -> list[str]:
    """Names callable as ``"Service.<name>"``: public, callable, and not ``init``."""
    names = []
    for name in dir(service):
        if name.startswith("_") or name == "init":
            continue
        try:
            attr = getattr(service, name)
        except Exception:
            continue
        if callable(attr):
            names.append(name)
    return names


def _machine_info() -> dict[str, Any]:
    try:
        maxprocs = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        maxprocs = os.cpu_count() or 1
    return {
        "pid": os.getpid(),
        "maxprocs": maxprocs,
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


class SupervisorService:
    """Built-in service ``Supervisor``: what the driver calls to manage a machine."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    async def keepalive(self, timeout: float | None = None) -> float:
        """Reset the watchdog (optionally with a new timeout); returns the timeout."""
        self._sup.watchdog.beat(timeout)
        return self._sup.watchdog.timeout

    async def ping(self) -> str:
        return self._sup.name

    def info(self) -> dict[str, Any]:
        """Process id, CPU count, hostname, Python version and platform."""
        return _machine_info()

    def install(self, blobs: dict[str, bytes]) -> list[str]:
        """Unpickle and install services, then run their ``init(b)`` hooks, in order."""
        return self._sup.install(blobs)

    def mem_info(self) -> dict[str, Any]:
        import psutil

        vm = psutil.virtual_memory()._asdict()
        proc = psutil.Process().memory_info()._asdict()
        return {"system": vm, "process": proc}

    def disk_info(self, path: str | None = None) -> dict[str, Any]:
        import tempfile

        import psutil

        return {"path": path or tempfile.gettempdir(),
                "usage": psutil.disk_usage(path or tempfile.gettempdir())._asdict()}

    def load_info(self) -> dict[str, Any]:
        one, five, fifteen = os.getloadavg()
        return {"load1": one, "load5": five, "load15": fifteen,
                "cpus": _machine_info()["maxprocs"]}

    async def chaos(self, links: list[tuple[str, str, dict[str, Any] | None]]) -> int:
        """Set this machine's network faults (only in a session that allows chaos).

        ``links`` holds (local, peer, faults) with ``local`` this machine's name; faults
        None clears a link. Returns how many links now have faults here.
        """
        from .rpc._faults import TABLE, Faults

        if not self._sup.chaos_allowed:
            raise PermissionError(
                f"chaos is not enabled on {self._sup.name}: start the session with "
                f"chaos=True (bigmrun.testing does) to inject network faults")
        for local, peer, faults in links:
            if local != self._sup.name:
                raise ValueError(f"{self._sup.name} can only set its own links, not {local}")
            TABLE.set(local, peer, Faults(**faults) if faults else None)
        TABLE.apply(asyncio.get_running_loop())
        return len(TABLE.links())

    def stats(self) -> dict[str, Any]:
        """One sample for the driver's monitor: CPU, memory, disk, network, load, the
        cluster variables and per-method RPC statistics of this machine."""
        return self._sup.stats()

    def profile(self, seconds: float, native: bool = False, idle: bool = False,
                rate: int = 100, nonblocking: bool = False,
                lines: bool = False) -> dict[str, Any]:
        """Profile this machine's process with py-spy for ``seconds``: its collapsed
        stacks and sample count (see :mod:`bigmrun.profiling.capture`)."""
        from .profiling.capture import profile_self

        return profile_self(seconds, rate=rate, native=native, idle=idle,
                            nonblocking=nonblocking, lines=lines)

    async def exit(self, code: int = 0) -> None:
        """Exit the machine shortly after replying."""
        asyncio.get_running_loop().call_later(0.05, self._sup.exit, code,
                                              "driver asked the machine to exit")


class Supervisor(Dispatcher):
    """Hosts services for one machine and serves them over mutual TLS."""

    def __init__(
        self,
        name: str,
        leaf: Leaf,
        keepalive_timeout: float,
        b: Any,
        on_exit: Callable[[int, str], None],
        clock: Callable[[], float] = time.monotonic,
        threads: int = DEFAULT_CALL_THREADS,
        chaos: bool = False,
    ) -> None:
        #: Whether the driver may inject network faults here (``Supervisor.chaos``).
        self.chaos_allowed = chaos
        if chaos:  # frames may be dropped or cut here: sum streams (see _connection)
            from .rpc._faults import TABLE

            TABLE.checksums = True
        self.name = name
        self.leaf = leaf
        self.b = b
        self.watchdog = Watchdog(keepalive_timeout, clock)
        self.executor = Workers(threads, name=f"bigmrun-{name}")
        self.services: dict[str, Any] = {"Supervisor": SupervisorService(self)}
        self._handlers: dict[str, Handler] = {}
        self._on_exit = on_exit
        self._exited = False
        self.server = Server(self, self.executor, b)
        self._proc: Any = None
        self._watch_task: asyncio.Task[None] | None = None

    # Dispatcher
    def lookup(self, method: str) -> Handler:
        h = self._handlers.get(method)
        if h is not None:
            return h
        svc_name, dot, meth = method.partition(".")
        if not dot or not meth:
            raise NoSuchMethodError(
                f"{method!r} is not of the form 'Service.method' (on {self.name})"
            )
        svc = self.services.get(svc_name)
        if svc is None:
            known = sorted(self.services)
            hint = difflib.get_close_matches(svc_name, known, 1)
            raise NoSuchMethodError(
                f"no service {svc_name!r} on {self.name}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (installed: {', '.join(known)})"
            )
        names = public_methods(svc)
        if meth not in names:
            hint = difflib.get_close_matches(meth, names, 1)
            raise NoSuchMethodError(
                f"service {svc_name!r} on {self.name} has no public method {meth!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (methods: {', '.join(names) or 'none'})"
            )
        h = Handler.of(_checked(getattr(svc, meth), method))
        self._handlers[method] = h
        return h

    def stats(self) -> dict[str, Any]:
        import tempfile

        import psutil

        if self._proc is None:
            self._proc = psutil.Process()
            self._proc.cpu_percent(None)  # the first reading is always 0: prime it
        proc = self._proc
        with proc.oneshot():
            cpu = proc.cpu_percent(None)
            mem = proc.memory_info()
            threads = proc.num_threads()
        vm = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(tempfile.gettempdir())
            disk_used, disk_total = disk.used, disk.total
        except OSError:
            disk_used = disk_total = 0
        net = psutil.net_io_counters()
        load1, load5, load15 = os.getloadavg()
        from .vars import Registry

        reg = getattr(self.b, "vars", None)
        return {
            "cpu_percent": cpu, "rss": mem.rss, "threads": threads,
            "mem_total": vm.total, "mem_available": vm.available, "mem_percent": vm.percent,
            "disk_used": disk_used, "disk_total": disk_total,
            "net_sent": net.bytes_sent if net else 0, "net_recv": net.bytes_recv if net else 0,
            "load1": load1, "load5": load5, "load15": load15,
            "vars": reg.snapshot() if isinstance(reg, Registry) else {},
            "rpc": self.server.stats.snapshot(),
        }

    def install(self, blobs: dict[str, bytes]) -> list[str]:
        from ._context import current_b

        token = current_b.set(self.b)
        try:
            new: dict[str, Any] = {}
            for name, blob in blobs.items():
                if name in self.services:
                    raise ValueError(f"service {name!r} is already installed on {self.name}")
                new[name] = loads(blob, f"service {name!r}")
            for name, svc in new.items():
                init = getattr(svc, "init", None)
                self.services[name] = svc
                if callable(init):
                    init(self.b)
            return sorted(new)
        finally:
            current_b.reset(token)

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        await self.server.start(host, port, server_context(self.leaf))
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        return self.server.host, self.server.port

    async def _watch(self) -> None:
        while not self._exited:
            # A fine period: the machine should be gone within the timeout of the
            # driver's last keepalive, not a coarse check period later.
            await asyncio.sleep(min(0.1, self.watchdog.timeout / 20))
            if self.watchdog.expired():
                self.exit(
                    EXIT_KEEPALIVE_LOST,
                    f"no keepalive from the driver for {self.watchdog.silent_for():.1f}s "
                    f"(timeout {self.watchdog.timeout:g}s): the driver is gone or cut off",
                )

    def exit(self, code: int, reason: str) -> None:
        if self._exited:
            return
        self._exited = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._on_exit(code, reason)

    def kill(self) -> None:
        """Stop serving at once, dropping every connection (the test system's kill)."""
        self._exited = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        self.server.abort_all()
        self.executor.shutdown()


def _checked(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wrap ``fn`` so that a call with wrong arguments says what the signature is."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn

    def explain(args: tuple[Any, ...], kwargs: dict[str, Any], e: TypeError) -> TypeError:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as bind_error:
            return TypeError(f"wrong arguments for {method}{sig}: {bind_error}")
        return e

    if inspect.iscoroutinefunction(fn):
        async def acheck(*args: Any, **kwargs: Any) -> Any:
            try:
                coro = fn(*args, **kwargs)  # binds the arguments; runs none of the body
            except TypeError as e:
                raise explain(args, kwargs, e) from None
            return await coro

        return acheck
    if inspect.isasyncgenfunction(fn):
        return fn

    def check(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            # Only blame the arguments when they really do not bind.
            if e.__traceback__ is not None and e.__traceback__.tb_next is None:
                raise explain(args, kwargs, e) from None
            raise

    return check


# --- process entry ---------------------------------------------------------------------

BOOT_FD_ENV = "BIGMRUN_BOOT_FD"
CTL_FD_ENV = "BIGMRUN_CTL_FD"


def is_machine_process() -> bool:
    """True when this process was started by a system to be a machine."""
    return BOOT_FD_ENV in os.environ


def _read_line(fd: int) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def serve_forever() -> None:
    """Become this process's machine supervisor; never returns (exits the process)."""
    boot_fd = int(os.environ.pop(BOOT_FD_ENV))
    ctl_fd = int(os.environ.pop(CTL_FD_ENV, "-1"))
    line = _read_line(boot_fd)
    if not line:
        os._exit(2)  # the driver went away before telling us who we are
    boot = json.loads(line)
    if boot.get("cpus"):  # the local system's pin_cpus: before any thread of ours starts
        from .backends._affinity import pin_process

        pin_process(set(boot["cpus"]))
    from ._session import B
    from .backends import system_from_boot

    leaf = Leaf.from_dict(boot["leaf"])
    system = system_from_boot(boot)
    b = B(system, is_driver=False, leaf=leaf, session_id=boot["session"], name=boot["name"])
    process_b[0] = b
    done = threading.Event()
    exit_code = [0]

    def on_exit(code: int, reason: str) -> None:
        exit_code[0] = code
        try:
            if code:
                print(f"bigmrun: machine {boot['name']} exiting: {reason}", file=sys.stderr)
        except Exception:
            pass  # stderr is a pipe to the driver, which may be gone (BrokenPipeError)
        finally:
            done.set()  # exit whatever happens: a machine must never outlive its driver

    sup = Supervisor(boot["name"], leaf, float(boot["keepalive_timeout"]), b, on_exit,
                     chaos=bool((boot.get("system") or {}).get("chaos")))
    b._attach_supervisor(sup)
    host, port = _loop.run(sup.start(boot.get("bind", "127.0.0.1"), int(boot.get("port", 0))))
    report = {"addr": f"{boot.get('advertise') or host}:{port}", **_machine_info()}
    if ctl_fd >= 0:
        os.write(ctl_fd, (json.dumps(report) + "\n").encode())
        os.close(ctl_fd)
    else:
        print("BIGMRUN-READY " + json.dumps(report), flush=True)

    def watch_driver() -> None:
        # The driver holds the write end of the boot descriptor; EOF means it is gone.
        with contextlib.suppress(OSError):
            while os.read(boot_fd, 4096):
                pass
        _loop.get_loop().call_soon_threadsafe(
            sup.exit, 4, "the driver process is gone (boot channel closed)"
        )

    if boot.get("detached"):
        # Started detached by the remote bootstrap (SSH, EC2): the launcher wrote the
        # record and exited, so end-of-file here says nothing about the driver. Only
        # keepalives tell whether it is still there.
        os.close(boot_fd)
    else:
        threading.Thread(target=watch_driver, name="bigmrun-driver-watch",
                         daemon=True).start()
    done.wait()
    loss_command = (boot.get("system") or {}).get("on_keepalive_loss")
    if exit_code[0] == EXIT_KEEPALIVE_LOST and loss_command:
        _run_on_keepalive_loss(boot["name"], loss_command)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(exit_code[0])


def _run_on_keepalive_loss(name: str, command: list[str]) -> None:
    """Run the system's ``on_keepalive_loss`` command (bounded: 60 s), reporting failures."""
    import shlex
    import subprocess

    try:
        print(f"bigmrun: machine {name}: running on_keepalive_loss: {shlex.join(command)}",
              file=sys.stderr, flush=True)
        status = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=60).returncode
        if status:
            print(f"bigmrun: machine {name}: on_keepalive_loss exited with status {status}",
                  file=sys.stderr, flush=True)
    except Exception as e:  # the machine exits regardless
        with contextlib.suppress(Exception):
            print(f"bigmrun: machine {name}: on_keepalive_loss failed: {e}", file=sys.stderr,
                  flush=True)


__all__ = ["SerializationError", "Supervisor", "Watchdog", "is_machine_process", "serve_forever"]
