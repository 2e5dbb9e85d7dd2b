"""Machine output on the driver: whole lines, prefixed with the machine's name.

Each line is written with one ``write`` under a lock, so lines of two machines never
interleave mid-line. Prefixes are coloured when the driver's stderr is a terminal (and
``NO_COLOR`` is not set). The last lines of each machine are kept in memory (bounded)
so they can be shown after the fact.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import TextIO

_COLOURS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)
KEEP_LINES = 10_000


class Output:
    """Delivers machine output to ``stream`` (default: the driver's stderr)."""

    def __init__(self, stream: TextIO | None = None, keep: int = KEEP_LINES) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._colour: dict[str, int] = {}
        self._keep = keep
        self.lines: dict[str, deque[tuple[float, str, str]]] = {}

    def _target(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _prefix(self, machine: str, target: TextIO) -> str:
        use_colour = (
            "NO_COLOR" not in os.environ and hasattr(target, "isatty") and target.isatty()
        )
        if not use_colour:
            return f"{machine}: "
        c = self._colour.setdefault(machine, _COLOURS[len(self._colour) % len(_COLOURS)])
        return f"\x1b[{c}m{machine}:\x1b[0m "

    def line(self, machine: str, stream: str, data: bytes) -> None:
        text = data.decode(errors="replace").rstrip("\r\n")
        with self._lock:
            buf = self.lines.get(machine)
            if buf is None:
                buf = self.lines[machine] = deque(maxlen=self._keep)
            buf.append((time.time(), stream, text))
            target = self._target()
            try:
                target.write(self._prefix(machine, target) + text + "\n")
                target.flush()
            except (OSError, ValueError):
                pass  # the driver's stderr is closed: keep the lines in memory only

    def tail(self, machine: str, n: int = 20) -> list[str]:
        with self._lock:
            return [t for _, _, t in list(self.lines.get(machine, ()))[-n:]]
