"""The remote half of the bootstrap: STANDARD LIBRARY ONLY, Python 3.7+.

The SSH and EC2 systems run this file on a host with nothing installed but a Python,
feeding its source on stdin (``python3 - SUBCOMMAND ARGS``; :func:`source` returns it)
or running it as a file. It never imports bigmrun (only :func:`check`, which runs on
the driver, does). Every subcommand prints one JSON object on stdout.

``probe [--cache DIR]``
    The host's Python (version, implementation, executable, ABI), platform
    (``sysconfig.get_platform()``), CPU architecture and count, hostname, free disk
    space in the cache, and ``packages``: the digests of the packages already in
    ``<cache>/packages/`` -- the driver uploads only what is missing.

``launch --package DIGEST|PATH --boot FILE [--cache DIR] [--python EXE] [--name NAME]
[--timeout S] [-- ARGS...]``
    Start one machine from a package, detached, and report its address.

The boot flow (what the SSH system does for each machine)
---------------------------------------------------------
1. ``probe``; :func:`check` the reply against the package (Python minor version,
   platform and ABI when it has native extensions) and fail early with the fix.
2. Upload ``<digest>.pyz`` to ``<cache>/packages/`` (to a temporary name, then rename)
   unless ``probe`` listed it.
3. Write the machine's boot record (``BootSpec.boot_record(bind=..., advertise=...,
   env=spec.env)``: it holds the machine's own TLS key, never the CA's) to a file
   created with mode 0600.
4. ``launch``: it reads the record and deletes the file at once, refusing a record that
   group or others can read; marks the record ``"detached": true`` (the supervisor
   then ignores end-of-file on its boot pipe, which here only means the launcher
   exited, and relies on keepalives alone); starts ``PYTHON -I -u PACKAGE ARGS`` in a
   new session with stdin from /dev/null and stdout and stderr appended to
   ``<cache>/logs/<session>-<name>.log``, so it outlives the SSH session; writes the
   record into the machine's boot pipe ($BIGMRUN_BOOT_FD) and closes it, keeping no
   descriptor of the machine's open; waits (bounded by ``--timeout``) for the
   machine's report on its control pipe ($BIGMRUN_CTL_FD); prints
   ``{"ok": true, "addr", "pid", "maxprocs", "log", ...}`` and exits. If the machine
   dies or the time runs out first (the machine is then killed), it prints
   ``{"ok": false, "error", "log", "tail"}`` with the end of the machine's log.
5. The driver connects to ``addr`` with mutual TLS and sends keepalives; when they stop
   for longer than the machine's keepalive timeout, the machine exits by itself.

Record fields used here: ``env`` (extra environment variables for the machine),
``session`` and ``name`` (for the log's name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .package import Package

BOOT_FD_ENV = "BIGMRUN_BOOT_FD"
CTL_FD_ENV = "BIGMRUN_CTL_FD"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: What the fix is, in every interpreter mismatch message.
FIX = "pass --python PATH for a matching interpreter on the host, or use a matching image/AMI"


def cache_root(given: str | None = None) -> str:
    """The host's bigmrun cache: ``given``, ``$BIGMRUN_CACHE`` or ``~/.cache/bigmrun``."""
    root = given or os.environ.get("BIGMRUN_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "bigmrun")


def source() -> str:
    """This module's source, to run as ``python3 - ...`` on a host."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        return f.read()


def platform_key(plat: str) -> str:
    """The part of a ``sysconfig.get_platform()`` string that binary wheels depend on."""
    if plat.startswith("macosx-"):  # macosx-11.0-arm64: the OS version is not binding
        return "macosx-" + plat.rsplit("-", 1)[-1]
    return plat


# --- probe ---------------------------------------------------------------------------


def oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (``oom_kill`` in /proc/vmstat), if any."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def probe(cache: str | None = None) -> dict[str, Any]:
    """Facts about this host and its Python, and the packages its cache holds."""
    root = cache_root(cache)
    pkg_dir = os.path.join(root, "packages")
    try:
        names = os.listdir(pkg_dir)
    except OSError:
        names = []
    packages = sorted(n[:-4] for n in names if n.endswith(".pyz") and _DIGEST.match(n[:-4]))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    existing = root
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    return {
        "ok": True,
        "python": platform.python_version(),
        "version_info": list(sys.version_info[:3]),
        "implementation": sys.implementation.name,
        "executable": sys.executable,
        "abi": sysconfig.get_config_var("SOABI") or "",
        "platform": sysconfig.get_platform(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "cache": root,
        "free_bytes": free,
        "packages": packages,
    }


# --- launch --------------------------------------------------------------------------


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _read_boot(path: str) -> dict[str, Any]:
    """Read and delete the boot record file; refuse one others could have read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise LaunchError(f"cannot open the boot record {path}: {e}") from e
    try:
        os.unlink(path)
    except OSError:
        pass
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise LaunchError(
                f"refusing the boot record {path}: it holds a private key, so it must be owned "
                f"by this user with mode 0600 (it is {st.st_mode & 0o777:o})")
        data = f.read()
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise LaunchError(f"the boot record {path} is not JSON: {e}") from e
    if not isinstance(record, dict):
        raise LaunchError(f"the boot record {path} is not a JSON object")
    return record


class LaunchError(Exception):
    """``launch`` could not start the machine; the message says why."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "machine"


def launch(package: str, boot: str, *, cache: str | None = None, python: str | None = None,
           name: str | None = None, args: list[str] | tuple[str, ...] = (),
           timeout: float = 60.0) -> dict[str, Any]:
    """Start a machine detached from ``package`` with the boot record in file ``boot``.

    Returns the machine's report plus ``ok``, ``pid``, ``log`` and ``package``, or
    ``{"ok": False, "error", "log", "tail"}``. See the module notes for the details.
    """
    root = cache_root(cache)
    try:
        record = _read_boot(boot)  # read and delete first, whatever else goes wrong
    except LaunchError as e:
        return {"ok": False, "error": str(e)}
    pkg = package if (os.sep in package or package.endswith(".pyz")) else \
        os.path.join(root, "packages", package + ".pyz")
    if not os.path.isfile(pkg):
        return {"ok": False, "error": f"no package {pkg} on {socket.gethostname()}"}
    record["detached"] = True
    name = name or str(record.get("name") or "machine")
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    log = os.path.join(log_dir, "{}-{}.log".format(_safe(str(record.get("session", "x"))),
                                                   _safe(name)))
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    boot_r, boot_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (record.get("env") or {}).items()})
    env.update({BOOT_FD_ENV: str(boot_r), CTL_FD_ENV: str(ctl_w), "BIGMRUN_CACHE": root,
                "BIGMRUN_MACHINE_NAME": name, "BIGMRUN_PROGRAM_CWD": "1",
                "PYTHONUNBUFFERED": "1"})
    cmd = [python or sys.executable, "-I", "-u", os.path.abspath(pkg), *args]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=subprocess.STDOUT, env=env, cwd=root,
                                pass_fds=(boot_r, ctl_w), close_fds=True,
                                start_new_session=True)
    except OSError as e:
        for fd in (boot_r, boot_w, ctl_r, ctl_w, log_fd):
            os.close(fd)
        return {"ok": False, "error": f"cannot run {cmd[0]}: {e}", "log": log}
    for fd in (boot_r, ctl_w, log_fd):
        os.close(fd)
    base = {"pid": proc.pid, "log": log, "package": pkg, "name": name}
    try:
        os.write(boot_w, (json.dumps(record) + "\n").encode())
    except OSError:
        pass  # it died already: reported below
    finally:
        os.close(boot_w)
    try:
        report = _await_report(ctl_r, proc, timeout)
    except LaunchError as e:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        return dict(base, ok=False, error=str(e), tail=_tail(log))
    finally:
        os.close(ctl_r)
    out: dict[str, Any] = dict(base, **report)
    out["ok"] = True
    out["oom_kills"] = oom_kills()  # the host's OOM-kill count now, to compare at its end
    out["pid"] = proc.pid
    proc.returncode = 0  # we leave it running on purpose: keep Popen from warning
    return out


def _await_report(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchError(f"the machine did not report its address within {timeout:g}s "
                              "(killed it)")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise LaunchError("the machine closed its control pipe without reporting "
                                  "(killed it)") from None
            how = (f"killed by signal {-code}" if code < 0
                   else f"exited with status {code}")
            raise LaunchError(f"the machine {how} before it started serving (did the program "
                              "reach bigmrun.start()?)")
        buf += chunk
    report = json.loads(buf.decode())
    if not isinstance(report, dict):
        raise LaunchError(f"the machine sent a malformed report: {buf[:200]!r}")
    return report


# --- the driver-side check -----------------------------------------------------------


def check(probed: dict[str, Any], package: Package | None = None) -> None:
    """Raise ``bigmrun.errors.ConfigError`` when the host's Python cannot run ``package``.

    ``probed`` is what ``probe`` printed on the host. A different Python minor version
    (or implementation) always fails; a different platform or ABI fails when the package
    has native extensions (without ``package``, the driver's own interpreter is assumed,
    with native extensions). The message names both sides and the fix. Driver side only.
    """
    from ..errors import ConfigError

    if package is not None:
        want_version = package.python_version
        want_impl, want_plat = package.implementation, package.platform
        want_abi, native = package.abi, package.native
    else:
        want_version = (sys.version_info[0], sys.version_info[1])
        want_impl, want_plat = sys.implementation.name, sysconfig.get_platform()
        want_abi, native = sysconfig.get_config_var("SOABI") or "", True
    have = tuple(probed.get("version_info") or (0, 0))[:2]
    host = probed.get("hostname") or "the host"
    there = "{} {} ({}, {}) at {}".format(
        probed.get("implementation", "?"), probed.get("python", "?"),
        probed.get("platform", "?"), probed.get("abi") or "?", probed.get("executable", "?"))
    here = "{} {}.{} ({}, {})".format(want_impl, want_version[0], want_version[1], want_plat,
                                      want_abi or "?")
    problem = None
    if have != tuple(want_version) or probed.get("implementation") != want_impl:
        problem = "another Python version"
    elif native and (platform_key(str(probed.get("platform"))) != platform_key(want_plat)
                     or (want_abi and probed.get("abi") and probed.get("abi") != want_abi)):
        problem = "another platform or ABI, and the package has native extensions"
    if problem:
        raise ConfigError(
            f"{host} has {there}, but the driver's package needs {here} ({problem}): "
            f"{FIX}")


# --- command line --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmrun-remote",
                                     description="bigmrun's remote bootstrap (stdlib only)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("probe", help="print the host's Python, platform and cached packages")
    p.add_argument("--cache", help="bigmrun cache directory (default ~/.cache/bigmrun)")
    p = sub.add_parser("launch", help="start a machine from a package, detached")
    p.add_argument("--cache", help="bigmrun cache directory (default ~/.cache/bigmrun)")
    p.add_argument("--package", required=True, help="package digest (in the cache) or path")
    p.add_argument("--boot", required=True, help="boot record file (mode 0600; deleted)")
    p.add_argument("--python", help="interpreter for the machine (default: this one)")
    p.add_argument("--name", help="machine name (default: the record's)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the program's arguments")
    ns = parser.parse_args(argv)
    if ns.command == "probe":
        out = probe(ns.cache)
    elif ns.command == "launch":
        args = list(ns.args)
        if args[:1] == ["--"]:
            args = args[1:]
        out = launch(ns.package, ns.boot, cache=ns.cache, python=ns.python, name=ns.name,
                     args=args, timeout=ns.timeout)
    else:
        parser.print_usage(sys.stderr)
        return 2
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
