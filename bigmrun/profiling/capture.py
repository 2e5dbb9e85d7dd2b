"""Machine side: profile this very process with py-spy for a few seconds.

How this works
--------------
:func:`profile_self` runs ``py-spy record --pid <own pid> --duration S --format raw``
into a temporary file and returns the collapsed stacks. py-spy reads the process's
memory with ptrace (``process_vm_readv``, and ``PTRACE_ATTACH`` to pause it unless
``nonblocking``), so the kernel must let it:

* **Yama** (``kernel.yama.ptrace_scope``, 1 on most distributions) lets a process trace
  only its own descendants. py-spy is our *child*, tracing its *parent*: refused. So
  py-spy is started behind a gate (``/bin/sh -c 'read _; exec py-spy ...'``): once its
  pid is known, this process calls ``prctl(PR_SET_PTRACER, pid)`` (through ctypes),
  which names that one process as allowed to trace us, then opens the gate; the shell
  ``exec``\\ s py-spy under the same pid. The exception is removed when py-spy ends.
  This is narrower than ``PR_SET_PTRACER_ANY`` (any process of the user, for the
  duration). Without Yama, ``prctl`` fails with EINVAL and nothing more is needed.
* ``ptrace_scope`` 2 (admin only) or 3 (no attach), a process that is not dumpable, a
  container without ``SYS_PTRACE``, or a different user: py-spy says "Permission
  Denied" and :class:`PtraceDeniedError` says what to grant: run as the same user with
  ``kernel.yama.ptrace_scope=0`` or give py-spy CAP_SYS_PTRACE.

Finding py-spy (:func:`find_py_spy`): ``$BIGMRUN_PY_SPY``; the ``bin/`` of the package's
extracted environment on a remote host (``bigmrun.bootstrap.package`` ships the driver
virtualenv's py-spy there); beside ``sys.executable`` (a virtualenv's ``bin/``); the
file list of the installed ``py-spy`` distribution (``pip install --user``); the
interpreter's scripts directory; ``$PATH``.

Only one py-spy runs per process at a time: a request that arrives while one runs with
the same options shares its result (the in-process test system's machines all live in
one process); one with other options waits for it to finish first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any

from ..errors import BigmrunError

#: prctl(2) option: allow one process (or any, see below) to ptrace the caller (Yama).
PR_SET_PTRACER = 0x59616D61
#: ``PR_SET_PTRACER`` argument allowing every process (of the same user).
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
#: py-spy's default and bigmrun's default sampling rate (samples per second).
DEFAULT_RATE = 100
#: Extra seconds py-spy gets beyond its duration (startup, writing its output) before
#: it is killed as stuck.
SLACK = 30.0
#: Longest profile one request may ask for.
MAX_SECONDS = 3600

YAMA_SCOPE_FILE = "/proc/sys/kernel/yama/ptrace_scope"


class ProfileError(BigmrunError):
    """A profile could not be taken (py-spy missing, failed, or timed out)."""


class PtraceDeniedError(ProfileError):
    """py-spy was not allowed to read the process (ptrace permission)."""


def _executable(path: str | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def _package_env_bin() -> str | None:
    """``<env dir>/bin`` when running from an extracted bigmrun package (remote hosts):
    bigmrun is then ``<env dir>/src/bigmrun`` or ``<env dir>/spN/bigmrun``."""
    if not os.environ.get("BIGMRUN_PACKAGE"):
        return None
    import bigmrun

    pkg = os.path.dirname(os.path.abspath(bigmrun.__file__))
    return os.path.join(os.path.dirname(os.path.dirname(pkg)), "bin")


def _from_distribution() -> str | None:
    try:
        from importlib import metadata

        files = metadata.distribution("py-spy").files or []
    except Exception:
        return None
    for f in files:
        if f.name in ("py-spy", "py-spy.exe"):
            found = _executable(str(f.locate()))
            if found:
                return os.path.abspath(found)
    return None


def find_py_spy() -> str:
    """The py-spy executable to run (see the module notes for the search order)."""
    override = os.environ.get("BIGMRUN_PY_SPY")
    if override:
        found = _executable(override) or _executable(shutil.which(override))
        if found is None:
            raise ProfileError(f"BIGMRUN_PY_SPY={override!r} is not an executable file")
        return found
    env_bin = _package_env_bin()
    candidates = [
        os.path.join(env_bin, "py-spy") if env_bin else None,
        os.path.join(os.path.dirname(sys.executable), "py-spy"),
    ]
    for c in candidates:
        found = _executable(c)
        if found:
            return found
    found = _from_distribution()
    if found:
        return found
    scripts = sysconfig.get_path("scripts")
    found = _executable(os.path.join(scripts, "py-spy")) if scripts else None
    found = found or _executable(shutil.which("py-spy"))
    if found:
        return found
    raise ProfileError(
        f"py-spy is not installed where this machine runs (host {socket.gethostname()}, "
        f"Python {sys.executable}). Install it into that environment: "
        f"`{sys.executable} -m pip install py-spy` (bigmrun depends on it; a package "
        "built from a virtualenv that has py-spy carries it to remote hosts), or set "
        "BIGMRUN_PY_SPY to its path.")


def yama_scope() -> int | None:
    """``kernel.yama.ptrace_scope`` (None without Yama)."""
    try:
        with open(YAMA_SCOPE_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def set_ptracer(pid: int) -> bool:
    """``prctl(PR_SET_PTRACER, pid)``: let ``pid`` ptrace this process under Yama
    (``0`` clears it, :data:`PR_SET_PTRACER_ANY` allows any process). Returns False
    where there is nothing to set (not Linux, or no Yama: EINVAL)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_PTRACER, pid, 0, 0, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False  # no Yama: the default ptrace rules already allow our child
    raise OSError(err, f"prctl(PR_SET_PTRACER, {pid}): {os.strerror(err)}")


