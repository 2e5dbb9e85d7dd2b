"""Driver side: profile every RUNNING machine at once and merge the stacks.

How this works
--------------
:func:`profile_cluster` asks each selected machine for ``Supervisor.profile`` (which runs
py-spy on the machine's own process, see :mod:`.capture`) concurrently, optionally
profiles the driver process too (``driver=True``, label ``"driver"``), and waits for all
of them, bounded by the duration plus a margin. Machines that live in one process (the
in-process test system) are profiled once, under a joint label such as ``"m0+m1"``, so
samples are not counted twice.

The result is a *bundle*, plain JSON: the collapsed stacks and sample count per
participant, and the error of each one that failed. The debug server serves it as is
(``format=raw``, what ``bigmrun profile`` fetches) or rendered (:func:`render_bundle`):
the stacks of all participants summed into ONE profile (machines kept apart as root
frames with ``by_machine``), as an SVG flamegraph, speedscope JSON or collapsed text.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .capture import DEFAULT_RATE, MAX_SECONDS, SLACK, ProfileError, profile_self
from .render import flamegraph_svg, speedscope
from .stacks import Stacks, merge, parse_collapsed, to_collapsed

if TYPE_CHECKING:
    from .._session import B

#: The formats :func:`render_bundle` produces: name -> (content type, file extension).
FORMATS: dict[str, tuple[str, str]] = {
    "svg": ("image/svg+xml; charset=utf-8", "svg"),
    "speedscope": ("application/json", "speedscope.json"),
    "collapsed": ("text/plain; charset=utf-8", "collapsed.txt"),
}
DRIVER = "driver"


class SelectionError(ProfileError):
    """The request names no machine that can be profiled; ``status`` is the HTTP one."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _message(e: BaseException) -> str:
    from ..errors import RemoteError

    if isinstance(e, RemoteError):
        return e.message
    if isinstance(e, concurrent.futures.TimeoutError):
        return "no reply in time"
    return str(e) or type(e).__name__


def profile_cluster(b: B, seconds: int = 5, *, machine: str | None = None,
                    native: bool = False, idle: bool = False, driver: bool = False,
                    rate: int = DEFAULT_RATE, nonblocking: bool = False,
                    lines: bool = False) -> dict[str, Any]:
    """Profile the RUNNING machines of ``b`` (or just ``machine``) for ``seconds``, all at
    once, plus the driver process when ``driver``. Returns the bundle (module notes).

    Raises :class:`SelectionError` when ``machine`` is unknown or not RUNNING, or when
    there is nothing to profile.
    """
    from .._machine import State

    if not 1 <= seconds <= MAX_SECONDS:
        raise SelectionError(f"seconds must be 1..{MAX_SECONDS}, got {seconds}", 400)
    machines = b.machines()
    skipped: dict[str, str] = {}
    if machine is not None:
        chosen = [m for m in machines if m.name == machine]
        if not chosen:
            names = ", ".join(m.name for m in machines) or "none"
            raise SelectionError(f"no machine {machine!r} in session {b.session_id} "
                                 f"(machines: {names})", 404)
        if chosen[0].state != State.RUNNING:
            raise SelectionError(f"machine {machine} is {chosen[0].state.name}, not RUNNING: "
                                 "only a running machine can be profiled", 409)
    else:
        chosen = [m for m in machines if m.state == State.RUNNING]
        skipped = {m.name: m.state.name for m in machines if m.state != State.RUNNING}
    if not chosen and not driver:
        states = ", ".join(f"{n} {s}" for n, s in skipped.items()) or "no machines"
        raise SelectionError(f"no RUNNING machine to profile in session {b.session_id} "
                             f"({states}); pass --driver to profile the driver alone", 409)
    # One capture per process: machines of the in-process test system share one.
    groups: dict[tuple[str, int], list[str]] = {}
    callers: dict[tuple[str, int], Any] = {}
    for m in chosen:
        info = m.info or {}
        key = (str(info.get("hostname", m.addr)), int(info.get("pid", -1 - len(groups))))
        groups.setdefault(key, []).append(m.name)
        callers.setdefault(key, m)
    here = (socket.gethostname(), os.getpid())
    if driver:
        groups.setdefault(here, []).insert(0, DRIVER)
    opts = {"native": bool(native), "idle": bool(idle), "rate": int(rate),
            "nonblocking": bool(nonblocking), "lines": bool(lines)}
    t0 = time.monotonic()
    futures: dict[str, concurrent.futures.Future[Any]] = {}
    members: dict[str, list[str]] = {}
    for key, group in groups.items():
        label = "+".join(group)
        members[label] = group
        if key in callers and key != here:
            futures[label] = callers[key].submit("Supervisor.profile", seconds,
                                                 timeout=seconds + SLACK + 15, **opts)
        else:  # the driver's own process (and any machine living in it)
            futures[label] = _in_thread(profile_self, seconds, **opts)
    profiles: dict[str, Any] = {}
    errors: dict[str, str] = {}
    deadline = t0 + seconds + SLACK + 20
    for label, fut in futures.items():
        try:
            r = fut.result(timeout=max(0.1, deadline - time.monotonic()))
            profiles[label] = {
                "collapsed": r["collapsed"], "samples": int(r["samples"]),
                "pid": r.get("pid"), "host": r.get("host"),
                "elapsed": r.get("elapsed"), "py_spy": r.get("py_spy"),
                "machines": members[label],
            }
        except Exception as e:
            fut.cancel()
            errors[label] = _message(e)
    return {
        "session": b.session_id, "system": b.system.name, "seconds": seconds,
        "options": opts, "profiles": profiles, "errors": errors, "skipped": skipped,
        "elapsed": time.monotonic() - t0, "time": time.time(),
    }


