"""The process's I/O loop: one asyncio event loop on a daemon thread.

All connections, servers and timers of bigmrun live on this loop; user threads hand it
work with :func:`submit` (or ``loop.call_soon_threadsafe``) and wait on
``concurrent.futures`` futures. The loop keeps the RPC layer's state and reads the
connections; what other threads do themselves (``rpc._transport``) is *write* whole
frames (a call's request when its connection is idle, a reply from the worker that
made it) and, while they would otherwise only wait, *read*: a blocking call its own
reply, a worker the next request. That spares the loop thread's wake-ups on each call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import BigmrunError

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _quiet_handshake_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A client without a session certificate fails the TLS handshake; that is a refusal
    # working as intended, not an error worth a traceback on the machine's stderr.
    exc = context.get("exception")
    msg = str(context.get("message", ""))
    if isinstance(exc, (ConnectionError, OSError)) or "handshake" in msg.lower():
        logging.getLogger("bigmrun.rpc").debug("refused connection: %s (%s)", msg, exc)
        return
    loop.default_exception_handler(context)


def get_loop() -> asyncio.AbstractEventLoop:
    """The I/O loop, started on first use."""
    global _loop, _thread
    loop = _loop
    if loop is not None:
        return loop
    with _lock:
        if _loop is None:
            raise_open_file_limit()
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_handshake_errors)
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="bigmrun-io", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def raise_open_file_limit(cap: int = 1 << 20) -> int:
    """Raise this process's soft limit of open files to its hard limit (at most
    ``cap``), as Go's runtime does: each connection holds two descriptors (its socket
    and the epoll set its reading is handed through) and each local machine its pipes,
    so the usual soft limit of 1,024 would cap a driver at a few hundred machines.
    Returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return int(soft)


def in_loop_thread() -> bool:
    """True when called from the I/O loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule a coroutine on the I/O loop from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the I/O loop and wait for its result (not from the loop)."""
    if in_loop_thread():
        coro.close()
        raise BigmrunError(
            "a blocking bigmrun call was made on the I/O event loop; inside an async "
            "service method use the async form (e.g. `await m.acall(...)`)"
        )
    return submit(coro).result(timeout)
