"""Service classes used by the conformance and local-system tests.

They live in an importable module (not in a test file) because under pytest a local
machine runs ``python -m bigmrun.machine`` with the driver's ``sys.path``: it can
unpickle ``services.Counter`` but not a class defined in a test module's namespace
that pytest imported under a different name.

State that a test inspects lives on the service instance (i.e. on the machine), and is
read back with another call, so the same test works on the in-process test system and
on local processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import bigmrun

MiB = 1024 * 1024


# --- deterministic byte streams (driver and machine produce the same bytes) ------------

def _base_block(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def blocks(n: int, size: int = MiB, seed: int = 7) -> Iterator[bytes]:
    """``n`` blocks of ``size`` bytes, each distinct (its index is stamped in front)."""
    base = _base_block(seed, size)
    for i in range(n):
        yield i.to_bytes(8, "big") + base[8:]


def blocks_sha256(n: int, size: int = MiB, seed: int = 7) -> str:
    h = hashlib.sha256()
    for b in blocks(n, size, seed):
        h.update(b)
    return h.hexdigest()


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# --- errors ---------------------------------------------------------------------------

class CustomError(Exception):
    """An error type importable on both sides (so it is catchable by cause)."""


class Unpicklable:
    """Neither pickle nor dill can encode this."""

    def __init__(self, label: str = "x") -> None:
        self.label = label

    def __reduce__(self) -> Any:
        raise TypeError(f"Unpicklable({self.label}) refuses to be pickled")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"Unpicklable({self.label}) refuses to be pickled")


class UnpicklableService(Unpicklable):
    def hello(self) -> str:
        return "hello"


# --- plain services --------------------------------------------------------------------

class Counter:
    """Stateful: shipped by value, so the driver's copy never changes."""

    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.inits = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n

    def _secret(self) -> str:  # private: not callable remotely
        return "secret"