def _is_ptrace_denied(stderr: str) -> bool:
    s = stderr.lower()
    return ("permission denied" in s or "operation not permitted" in s
            or "os error 1)" in s or "os error 13)" in s)


def _grant_advice(py_spy: str) -> str:
    scope = yama_scope()
    where = f"kernel.yama.ptrace_scope is {scope}" if scope is not None else "no Yama LSM"
    return (
        f"py-spy was not allowed to ptrace process {os.getpid()} on host "
        f"{socket.gethostname()} (uid {os.getuid()}, {where}). Grant it one of: run the "
        "machine as the same user with kernel.yama.ptrace_scope=0 or 1 (`sudo sysctl "
        "kernel.yama.ptrace_scope=0`; with 1, bigmrun allows its own py-spy child via "
        f"prctl(PR_SET_PTRACER)), or give py-spy CAP_SYS_PTRACE (`sudo setcap "
        f"cap_sys_ptrace+ep {py_spy}`; in a container: --cap-add SYS_PTRACE). A process "
        "that made itself non-dumpable cannot be profiled without CAP_SYS_PTRACE.")


def _tail(text: str, lines: int = 12) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()
            and not ln.startswith(("py-spy> ", "Stack backtrace", "   "))]
    return "\n".join(kept[-lines:])


