"""The threads that run a machine's blocking (``def``) service methods.

A ``ThreadPoolExecutor`` makes a ``Future``, a work item and a semaphore round per
task (~10 µs here), which the RPC server never needs: a call answers for itself. This
pool takes ``(fn, args)`` onto one ``SimpleQueue`` and starts threads on demand, up to
its maximum, with one invariant: every task put is matched either by a thread that is
waiting for work or by a new thread, so a task never waits while the pool could still
grow (a method that waits for another call of its machine cannot starve it unless the
pool is full).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bigmrun.rpc")


class Workers:
    """A lean thread pool: ``run(fn, *args)``, no futures."""

    def __init__(self, max_workers: int, name: str = "bigmrun-worker") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._name = name
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work that no task was matched with yet
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker thread; exceptions are logged, not raised."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            self._q.put((fn, args))
            if self._idle:
                self._idle -= 1
                return
            if self._threads >= self.max_workers:
                return  # full: the task waits for the next free thread
            self._threads += 1
            n = self._threads
        threading.Thread(target=self._work, name=f"{self._name}_{n}", daemon=True).start()

    def _work(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:
                log.exception("a worker task failed")
            del item, fn, args
            with self._lock:
                if self._closed:
                    return
                self._idle += 1

    def shutdown(self) -> None:
        """Stop taking tasks, drop the queued ones; threads end after their current task."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        for _ in range(threads):
            self._q.put(None)
