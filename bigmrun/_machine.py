"""Machine: one remote address space, its lifecycle state, and calls into it.

How this works
--------------
State lives in one table (:data:`TRANSITIONS`) and only moves forward:
UNSTARTED -> STARTING -> RUNNING -> STOPPED (STOPPED is reachable from every state).
All state changes and all connection work happen on the I/O loop thread; user threads
only read state and wait on conditions or futures.

A call is encoded (pickled) on the caller's thread, so an unpicklable argument raises
right where the call was made, then handed to the loop. On the fast path (machine
RUNNING, connection open) the loop writes the REQUEST at once; otherwise a task waits
for the machine to run and (re)connects. The reply resolves a ``concurrent.futures``
future (``call``/``submit``) or an asyncio future (``acall``). A timeout or
cancellation sends CANCEL to the machine.

When a connection breaks, pending calls fail with :class:`NetworkError` (temporary),
unless the machine's process is found to have ended, in which case the machine is
STOPPED and every pending call fails with :class:`MachineLostError` carrying the cause.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import enum
import io
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _loop
from .errors import (
    BigmrunError,
    CallCancelledError,
    CallTimeoutError,
    ConfigError,
    MachineLostError,
    NetworkError,
)
from .rpc import _protocol as P
from .rpc._client import ClientConnection, PendingCall, new_stream_id
from .rpc._codec import StreamRef, encode_request
from .rpc._transport import connect

if TYPE_CHECKING:
    from ._session import B
    from .backends._base import MachineHandle


class State(enum.IntEnum):
    """A machine's lifecycle state. States only move forward (increase)."""

    UNSTARTED = 0
    STARTING = 1
    RUNNING = 2
    STOPPED = 3

    def __str__(self) -> str:
        return self.name


#: The lifecycle table: the states each state may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNSTARTED: frozenset({State.STARTING, State.STOPPED}),
    State.STARTING: frozenset({State.RUNNING, State.STOPPED}),
    State.RUNNING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}

#: How long, after a connection breaks, to wait for the system to report that the
#: machine's process ended (so calls fail as "machine lost", not "network error").
EXIT_GRACE = 0.5


