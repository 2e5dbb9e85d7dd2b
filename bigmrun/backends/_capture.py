"""What in-process (test system) machines print, captured per machine.

How this works
--------------
Machines of the test system live in the driver's process and share its
``sys.stdout`` and ``sys.stderr``. While at least one of them exists, both are replaced
by a :class:`StreamProxy`. On each write the proxy asks whose behalf it runs on: the
context variable :data:`bigmrun._context.current_b`, which the RPC server sets for every
service call (worker thread or task on the loop) and ``Supervisor.install`` sets around
``init``, the same variable ``bigmrun.current()`` reads. If it holds the ``B`` of a
registered machine, the text is buffered per (machine, stream, thread) and each
complete line goes to the driver's :class:`~bigmrun._output.Output`, exactly as a local
machine's piped output does; anything else is passed to the stream that was there
before, unchanged. A machine's unfinished last line is delivered when it stops, and the
proxies are taken out again when the last machine stops.

Context variables follow a service into the tasks it creates and into
``asyncio.to_thread``; a ``threading.Thread`` it starts itself begins with an empty
context, so its output is captured only when the thread runs its target under
``contextvars.copy_context().run``. Writes past ``sys.stdout``
(``sys.stdout.buffer``, ``os.write(1, ...)``, subprocesses) are not captured.

Replacing the streams coexists with others doing the same (pytest's capture, click's
``CliRunner``): a proxy forwards to the object it replaced, is taken out only if it is
still in place, and :func:`ensure` puts it back when someone restored exactly the object
it had replaced (as pytest does between a test's phases). Logging handlers that write
to the replaced streams (``logging.basicConfig()``'s default) are pointed at the proxies
meanwhile, so what a service logs is captured too.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO, cast

from .._context import current_b
from ._base import OutputSink

_STREAMS = ("stdout", "stderr")


class _Machine:
    """A registered machine: where its lines go, and its unfinished lines."""

    __slots__ = ("b", "name", "output", "partial")

    def __init__(self, b: Any, name: str, output: OutputSink) -> None:
        self.b = b
        self.name = name
        self.output = output
        #: (stream, thread id) -> text written after the last newline.
        self.partial: dict[tuple[str, int], str] = {}


_lock = threading.Lock()  # machines and their unfinished lines
_install_lock = threading.Lock()  # putting the proxies in and taking them out
_machines: dict[int, _Machine] = {}  # id(B) -> machine (the B is held, so ids stay unique)
_proxies: dict[str, StreamProxy] = {}  # "stdout"/"stderr" -> proxy installed in sys
_handlers: list[tuple[logging.StreamHandler[Any], Any]] = []  # retargeted, old stream
_local = threading.local()  # .delivering: this thread is inside Output.line


class StreamProxy:
    """Stands in for ``sys.stdout`` or ``sys.stderr``; see the module's docs."""

    def __init__(self, stream: str, wrapped: TextIO) -> None:
        self.stream = stream
        #: The stream this proxy replaced; it gets every write not made for a machine.
        self.wrapped = wrapped

    def _machine(self) -> _Machine | None:
        b = current_b.get()
        if b is None or getattr(_local, "delivering", False):
            return None
        m = _machines.get(id(b))
        return m if m is not None and m.b is b else None

    def write(self, s: str) -> int:
        """Write ``s`` to the current machine's output, or to the wrapped stream."""
        m = self._machine()
        if m is None:
            return self.wrapped.write(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        key = (self.stream, threading.get_ident())
        with _lock:
            if _machines.get(id(m.b)) is not m:  # stopped meanwhile
                return self.wrapped.write(s)
            *lines, rest = (m.partial.pop(key, "") + s).split("\n")
            if rest:
                m.partial[key] = rest
            for line in lines:
                _deliver(m, self.stream, line)
        return len(s)

    def writelines(self, lines: Any) -> None:
        """Write each of ``lines`` (as :meth:`write`)."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush the wrapped stream (a machine's unfinished line waits for its newline)."""
        self.wrapped.flush()

    def __getattr__(self, name: str) -> Any:
        # encoding, errors, isatty, fileno, buffer...: those of the wrapped stream.
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"<bigmrun capture of sys.{self.stream} over {self.wrapped!r}>"


def _deliver(m: _Machine, stream: str, text: str) -> None:
    # Output.line writes the prefixed line to sys.stderr, that is, to a proxy: it must
    # go through to the real stream, not come back here.
    _local.delivering = True
    try:
        m.output.line(m.name, stream, text.encode("utf-8", "replace"))
    finally:
        _local.delivering = False


def register(b: Any, name: str, output: OutputSink) -> None:
    """Capture what is written on behalf of the machine whose ``B`` is ``b``."""
    with _install_lock:
        with _lock:
            _machines[id(b)] = _Machine(b, name, output)
        if not _proxies:
            _install()


def unregister(b: Any) -> None:
    """Stop capturing for ``b``: deliver its unfinished lines; idempotent."""
    with _install_lock:
        with _lock:
            m = _machines.get(id(b))
            if m is None or m.b is not b:
                return
            del _machines[id(b)]
            for (stream, _), text in sorted(m.partial.items()):
                _deliver(m, stream, text)
            m.partial.clear()
            last = not _machines
        if last:
            _uninstall()


def ensure() -> None:
    """Put the proxies back where someone restored the streams they had replaced."""
    for name, proxy in list(_proxies.items()):
        current = getattr(sys, name)
        if current is not proxy and current is proxy.wrapped:
            with _install_lock:
                if _proxies.get(name) is proxy and getattr(sys, name) is proxy.wrapped:
                    setattr(sys, name, proxy)


# Installing and removing run under _install_lock only: a logging handler's lock is
# taken there (setStream), and a write holding that lock may be waiting for _lock.

def _install() -> None:
    for name in _STREAMS:
        current = getattr(sys, name)
        if isinstance(current, StreamProxy):  # left in place by someone's restore: adopt
            _proxies[name] = current
        elif current is not None:
            _proxies[name] = StreamProxy(name, current)
            setattr(sys, name, cast(TextIO, _proxies[name]))
    by_stream = {id(p.wrapped): p for p in _proxies.values()}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for h in getattr(logger, "handlers", ()):
            if isinstance(h, logging.StreamHandler) and id(h.stream) in by_stream:
                old = h.setStream(cast(TextIO, by_stream[id(h.stream)]))
                _handlers.append((h, old))


def _uninstall() -> None:
    for h, old in _handlers:
        if isinstance(h.stream, StreamProxy):
            h.setStream(old)
    _handlers.clear()
    for name, proxy in _proxies.items():
        if getattr(sys, name) is proxy:
            setattr(sys, name, proxy.wrapped)
    _proxies.clear()
