"""Session files: how the ``bigmrun`` commands find running drivers.

Each driver writes ``<state dir>/sessions/<session id>.json`` (directory 0700, file
0600: it holds the debug server's token) with its pid, process start time, debug URL
and token. A file whose process is gone (or whose pid now belongs to another process:
the start time differs) is stale: :func:`running_sessions` removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any


def state_dir() -> str:
    """``$BIGMRUN_STATE_DIR``, else ``$XDG_STATE_HOME/bigmrun``, else ~/.local/state/bigmrun."""
    given = os.environ.get("BIGMRUN_STATE_DIR")
    if given:
        return os.path.abspath(os.path.expanduser(given))
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "bigmrun")


def sessions_dir() -> str:
    return os.path.join(state_dir(), "sessions")


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


@dataclass
class SessionInfo:
    """What a session file records. ``token`` is a secret: never print it."""

    session: str
    pid: int
    started: float
    url: str
    token: str
    system: str
    program: str
    proc_start: float | None = None

    def __repr__(self) -> str:
        return f"SessionInfo(session={self.session!r}, pid={self.pid}, url={self.url!r})"

    def path(self) -> str:
        return os.path.join(sessions_dir(), f"{self.session}.json")

    def alive(self) -> bool:
        if self.proc_start is None:
            return _process_start(self.pid) is not None
        start = _process_start(self.pid)
        return start is not None and abs(start - self.proc_start) < 1.0


def write(info: SessionInfo) -> str:
    """Write the session file privately (0600 in a 0700 directory); return its path."""
    d = sessions_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    info.proc_start = _process_start(info.pid)
    path = info.path()
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    os.replace(tmp, path)
    return path


def remove(session: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(sessions_dir(), f"{session}.json"))


def running_sessions() -> list[SessionInfo]:
    """Every session whose driver is alive, oldest first; stale files are removed."""
    d = sessions_dir()
    out: list[SessionInfo] = []
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                data: dict[str, Any] = json.load(f)
            info = SessionInfo(**data)
        except (OSError, ValueError, TypeError):
            continue
        if info.alive():
            out.append(info)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return sorted(out, key=lambda s: s.started)


def find(session: str | None) -> list[SessionInfo]:
    """Running sessions matching an id prefix (all of them if ``session`` is None)."""
    sessions = running_sessions()
    if session is None:
        return sessions
    return [s for s in sessions if s.session.startswith(session)]


def now() -> float:
    return time.time()
