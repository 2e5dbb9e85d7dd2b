"""The local system: each machine is an OS process on this host (the default system).

How this works
--------------
Each machine is the same program started again (see ``bootstrap.program``) with two
pipes: the *boot* pipe (driver -> machine) carries the boot record, including the
machine's private key, and then stays open for as long as the driver lives, so a
machine notices a dead driver at once by end-of-file, even before keepalives lapse;
the *control* pipe (machine -> driver) carries back the address the machine bound
(port 0: no port races) and its CPU count. Standard output and error are pipes read
line by line on the driver, prefixed with the machine's name. A thread waits for the
process to end and reports how it ended (exit status or signal) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Any

from ..bootstrap.program import Program
from ..errors import MachineLostError, StartError
from . import _affinity
from ._base import BootSpec, MachineHandle, OutputSink, System, default_keepalive_timeout
from ._oom import oom_kill_count, was_oom_killed


def describe_exit(name: str, returncode: int) -> str:
    """Human wording for how a machine process ended."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return f"machine {name} was killed by {sig}"
    reasons = {3: " (no keepalive from the driver)", 4: " (the driver went away)"}
    return f"machine {name} exited with status {returncode}{reasons.get(returncode, '')}"


class LocalHandle(MachineHandle):
    def __init__(self, name: str, proc: subprocess.Popen[bytes], boot_w: int,
                 loop: asyncio.AbstractEventLoop, output: OutputSink) -> None:
        self.name = name
        self.proc = proc
        self.addr = ""
        self.maxprocs = 1
        self._boot_w = boot_w
        self._loop = loop
        self.exited = loop.create_future()
        self.tail: deque[str] = deque(maxlen=20)
        self.killed = False  # by us: not an OOM kill
        self.oom_baseline = oom_kill_count(proc.pid)  # last output lines, for start errors
        self._readers = [
            threading.Thread(target=self._read, args=(proc.stdout, "stdout", output),
                             name=f"bigmrun-{name}-stdout", daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, "stderr", output),
                             name=f"bigmrun-{name}-stderr", daemon=True),
        ]
        for t in self._readers:
            t.start()
        threading.Thread(target=self._wait, name=f"bigmrun-{name}-wait", daemon=True).start()

    def _read(self, pipe: IO[bytes] | None, stream: str, output: OutputSink) -> None:
        assert pipe is not None
        with contextlib.suppress(ValueError, OSError):
            for line in iter(pipe.readline, b""):
                self.tail.append(line.decode(errors="replace").rstrip("\n"))
                output.line(self.name, stream, line)
        with contextlib.suppress(OSError):
            pipe.close()

    def _wait(self) -> None:
        code = self.proc.wait()
        # Deliver every line the machine wrote before reporting its end.
        for t in self._readers:
            t.join(timeout=2.0)
        with contextlib.suppress(OSError):
            os.close(self._boot_w)
        oom = (code == -signal.SIGKILL and not self.killed
               and was_oom_killed(self.proc.pid, self.oom_baseline))
        if oom:
            message = (f"machine {self.name} was killed by the kernel's OOM killer: it ran "
                       f"out of memory (SIGKILL). Give it more memory or make it use less.")
        else:
            message = describe_exit(self.name, code)
        err = MachineLostError(message, machine=self.name)
        err.exit_status = code  # type: ignore[attr-defined]
        err.oom = oom  # type: ignore[attr-defined]
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, self.exited, err)

    async def kill(self, timeout: float = 5.0) -> None:
        self.killed = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.proc.pid}


def _resolve(fut: asyncio.Future[BaseException], err: BaseException) -> None:
    if not fut.done():
        fut.set_result(err)