def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, name="bigmrun-profile-driver", daemon=True).start()
    return fut


def bundle_stacks(bundle: dict[str, Any]) -> dict[str, Stacks]:
    """Each participant's stacks, parsed from a bundle."""
    return {label: parse_collapsed(p["collapsed"]) for label, p in bundle["profiles"].items()}


def merged_stacks(bundle: dict[str, Any], by_machine: bool = False) -> Stacks:
    """ONE profile from a bundle: identical stacks summed across participants."""
    return merge(bundle_stacks(bundle), by_machine=by_machine)


def describe(bundle: dict[str, Any]) -> str:
    """One line: who was profiled, how long, how many samples; what failed."""
    parts = [f"{label} {p['samples']:,}" for label, p in bundle["profiles"].items()]
    opts = bundle.get("options", {})
    flags = [f for f in ("native", "idle", "nonblocking", "lines") if opts.get(f)]
    text = (f"session {bundle['session']} · {bundle['seconds']}s at "
            f"{opts.get('rate', DEFAULT_RATE)} Hz · samples: {', '.join(parts) or 'none'}")
    if flags:
        text += " · " + ", ".join(flags)
    if bundle.get("errors"):
        text += " · failed: " + ", ".join(sorted(bundle["errors"]))
    return text


def render_bundle(bundle: dict[str, Any], fmt: str = "svg",
                  by_machine: bool = False) -> bytes:
    """The merged profile of a bundle as ``svg``, ``speedscope`` or ``collapsed`` bytes."""
    if fmt not in FORMATS:
        raise ProfileError(f"unknown profile format {fmt!r} (formats: {', '.join(FORMATS)})")
    stacks = merged_stacks(bundle, by_machine)
    n = len(bundle["profiles"])
    title = (f"bigmrun profile: {n} participant{'s' if n != 1 else ''}, merged"
             + (" (by machine)" if by_machine else ""))
    if fmt == "svg":
        labels = list(bundle["profiles"]) if by_machine else []
        return flamegraph_svg(stacks, title=title, subtitle=describe(bundle),
                              labels=labels).encode()
    if fmt == "speedscope":
        from .. import __version__

        doc = speedscope(stacks, name=f"{title} · {describe(bundle)}",
                         exporter=f"bigmrun {__version__}")
        return json.dumps(doc, separators=(",", ":")).encode()
    return to_collapsed(stacks).encode()


__all__ = ["FORMATS", "SelectionError", "bundle_stacks", "describe", "merged_stacks",
           "profile_cluster", "render_bundle"]
