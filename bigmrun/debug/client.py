"""What the ``bigmrun ps`` and ``bigmrun logs`` commands do (talking to debug servers).

Sessions are found through their session files; each request carries the session's
token. Logs of a session that has ended are read from the files its driver wrote.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from . import sessions
from .sessions import SessionInfo


def get(info: SessionInfo, path: str, timeout: float = 10.0, **params: Any) -> Any:
    """GET a debug route of a running session; returns the decoded JSON."""
    import requests

    r = requests.get(info.url + path, params={k: v for k, v in params.items() if v is not None},
                     headers={"Authorization": f"Bearer {info.token}"}, timeout=timeout)
    if r.status_code != 200:
        try:
            msg = r.json().get("error", r.text)
        except ValueError:
            msg = r.text
        raise ConfigError(f"session {info.session}: {msg}")
    return r.json() if r.headers.get("Content-Type", "").startswith("application/json") \
        else r.content


def pick_sessions(session: str | None) -> list[SessionInfo]:
    found = sessions.find(session)
    if session is not None and not found:
        running = ", ".join(s.session for s in sessions.running_sessions()) or "none"
        raise ConfigError(f"no running session matches {session!r} (running: {running})")
    return found


def pick_one(session: str | None) -> SessionInfo:
    found = pick_sessions(session)
    if not found:
        raise ConfigError("no bigmrun session is running (start a program that calls "
                          "bigmrun.start(); or pass --session ID for a finished one)")
    if len(found) > 1:
        listing = "\n  ".join(f"{s.session}  pid {s.pid}  {s.program}" for s in found)
        raise ConfigError(f"{len(found)} sessions are running; pick one with --session ID:"
                          f"\n  {listing}")
    return found[0]


def ps_rows(session: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for info in pick_sessions(session):
        try:
            rows.extend(get(info, "/api/machines"))
        except Exception as e:  # the driver ended meanwhile: say so, go on
            rows.append({"session": info.session, "machine": "-", "state": "UNREACHABLE",
                         "error": str(e)})
    return rows


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


PS_COLUMNS = ("SESSION", "MACHINE", "ADDRESS", "SYSTEM", "STATE", "UPTIME", "CPU%", "MEMORY",
              "LOAD", "CALLS", "LAST ERROR")


def _ps_cells(r: dict[str, Any]) -> list[str]:
    mem = _human_bytes(r.get("rss"))
    if r.get("mem_high"):
        mem += f" HIGH({r.get('mem_percent', 0):.0f}%)"
    cpu = r.get("cpu_percent")
    load = r.get("load1")
    return [
        str(r.get("session", ""))[:12], str(r.get("machine", "")), str(r.get("addr") or "-"),
        str(r.get("system", "-")), str(r.get("state", "?")), _human_secs(r.get("uptime")),
        "-" if cpu is None else f"{cpu:.0f}", mem, "-" if load is None else f"{load:.2f}",
        str(r.get("calls_in_flight", "-")), (r.get("error") or "")[:100],
    ]


def render_ps(rows: list[dict[str, Any]]) -> None:
    """A rich table on a terminal; aligned plain columns otherwise (for grep and awk)."""
    cells = [_ps_cells(r) for r in rows]
    if not sys.stdout.isatty():
        table = [list(PS_COLUMNS), *cells]
        widths = [max(len(row[i]) for row in table) for i in range(len(PS_COLUMNS))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in PS_COLUMNS:
        t.add_column(col, overflow="fold")
    styles = {"RUNNING": "green", "STOPPED": "red", "STARTING": "yellow"}
    for row in cells:
        state = row[4]
        row[4] = f"[{styles[state]}]{state}[/]" if state in styles else state
        if "HIGH(" in row[7]:
            row[7] = row[7].replace("HIGH(", "[bold red]HIGH(") + "[/]"
        t.add_row(*row)
    Console().print(t)


def _finished_log_dir(session: str) -> str | None:
    base = os.path.join(sessions.state_dir(), "logs")
    try:
        names = [n for n in os.listdir(base) if n.startswith(session)]
    except OSError:
        return None
    if len(names) > 1:
        raise ConfigError(f"--session {session!r} matches several sessions: {', '.join(names)}")
    return os.path.join(base, names[0]) if names else None


def read_logs(machine: str | None, n: int | None, session: str | None, follow: bool,
              poll: float = 0.5) -> Iterator[tuple[str, str]]:
    """Yield (machine, line) from a running session (following it if asked) or, for a
    session that has ended, from the files its driver kept."""
    running = sessions.find(session)
    if not running and session is not None:
        d = _finished_log_dir(session)
        if d is None:
            raise ConfigError(f"no running or finished session matches {session!r}")
        yield from _read_files(d, machine, n)
        return
    info = pick_one(session)
    data = get(info, "/api/logs", machine=machine, n=n)
    for _, _, m, _, text in data["lines"]:
        yield m, text
    last = data["last"]
    while follow:
        time.sleep(poll)
        try:
            data = get(info, "/api/logs", machine=machine, since=last)
        except Exception:
            return  # the driver ended: its output ended with it
        for _, _, m, _, text in data["lines"]:
            yield m, text
        last = max(last, data["last"])


def _read_files(d: str, machine: str | None, n: int | None) -> Iterator[tuple[str, str]]:
    names = sorted(f[:-4] for f in os.listdir(d) if f.endswith(".log"))
    if machine is not None:
        if machine not in names:
            raise ConfigError(f"no log for machine {machine!r} (have: {', '.join(names)})")
        names = [machine]
    for name in names:
        with open(os.path.join(d, f"{name}.log"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        for line in lines[-n:] if n else lines:
            yield name, line


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