class Echo:
    def echo(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def combine(self, a: int, b: int, *, scale: int = 1, offset: int = 0) -> int:
        return (a + b) * scale + offset

    async def acombine(self, a: int, b: int, *, scale: int = 1) -> int:
        await asyncio.sleep(0)
        return (a + b) * scale

    def where(self) -> dict[str, Any]:
        """Which thread and process serve a regular method."""
        return {"thread": threading.current_thread().name, "pid": os.getpid()}

    async def awhere(self) -> dict[str, Any]:
        """Which thread serves an ``async def`` method, and that it runs on a loop."""
        asyncio.get_running_loop()  # raises if not on a loop
        return {"thread": threading.current_thread().name, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()

    def getenv(self, key: str) -> str | None:
        return os.environ.get(key)

    def argv(self) -> list[str]:
        return list(sys.argv)

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def fail_custom(self, message: str) -> None:
        raise CustomError(message)

    async def afail(self, message: str) -> None:
        await asyncio.sleep(0)
        raise KeyError(message)

    def bad_reply(self) -> Any:
        return Unpicklable("reply")

    def inner_type_error(self) -> None:
        # A TypeError raised *inside* the method is not an argument error.
        return len(5)  # type: ignore[arg-type]

    def info(self) -> dict[str, Any]:
        b = bigmrun.current()
        return {"name": b.name, "is_driver": b.is_driver}

    def nofile(self) -> int:
        """This process's soft limit of open files."""
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class WhoAmI:
    """Records what ``init`` saw; counts how often it ran."""

    def __init__(self) -> None:
        self.inits = 0
        self.seen: dict[str, Any] = {}

    def init(self, b: Any) -> None:
        self.inits += 1
        cur = bigmrun.current()
        self.seen = {"name": b.name, "is_driver": b.is_driver, "current_is_b": cur is b,
                     "pid": os.getpid()}

    def report(self) -> dict[str, Any]:
        return {"inits": self.inits, **self.seen,
                "current_name": bigmrun.current().name}


class BadInit:
    def init(self, b: Any) -> None:
        raise RuntimeError("init went boom")

    def hello(self) -> str:
        return "hello"


# --- concurrency, cancellation ---------------------------------------------------------

class Sync:
    """Calls that complete only if they run concurrently with each other."""

    def __init__(self, parties: int = 2) -> None:
        self.parties = parties

    def init(self, b: Any) -> None:
        self._barrier = threading.Barrier(self.parties)
        self._arrived = 0
        self._event: asyncio.Event | None = None

    def meet(self, timeout: float = 20.0) -> str:
        self._barrier.wait(timeout)
        return threading.current_thread().name

    async def ameet(self, timeout: float = 20.0) -> int:
        if self._event is None:
            self._event = asyncio.Event()
        self._arrived += 1
        if self._arrived >= self.parties:
            self._event.set()
        await asyncio.wait_for(self._event.wait(), timeout)
        return self._arrived


class Sleeper:
    """Long calls that record whether the machine saw them cancelled.

    ``status(token)`` is ``"running"`` while the call runs, then ``"cancelled"`` if the
    call noticed its cancellation, or ``"finished"`` if it ran to the end.
    """

    def __init__(self) -> None:
        self.status_by_token: dict[str, str] = {}

    def status(self, token: str) -> str | None:
        return self.status_by_token.get(token)

    def wait_cancel(self, token: str, max_s: float = 30.0) -> str:
        """A blocking method that polls ``bigmrun.cancelled()``."""
        self.status_by_token[token] = "running"
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            if bigmrun.cancelled():
                self.status_by_token[token] = "cancelled"
                return "cancelled"
            time.sleep(0.01)
        self.status_by_token[token] = "finished"
        return "finished"

    async def await_cancel(self, token: str, max_s: float = 30.0) -> str:
        """An async method: cancellation arrives as ``asyncio.CancelledError``."""
        self.status_by_token[token] = "running"
        try:
            await asyncio.sleep(max_s)
        except asyncio.CancelledError:
            self.status_by_token[token] = "cancelled"
            raise
        self.status_by_token[token] = "finished"
        return "finished"

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class Flaky:
    """Drops every connection into this machine on the first call with a token."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def drop_once(self, token: str, data: Any = None) -> int:
        if data is not None and hasattr(data, "read"):
            data.read()
        n = self.calls.get(token, 0) + 1
        self.calls[token] = n
        if n == 1:
            sup = bigmrun.current()._supervisor
            conns = list(sup.server.connections)
            loop = bigmrun._loop.get_loop()

            dropped = threading.Event()

            def drop() -> None:
                for c in conns:
                    c.abort(ConnectionAbortedError("dropped by the Flaky test service"))
                dropped.set()

            loop.call_soon_threadsafe(drop)
            dropped.wait(10)  # the connection is gone before the reply: it is never sent
        return n

    def count(self, token: str) -> int:
        return self.calls.get(token, 0)


# --- streaming -------------------------------------------------------------------------

class Files:
    def __init__(self) -> None:
        self.status_by_token: dict[str, str] = {}

    def sha256(self, f: Any) -> tuple[str, int]:
        """Read a streamed argument to the end; return its sha256 and length."""
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = f.read(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    def sha256_two(self, a: Any, b: Any) -> tuple[str, str]:
        return self.sha256(a)[0], self.sha256(b)[0]

    async def asha256(self, f: Any) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = await f.aread(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    def head(self, f: Any, n: int) -> bytes:
        """Read only the first ``n`` bytes of a stream, and return."""
        return f.read(n)

    def consume(self, token: str, f: Any) -> int:
        """Read a stream until it ends; record how the read ended (see ``status``)."""
        self.status_by_token[token] = "running"
        n = 0
        try:
            while True:
                chunk = f.read(MiB)
                if not chunk:
                    break
                n += len(chunk)
                if bigmrun.cancelled():
                    self.status_by_token[token] = "cancelled"
                    return n
        except Exception as e:
            self.status_by_token[token] = f"stream error {type(e).__name__}"
            raise
        self.status_by_token[token] = "finished"
        return n

    def status(self, token: str) -> str | None:
        return self.status_by_token.get(token)

    def sha256_mem(self, f: Any) -> dict[str, Any]:
        """sha256 of a stream, and how much this process's RSS grew while reading it."""
        h = hashlib.sha256()
        n = 0
        base = peak = rss()
        i = 0
        while True:
            chunk = f.read(MiB)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            i += 1
            if i % 4 == 0:
                peak = max(peak, rss())
        peak = max(peak, rss())
        return {"sha256": h.hexdigest(), "n": n, "growth": peak - base}


class Gen:
    def __init__(self) -> None:
        self.status_by_token: dict[str, str] = {}

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def acount(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def blocks(self, n: int, size: int = MiB, seed: int = 7) -> Iterator[bytes]:
        """``n`` deterministic blocks (see :func:`blocks`)."""
        yield from blocks(n, size, seed)

    def blocks_mem(self, n: int, size: int = MiB, seed: int = 7) -> Iterator[Any]:
        """Like ``blocks``; the last item is this process's RSS growth while streaming."""
        base = peak = rss()
        for i, b in enumerate(blocks(n, size, seed)):
            yield b
            if i % 4 == 0:
                peak = max(peak, rss())
        yield {"growth": max(peak, rss()) - base}

    def head_items(self, f: Any, n: int) -> Iterator[bytes]:
        """A generator that reads only the start of its streamed argument."""
        yield f.read(n)

    def fail_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"generator failed after {n} items")

    def bad_items(self) -> Iterator[Any]:
        yield 1
        yield Unpicklable("item")

    def endless(self, token: str) -> Iterator[bytes]:
        """Yields until the caller stops consuming; records how it ended."""
        self.status_by_token[token] = "running"
        try:
            i = 0
            while True:
                yield i.to_bytes(8, "big") * 8192  # 64 KiB items
                i += 1
        finally:
            self.status_by_token[token] = "closed"

    def status(self, token: str) -> str | None:
        return self.status_by_token.get(token)


# --- machine to machine ----------------------------------------------------------------

class Peer:
    def call_peer(self, addr: str, method: str, *args: Any) -> dict[str, Any]:
        """Dial another machine of the session by address and call it."""
        b = bigmrun.current()
        m = b.dial(addr)
        return {"result": m.call(method, *args), "caller": b.name, "owned": m.owned,
                "peer_state": int(m.state)}


# --- local-system only: crashes --------------------------------------------------------

class Crash:
    def kill_self(self, delay: float = 0.0) -> None:
        if delay:
            time.sleep(delay)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    def exit_now(self, code: int) -> None:
        os._exit(code)