def _run_py_spy(seconds: int, rate: int, native: bool, idle: bool, nonblocking: bool,
                lines: bool) -> dict[str, Any]:
    py_spy = find_py_spy()
    fd, out_path = tempfile.mkstemp(prefix="bigmrun-profile-", suffix=".txt")
    os.close(fd)
    args = [py_spy, "record", "--pid", str(os.getpid()), "--duration", str(seconds),
            "--format", "raw", "--output", out_path, "--rate", str(rate)]
    if native:
        args.append("--native")
    if idle:
        args.append("--idle")
    if nonblocking:
        args.append("--nonblocking")
    if not lines:
        args.append("--function")
    gate = os.path.exists("/bin/sh") and sys.platform.startswith("linux")
    argv = ["/bin/sh", "-c", 'read -r _ || true; exec "$0" "$@"', *args] if gate else args
    t0 = time.monotonic()
    try:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if gate else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:
            raise ProfileError(f"cannot run py-spy ({py_spy}): {e}") from e
        allowed = False
        try:
            allowed = set_ptracer(proc.pid)
        except OSError:
            pass  # py-spy then reports the denial, and we explain it
        try:
            try:  # writing the line opens the gate: py-spy starts, now allowed to trace us
                _, err_bytes = proc.communicate(b"go\n" if gate else None,
                                                timeout=seconds + SLACK)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise ProfileError(f"py-spy did not finish a {seconds}s profile within "
                                   f"{seconds + SLACK:g}s; killed it") from None
        finally:
            if allowed:
                with contextlib.suppress(OSError):
                    set_ptracer(0)
        stderr = err_bytes.decode(errors="replace")
        if proc.returncode != 0:
            if _is_ptrace_denied(stderr):
                raise PtraceDeniedError(_grant_advice(py_spy) + f" py-spy said: {_tail(stderr)}")
            raise ProfileError(f"py-spy ({py_spy}) exited with status {proc.returncode}: "
                               f"{_tail(stderr) or '(no message)'}")
        try:
            with open(out_path, encoding="utf-8", errors="replace") as f:
                collapsed = f.read()
        except FileNotFoundError:
            collapsed = ""  # py-spy writes nothing when it got no sample
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    from .stacks import parse_collapsed, total

    return {
        "collapsed": collapsed,
        "samples": total(parse_collapsed(collapsed)),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "seconds": seconds,
        "rate": rate,
        "elapsed": time.monotonic() - t0,
        "py_spy": py_spy,
    }


_lock = threading.Lock()
_current: tuple[tuple[Any, ...], Future[dict[str, Any]]] | None = None


def profile_self(seconds: float, rate: int = DEFAULT_RATE, native: bool = False,
                 idle: bool = False, nonblocking: bool = False,
                 lines: bool = False) -> dict[str, Any]:
    """Profile this process for ``seconds`` (rounded up to whole seconds: py-spy's unit).

    Frames are functions (``fn (file.py:FIRST_LINE)``, py-spy's ``--function``), so a
    function is one frame however many of its lines ran; ``lines`` keeps py-spy's
    default of one frame per line being run (``fn (file.py:LINE)``).

    Returns ``{"collapsed": TEXT, "samples": N, "pid", "host", "seconds", "rate",
    "elapsed", "py_spy"}``. Raises :class:`PtraceDeniedError` when the kernel refuses
    py-spy, :class:`ProfileError` for any other failure.
    """
    global _current
    try:
        secs = max(1, math.ceil(float(seconds)))
        rate = int(rate)
    except (TypeError, ValueError):
        raise ProfileError(f"bad profile duration or rate: {seconds!r}, {rate!r}") from None
    if secs > MAX_SECONDS:
        raise ProfileError(f"a profile lasts at most {MAX_SECONDS}s (asked: {secs}s)")
    if not 1 <= rate <= 10000:
        raise ProfileError(f"the sampling rate must be 1..10000 per second (asked: {rate})")
    key = (secs, rate, bool(native), bool(idle), bool(nonblocking), bool(lines))
    deadline = time.monotonic() + 2 * (secs + SLACK)
    while True:
        with _lock:
            if _current is None:
                fut: Future[dict[str, Any]] = Future()
                _current = (key, fut)
                break
            running_key, running = _current
        if running_key == key:
            return running.result(timeout=secs + SLACK)
        # Another profile with other options is running: only one py-spy at a time.
        with contextlib.suppress(Exception):
            running.result(timeout=max(0.1, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise ProfileError("another profile of this process is still running")
    try:
        result = _run_py_spy(*key)
    except BaseException as e:
        fut.set_exception(e)
        raise
    else:
        fut.set_result(result)
        return result
    finally:
        with _lock:
            _current = None


__all__ = ["ProfileError", "PtraceDeniedError", "find_py_spy", "profile_self", "set_ptracer",
           "yama_scope"]
