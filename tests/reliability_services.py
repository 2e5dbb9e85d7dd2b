"""Services for the reliability, fuzz and security tests (importable on local machines)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from typing import Any


class Worker:
    """Counts how many times each call token ran, to prove at-most-once execution."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.lock = threading.Lock()

    def run(self, token: str, value: Any = None) -> Any:
        with self.lock:
            self.runs[token] = self.runs.get(token, 0) + 1
        return value

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.runs)

    def echo(self, x: Any) -> Any:
        return x

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def pid(self) -> int:
        return os.getpid()

    def rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def sink(self, f: Any) -> tuple[int, str]:
        """Read a streamed argument; return its length and sha256."""
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return n, h.hexdigest()
            n += len(chunk)
            h.update(chunk)


class CirclePI:
    """bigpi's service: count the samples that fall inside the circle."""

    def sample(self, n: int) -> int:
        r = random.Random().random
        inside = 0
        for _ in range(n):
            x = r() - 0.5
            y = r() - 0.5
            if x * x + y * y < 0.25:
                inside += 1
        return inside


def tripwire(path: str) -> str:
    """Runs only when a :class:`Tripwire` is unpickled (never for a refused peer)."""
    with open(path, "a") as f:
        f.write("unpickled\n")
    return "tripped"


class Tripwire:
    """Unpickling this creates (appends to) ``path``: proof that bytes were decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (tripwire, (self.path,))


class Secrets:
    """Hands back a machine's own key material (so the test knows what must not leak)."""

    def leaf(self) -> dict[str, str]:
        import bigmrun

        return bigmrun.current()._leaf.to_dict()

    def noisy(self) -> str:
        import logging
        import sys

        print("machine stdout line", flush=True)
        print("machine stderr line", file=sys.stderr, flush=True)
        logging.getLogger("bigmrun").warning("machine log line")
        raise RuntimeError("a failing method, to exercise the error path")