class LocalSystem(System):
    """Machines as local processes. ``program`` overrides what machines run (argv)."""

    name = "local"

    def __init__(self, keepalive_timeout: float | None = None, keepalive_interval: float = 1.0,
                 start_timeout: float = 60.0, program: Program | None = None,
                 pin_cpus: bool | None = None) -> None:
        self.keepalive_timeout = keepalive_timeout or default_keepalive_timeout()
        self.keepalive_interval = keepalive_interval
        self.start_timeout = start_timeout
        self._program = program
        self._handles: list[LocalHandle] = []
        #: Bind the driver and each machine to CPUs of their own (see ``_affinity``).
        self.pin_cpus = _affinity.pin_option(pin_cpus)
        self._cpus = _affinity.available_cpus() if self.pin_cpus else []
        self._started = 0
        self._pin_lock = threading.Lock()
        self._driver_affinity: dict[int, set[int]] | None = None

    def _machine_cpus(self) -> list[int]:
        """The CPUs of the next machine (empty: not pinned); pins the driver first."""
        if not self._cpus:
            return []
        with self._pin_lock:  # machines are spawned from several threads at once
            if self._driver_affinity is None:
                self._driver_affinity = _affinity.pin_process({self._cpus[0]})
            cpu = _affinity.machine_cpu(self._cpus, self._started)
            self._started += 1
        return [cpu]

    async def launch(self, spec: BootSpec, output: OutputSink) -> MachineHandle:
        loop = asyncio.get_running_loop()
        handle, ctl_r = await loop.run_in_executor(None, self._spawn, spec, output, loop)
        try:
            report = await loop.run_in_executor(None, _read_report, ctl_r, handle,
                                                self.start_timeout)
        except BaseException:
            await handle.kill()
            raise
        handle.addr = report["addr"]
        handle.maxprocs = int(report.get("maxprocs", 1))
        return handle

    def _spawn(self, spec: BootSpec, output: OutputSink,
               loop: asyncio.AbstractEventLoop) -> tuple[LocalHandle, int]:
        prog = self.program()
        boot_r, boot_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        env = dict(os.environ)
        env.update(spec.env)
        env["BIGMRUN_BOOT_FD"] = str(boot_r)
        env["BIGMRUN_CTL_FD"] = str(ctl_w)
        env["PYTHONUNBUFFERED"] = "1"
        env["BIGMRUN_MACHINE_NAME"] = spec.name
        if prog.bare:
            env["PYTHONPATH"] = os.pathsep.join(prog.pythonpath)
        try:
            proc = subprocess.Popen(
                prog.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env, pass_fds=(boot_r, ctl_w), close_fds=True,
            )
        except OSError as e:
            for fd in (boot_r, boot_w, ctl_r, ctl_w):
                os.close(fd)
            raise StartError(f"cannot start machine {spec.name} ({prog.argv[0]}): {e}") from e
        finally:
            pass
        os.close(boot_r)
        os.close(ctl_w)
        record = spec.boot_record(bind="127.0.0.1")
        cpus = self._machine_cpus()
        if cpus:
            record["cpus"] = cpus
        os.write(boot_w, (json.dumps(record) + "\n").encode())
        handle = LocalHandle(spec.name, proc, boot_w, loop, output)
        self._handles.append(handle)
        return handle, ctl_r

    async def shutdown(self) -> None:
        for h in self._handles:
            await h.kill()
        self._handles.clear()
        if self._driver_affinity is not None:
            _affinity.restore(self._driver_affinity)
            self._driver_affinity = None


def _read_report(fd: int, handle: LocalHandle, timeout: float) -> dict[str, Any]:
    """Read the machine's one-line report from the control pipe."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(handle.tail) or "(no output)"
                raise StartError(
                    f"machine {handle.name} did not report its address within {timeout:g}s. "
                    f"Does the program reach bigmrun.start()? Its last output:\n{tail}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                code = handle.proc.wait(timeout=5)
                for t in handle._readers:
                    t.join(timeout=1)
                tail = "\n".join(handle.tail) or "(no output)"
                raise StartError(
                    f"{describe_exit(handle.name, code)} before it started serving. Did the "
                    f"program call bigmrun.start() (and reach it)? Its last output:\n{tail}"
                )
            buf += chunk
    finally:
        os.close(fd)
    return dict(json.loads(bytes(buf)))


__all__ = ["LocalSystem", "describe_exit", "sys"]
