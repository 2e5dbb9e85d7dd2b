"""Machine output on the driver: whole lines, prefixed with the machine's name.

Each line is written with one ``write`` under a lock, so lines of two machines never
interleave mid-line. Prefixes are coloured when the driver's stderr is a terminal (and
``NO_COLOR`` is not set). Every line also gets a sequence number and is kept in memory
(the last ``keep`` lines per machine) and, when ``log_dir`` is set, appended to
``<log_dir>/<machine>.log``, so ``bigmrun logs`` can read and follow it after the fact.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from typing import IO, NamedTuple, TextIO

_COLOURS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)
KEEP_LINES = 10_000


class Line(NamedTuple):
    """One line of machine output."""

    seq: int
    time: float
    machine: str
    stream: str
    text: str


class Output:
    """Delivers machine output to ``stream`` (default: the driver's stderr)."""

    def __init__(self, stream: TextIO | None = None, keep: int = KEEP_LINES,
                 log_dir: str | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._colour: dict[str, int] = {}
        self._keep = keep
        self._seq = 0
        self.lines: dict[str, deque[Line]] = {}
        self.log_dir = log_dir
        self._files: dict[str, IO[str]] = {}

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

    def _file(self, machine: str) -> IO[str] | None:
        f = self._files.get(machine)
        if f is None and self.log_dir is not None:
            try:
                os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
                f = open(os.path.join(self.log_dir, f"{machine}.log"), "a",  # noqa: SIM115
                         buffering=1, encoding="utf-8", errors="replace")
            except OSError:
                self.log_dir = None
                return None
            self._files[machine] = f
        return f

    def line(self, machine: str, stream: str, data: bytes) -> None:
        text = data.decode(errors="replace").rstrip("\r\n")
        with self._lock:
            self._seq += 1
            buf = self.lines.get(machine)
            if buf is None:
                buf = self.lines[machine] = deque(maxlen=self._keep)
            buf.append(Line(self._seq, time.time(), machine, stream, text))
            f = self._file(machine)
            if f is not None:
                with contextlib.suppress(OSError, ValueError):
                    f.write(text + "\n")
            target = self._target()
            try:
                target.write(self._prefix(machine, target) + text + "\n")
                target.flush()
            except (OSError, ValueError):
                pass  # the driver's stderr is closed: keep the lines in memory only

    def tail(self, machine: str, n: int = 20) -> list[str]:
        with self._lock:
            return [ln.text for ln in list(self.lines.get(machine, ()))[-n:]]

    def since(self, seq: int = 0, machine: str | None = None,
              n: int | None = None) -> list[Line]:
        """Lines after sequence number ``seq`` (of one machine, or all interleaved)."""
        with self._lock:
            if machine is not None:
                pool = [ln for ln in self.lines.get(machine, ()) if ln.seq > seq]
            else:
                pool = sorted((ln for buf in self.lines.values() for ln in buf if ln.seq > seq),
                              key=lambda ln: ln.seq)
        return pool[-n:] if n is not None else pool

    @property
    def last_seq(self) -> int:
        return self._seq

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                with contextlib.suppress(OSError):
                    f.close()
            self._files.clear()
