"""Start-up progress: what the launcher shows while packages build and machines start.

On a terminal a rich status line tracks it all (packaging, uploads with bytes, machines
starting and running); otherwise each step is one plain line on stderr
(``bigmrun: m2 RUNNING at 10.77.0.13:40123``). Off unless enabled (the launcher enables
it; ``BIGMRUN_PROGRESS=1`` or ``0`` forces it).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any


def enabled() -> bool:
    v = os.environ.get("BIGMRUN_PROGRESS")
    if v is not None:
        return v not in ("0", "false", "no", "")
    return os.environ.get("BIGMRUN_LAUNCHER") == "1"


class Progress:
    """Thread-safe progress sink; every method is cheap and safe to call when off."""

    def __init__(self, on: bool | None = None) -> None:
        self.on = enabled() if on is None else on
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._uploads: dict[str, tuple[int, int]] = {}
        self._note = ""
        self._live: Any = None
        self._tty = self.on and sys.stderr.isatty()

    # events
    def note(self, text: str) -> None:
        """A step worth a line (packaging done, host probed...)."""
        if not self.on:
            return
        with self._lock:
            self._note = text
        self._emit(text)

    def machine(self, name: str, state: str, detail: str = "") -> None:
        if not self.on:
            return
        with self._lock:
            self._states[name] = state
        self._emit(f"{name} {state}" + (f" {detail}" if detail else ""))

    def upload(self, host: str, sent: int, total: int) -> None:
        if not self.on:
            return
        with self._lock:
            first = host not in self._uploads
            self._uploads[host] = (sent, total)
        if not self._tty and (first or sent >= total):
            self._emit(f"upload to {host}: {sent / 1e6:.1f}/{total / 1e6:.1f} MB")
        elif self._tty:
            self._refresh()

    # output
    def _summary(self) -> str:
        with self._lock:
            states = list(self._states.values())
            ups = dict(self._uploads)
            note = self._note
        parts = []
        if states:
            running = states.count("RUNNING")
            parts.append(f"machines {running}/{len(states)} running")
            stopped = states.count("STOPPED")
            if stopped:
                parts.append(f"{stopped} failed")
        for host, (sent, total) in ups.items():
            if sent < total:
                parts.append(f"upload {host} {100 * sent / max(total, 1):.0f}%")
        if note and not parts:
            parts.append(note)
        return ", ".join(parts)

    def _emit(self, line: str) -> None:
        if self._tty:
            self._refresh()
            return
        try:
            sys.stderr.write(f"bigmrun: {line}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _refresh(self) -> None:
        try:
            if self._live is None:
                from rich.console import Console
                from rich.status import Status

                self._live = Status(self._summary(), console=Console(stderr=True))
                self._live.start()
            else:
                self._live.update(self._summary())
        except Exception:
            self._tty = False

    def done(self) -> None:
        """Machines are up (or failed): clear the live line."""
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            except Exception:
                pass