class RetryPolicy:
    """Capped exponential backoff with full jitter, for :meth:`Machine.retry_call`.

    Attempt ``k`` (from 0) sleeps a random time in ``[0, min(maximum, initial*2**k)]``.
    ``sleep`` and ``rng`` are injectable so tests need no real waiting.
    """

    def __init__(self, max_attempts: int = 6, initial: float = 0.05, maximum: float = 2.0,
                 multiplier: float = 2.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        if max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.sleep = sleep
        self.rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        cap = min(self.maximum, self.initial * self.multiplier**attempt)
        return self.rng.uniform(0, cap)


def _is_stream(x: Any) -> bool:
    if isinstance(x, (bytes, bytearray, memoryview, str)):
        return False
    if isinstance(x, io.IOBase) or (hasattr(x, "read") and callable(x.read)):
        return True
    return isinstance(x, collections.abc.Iterator)


def _extract_streams(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[
        tuple[Any, ...], dict[str, Any], list[tuple[int, Any]]]:
    sources: list[tuple[int, Any]] = []

    def sub(v: Any) -> Any:
        if _is_stream(v):
            sid = new_stream_id()
            sources.append((sid, v))
            return StreamRef(sid)
        return v

    if not any(_is_stream(a) for a in args) and not any(_is_stream(v) for v in kwargs.values()):
        return args, kwargs, sources
    return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}, sources


def _set_future(fut: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except concurrent.futures.InvalidStateError:  # cancelled or timed out meanwhile
        close = getattr(value, "close", None)
        if ok and close is not None and type(value).__name__ == "ReplyStream":
            close()


def _set_afuture(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _close_reply(ok: bool, value: Any) -> None:
    """Close a streamed reply nobody will read (its call was cancelled meanwhile)."""
    close = getattr(value, "close", None)
    if ok and close is not None and type(value).__name__ == "ReplyStream":
        close()


def _set_afuture_or_close(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled meanwhile
        _close_reply(ok, value)
        return
    _set_afuture(fut, ok, value)


class Machine:
    """A machine managed (``owned``) or dialed by a :class:`B`.

    Attributes:
        name: unique within the session (``m0``, ``m1``...); prefixes its output.
        addr: ``host:port`` it serves on (set once it has started).
        maxprocs: CPUs the machine may use.
        owned: True if this B started it (and keeps it alive); False if dialed.
    """

    def __init__(self, b: B, name: str, owned: bool, addr: str = "") -> None:
        self._b = b
        self.name = name
        self.owned = owned
        self.addr = addr
        self.maxprocs = 0
        self.info: dict[str, Any] = {}
        self.started_at: float | None = None
        self._state = State.UNSTARTED
        self._err: BaseException | None = None
        self._cond = threading.Condition()
        self._afutures: list[tuple[State, asyncio.Future[None]]] = []
        self.handle: MachineHandle | None = None
        self._conn: ClientConnection | None = None
        self._connecting: asyncio.Future[ClientConnection] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._inflight_lock = threading.Lock()
        self.calls_in_flight = 0

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.addr or '-'} {self._state.name}>"

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current lifecycle state."""
        return self._state

    @property
    def err(self) -> BaseException | None:
        """Why the machine stopped (None if it was shut down cleanly or still runs)."""
        return self._err

    def _advance(self, new: State, err: BaseException | None = None) -> bool:
        """Move to ``new`` if the table allows it (loop thread). Returns True if moved."""
        with self._cond:
            if new not in TRANSITIONS[self._state]:
                return False
            self._state = new
            if new == State.STOPPED:
                self._err = err
            self._cond.notify_all()
        keep = []
        for want, fut in self._afutures:
            if new >= want:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((want, fut))
        self._afutures = keep
        return True

    def wait(self, state: State = State.RUNNING, timeout: float | None = None) -> State:
        """Block until the machine reaches ``state`` (or a later one); return the state.

        A machine that stops without running returns STOPPED: check ``err``.
        Returns the current state if ``timeout`` (seconds) passes first.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._state >= state, timeout)
            return self._state

    async def await_state(self, state: State = State.RUNNING) -> State:
        """Like :meth:`wait`, for asyncio code (any loop)."""
        loop = _loop.get_loop()
        if asyncio.get_running_loop() is loop:
            return await self._await_state_loop(state)
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._await_state_loop(state), loop)
        )

    async def _await_state_loop(self, state: State) -> State:
        if self._state < state:
            fut = asyncio.get_running_loop().create_future()
            self._afutures.append((state, fut))
            await fut
        return self._state

    # --- calls ------------------------------------------------------------------------

    def _prepare(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 rid: str | None = None) -> tuple[int, bytes, list[tuple[int, Any]]]:
        if not isinstance(method, str) or "." not in method:
            raise ConfigError(f"method must be 'Service.method', got {method!r}")
        args, kwargs, sources = _extract_streams(args, kwargs)
        meta: dict[str, Any] | None = None
        if sources or rid is not None:
            meta = {}
            if sources:
                meta["streams"] = True
            if rid is not None:
                meta["rid"] = rid
        payload = encode_request(method, args, kwargs, meta)
        return new_stream_id(), payload, sources

    def submit(self, method: str, *args: Any, timeout: float | None = None,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start a call; return a ``concurrent.futures.Future`` for its result.

        Cancelling the future (or its timeout running out) tells the machine to cancel
        the call. Unpicklable arguments raise :class:`SerializationError` here.
        """
        return self._submit(method, args, kwargs, timeout, None)

    def _submit(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, rid: str | None) -> concurrent.futures.Future[Any]:
        sid, payload, sources = self._prepare(method, args, kwargs, rid)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        loop = _loop.get_loop()

        def resolve(ok: bool, value: Any) -> None:
            _set_future(fut, ok, value)

        def on_done(f: concurrent.futures.Future[Any]) -> None:
            if f.cancelled():
                loop.call_soon_threadsafe(self._cancel_sid, sid)

        self._send(sid, method, payload, sources, resolve, timeout, fut.done)
        fut.add_done_callback(on_done)
        return fut

    def _send(self, sid: int, method: str, payload: bytes, sources: list[tuple[int, Any]],
              resolve: Callable[[bool, Any], None], timeout: float | None,
              abandoned: Callable[[], bool]) -> ClientConnection | None:
        """Send a prepared call (any thread but the loop's): from this thread when it
        can (:meth:`_send_direct`; returns the connection it went on), else through the
        loop (returns None)."""
        if not sources and timeout is None:
            conn = self._send_direct(sid, method, payload, resolve)
            if conn is not None:
                return conn
        _loop.get_loop().call_soon_threadsafe(
            self._dispatch, sid, method, payload, sources, resolve, timeout, abandoned)
        return None

    def _send_direct(self, sid: int, method: str, payload: bytes,
                     resolve: Callable[[bool, Any], None]) -> ClientConnection | None:
        """The fast path of a call from any thread: send the request on this thread.

        Taken when the machine is RUNNING, connected, no other call is in flight on the
        connection, and the call needs nothing of the loop (no streamed arguments, no
        timeout, no chaos on the link); saves waking the loop thread. Returns None
        (nothing sent) when the call must take the loop path, else the connection.
        """
        conn = self._conn
        if (self._state is not State.RUNNING or conn is None or conn.faults is not None
                or conn.pending or not conn.is_open()):
            # With other calls in flight the loop path is faster: it batches their
            # writes on one thread instead of several threads taking turns at the socket.
            return None
        with self._inflight_lock:
            self.calls_in_flight += 1

        def done(ok: bool, value: Any) -> None:
            with self._inflight_lock:
                self.calls_in_flight -= 1
            resolve(ok, value)

        once = _Once(done)
        conn.pending[sid] = PendingCall(sid, method, once, [])
        conn.write(P.encode_frame(P.REQUEST, sid, payload))
        # The connection may have broken meanwhile, after the loop failed the calls it
        # knew of: whoever takes the call out of ``pending`` resolves it.
        exc = conn.closed_exc
        if exc is not None and conn.pending.pop(sid, None) is not None:
            once(False, exc)
        return conn

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``"Service.method"`` with the arguments and wait for its result.

        Waits for the machine to be RUNNING first; fails at once if it is STOPPED.
        ``timeout`` (seconds) bounds the whole call: on expiry the machine is told to
        cancel it and :class:`CallTimeoutError` is raised. A generator method returns an
        iterator over its items.
        """
        return self._call(method, args, kwargs, timeout, None)

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              timeout: float | None, rid: str | None) -> Any:
        sid, payload, sources = self._prepare(method, args, kwargs, rid)
        waiter = _Waiter()
        conn = self._send(sid, method, payload, sources, waiter.resolve, timeout,
                          waiter.abandoned)
        try:
            if conn is not None:
                conn.read_reply_here(sid)
            return waiter.wait()
        except BaseException:
            if waiter.abandon():  # interrupted (KeyboardInterrupt): cancel remotely
                try:
                    _loop.get_loop().call_soon_threadsafe(self._cancel_sid, sid)
                except RuntimeError:  # the loop is closed: nothing to cancel
                    pass
            raise

    async def acall(self, method: str, *args: Any, timeout: float | None = None,
                    **kwargs: Any) -> Any:
        """``await`` form of :meth:`call`, usable from any asyncio event loop."""
        loop = _loop.get_loop()
        caller = asyncio.get_running_loop()
        sid, payload, sources = self._prepare(method, args, kwargs)
        fut: asyncio.Future[Any] = caller.create_future()
        if caller is loop:
            self._dispatch(sid, method, payload, sources,
                           lambda ok, v: _set_afuture(fut, ok, v), timeout, fut.done)
        else:
            # Another loop (the caller's own): the I/O loop resolves the caller's future
            # directly, one hop back, without a concurrent.futures.Future in between.
            def resolve(ok: bool, value: Any) -> None:
                try:
                    caller.call_soon_threadsafe(_set_afuture_or_close, fut, ok, value)
                except RuntimeError:  # the caller's loop is closed: nobody waits
                    _close_reply(ok, value)

            self._send(sid, method, payload, sources, resolve, timeout, fut.done)
        try:
            return await fut
        except asyncio.CancelledError:
            if caller is loop:
                self._cancel_sid(sid)
            else:
                loop.call_soon_threadsafe(self._cancel_sid, sid)
            raise

    def retry_call(self, method: str, *args: Any, timeout: float | None = None,
                   retry_policy: RetryPolicy | None = None, **kwargs: Any) -> Any:
        """:meth:`call`, retried with backoff while it fails with a *temporary* error.

        Only errors marked ``temporary`` (network failures) are retried, and only when
        the arguments can be replayed: a streamed argument that cannot be rewound
        (an iterator, an unseekable file) makes the first error final.

        Every attempt carries the same request id, so the machine runs the call at most
        once: an attempt whose predecessor already ran (its reply lost with the
        connection) gets that reply instead of running the method again.
        """
        policy = retry_policy or RetryPolicy()
        rewind = _rewinder(args, kwargs)
        rid = secrets.token_hex(12)
        for attempt in range(policy.max_attempts):
            try:
                return self._call(method, args, kwargs, timeout, rid)
            except BigmrunError as e:
                last = attempt == policy.max_attempts - 1
                if not e.temporary or rewind is None or last or self._state == State.STOPPED:
                    raise
                policy.sleep(policy.delay(attempt))
                rewind()
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        """Stop the machine: its pending calls fail, its process is stopped."""
        err = CallCancelledError(f"machine {self.name} was cancelled by its owner")
        _loop.get_loop().call_soon_threadsafe(self._stop, err)

    # built-in machine statistics
    def mem_info(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """System and process memory usage (psutil's fields, bytes)."""
        return dict(self.call("Supervisor.mem_info", timeout=timeout))

    def disk_info(self, path: str | None = None, timeout: float | None = 30.0) -> dict[str, Any]:
        """Disk usage of ``path`` (default: the machine's temporary directory)."""
        return dict(self.call("Supervisor.disk_info", path, timeout=timeout))

    def load_info(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """Load averages (1, 5, 15 minutes) and CPU count."""
        return dict(self.call("Supervisor.load_info", timeout=timeout))

    # --- loop side ----------------------------------------------------------------------

    def _dispatch(self, sid: int, method: str, payload: bytes, sources: list[tuple[int, Any]],
                  resolve: Callable[[bool, Any], None], timeout: float | None,
                  abandoned: Callable[[], bool]) -> None:
        if abandoned():
            return
        with self._inflight_lock:
            self.calls_in_flight += 1

        def done(ok: bool, value: Any) -> None:
            if timer is not None:
                timer.cancel()
            with self._inflight_lock:
                self.calls_in_flight -= 1
            resolve(ok, value)

        once = _Once(done)
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                timeout, self._expire, sid, method, timeout, once)
        call = PendingCall(sid, method, once, [s for s, _ in sources])
        conn = self._conn
        if self._state == State.RUNNING and conn is not None and conn.is_open():
            conn.start_call(payload, call, sources)
        elif self._state == State.STOPPED:
            once(False, self._lost_error())
        else:
            asyncio.get_running_loop().create_task(self._dispatch_slow(payload, call, sources))

    async def _dispatch_slow(self, payload: bytes, call: PendingCall,
                             sources: list[tuple[int, Any]]) -> None:
        await self._await_state_loop(State.RUNNING)
        if self._state == State.STOPPED:
            call.resolve(False, self._lost_error())
            return
        try:
            conn = await self._connect()
        except BigmrunError as e:
            call.resolve(False, e)
            return
        conn.start_call(payload, call, sources)

    def _expire(self, sid: int, method: str, timeout: float, once: _Once) -> None:
        self._cancel_sid(sid)
        once(False, CallTimeoutError(
            f"{method} on {self.name} did not finish within {timeout:g}s; "
            f"the machine was told to cancel it"))

    def _cancel_sid(self, sid: int) -> None:
        conn = self._conn
        if conn is not None:
            conn.cancel_call(sid)

    def _lost_error(self) -> MachineLostError:
        err = self._err
        if err is None:
            e = MachineLostError(f"machine {self.name} is stopped (it was shut down)",
                                 machine=self.name)
        else:
            e = MachineLostError(f"machine {self.name} is stopped: {err}", machine=self.name)
            e.__cause__ = err
        return e

    async def _connect(self) -> ClientConnection:
        conn = self._conn
        if conn is not None and conn.is_open():
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._do_connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _do_connect(self) -> ClientConnection:
        host, _, port = self.addr.rpartition(":")
        try:
            _, conn = await asyncio.wait_for(
                connect(
                    lambda: ClientConnection(self.name, self._conn_lost, self._b.name),
                    host, int(port), self._b._client_ssl(), server_hostname=host,
                ),
                timeout=15.0,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise NetworkError(f"cannot connect to {self.name} at {self.addr}: {e}") from e
        self._conn = conn
        return conn

    def _conn_lost(self, conn: ClientConnection, exc: BaseException,
                   pending: list[PendingCall]) -> None:
        if conn is self._conn:
            self._conn = None
        if self._state == State.STOPPED:
            for call in pending:
                call.resolve(False, self._lost_error())
            return
        handle = self.handle
        if self.owned and handle is not None:
            asyncio.get_running_loop().create_task(self._classify_loss(handle, exc, pending))
        else:
            for call in pending:
                call.resolve(False, exc)

    async def _classify_loss(self, handle: MachineHandle, exc: BaseException,
                             pending: list[PendingCall]) -> None:
        try:
            grace = float(getattr(self._b.system, "exit_grace", EXIT_GRACE))
            ended = await asyncio.wait_for(asyncio.shield(handle.exited), grace)
        except asyncio.TimeoutError:
            ended = None
        if ended is not None:
            self._stop(ended)
            err: BaseException = self._lost_error()
        else:
            err = exc
        for call in pending:
            call.resolve(False, err)

    def _stop(self, err: BaseException | None) -> None:
        """Move to STOPPED: fail every pending call, drop the connection, kill (loop)."""
        if not self._advance(State.STOPPED, err):
            return
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            pending = conn.take_pending()
            lost = self._lost_error()
            for call in pending:
                call.resolve(False, lost)
            conn.abort(lost)
        if self.owned and self.handle is not None:
            asyncio.get_running_loop().create_task(self.handle.kill())

    async def _acall_loop(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """A call made from the loop thread itself (bring-up, keepalives)."""
        sid, payload, sources = self._prepare(method, args, {})
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        once = _Once(lambda ok, v: _set_afuture(fut, ok, v))
        conn = await self._connect()
        conn.start_call(payload, PendingCall(sid, method, once, []), sources)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._cancel_sid(sid)
            raise CallTimeoutError(f"{method} on {self.name} timed out after {timeout}s") \
                from None

    async def _keepalive(self, interval: float, timeout: float,
                         clock: Callable[[], float] = time.monotonic) -> None:
        last_ok = clock()
        while self._state == State.RUNNING:
            await asyncio.sleep(interval)
            try:
                await self._acall_loop("Supervisor.keepalive", timeout,
                                       timeout=max(interval * 2, 1.0))
                last_ok = clock()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if clock() - last_ok > timeout:
                    lost = MachineLostError(
                        f"machine {self.name} did not answer keepalives for "
                        f"{clock() - last_ok:.1f}s (timeout {timeout:g}s): {e}",
                        machine=self.name)
                    lost.__cause__ = e
                    self._stop(lost)
                    return


class _Waiter:
    """What a blocking :meth:`Machine.call` waits on: cheaper than a
    ``concurrent.futures.Future`` (one lock, no condition, no callbacks)."""

    __slots__ = ("_given_up", "_lock", "_ok", "_resolved", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._ok = False
        self._value: Any = None
        self._resolved = False
        self._given_up = False

    def resolve(self, ok: bool, value: Any) -> None:
        """Called once (by the loop, or the sender on a broken connection)."""
        if self._given_up:
            _close_reply(ok, value)
            return
        self._ok, self._value = ok, value
        self._resolved = True
        self._lock.release()

    def wait(self) -> Any:
        self._lock.acquire()
        if self._ok:
            return self._value
        raise self._value

    def abandoned(self) -> bool:
        return self._given_up

    def abandon(self) -> bool:
        """Give up waiting; True if no reply had come yet."""
        self._given_up = True
        return not self._resolved


class _Once:
    """Calls ``fn`` the first time only (a call resolves exactly once)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[bool, Any], None]) -> None:
        self._fn: Callable[[bool, Any], None] | None = fn

    def __call__(self, ok: bool, value: Any) -> None:
        fn = self._fn
        if fn is not None:
            self._fn = None
            fn(ok, value)


def _rewinder(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], None] | None:
    """A function that rewinds every streamed argument, or None if one cannot be."""
    streams = [v for v in (*args, *kwargs.values()) if _is_stream(v)]
    if not streams:
        return lambda: None
    positions = []
    for s in streams:
        if isinstance(s, collections.abc.Iterator) and not hasattr(s, "read"):
            return None
        try:
            if not s.seekable():
                return None
            positions.append((s, s.tell()))
        except (AttributeError, OSError):
            return None

    def rewind() -> None:
        for s, pos in positions:
            s.seek(pos)

    return rewind
