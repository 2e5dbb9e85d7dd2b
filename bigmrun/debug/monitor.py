"""The driver's monitor: samples every running machine at a fixed interval.

Each sample (``Supervisor.stats``: CPU, memory, disk, network, load, cluster variables,
RPC statistics) goes into the :class:`TimeSeries` store for the dashboard, and the
latest one per machine is kept whole for ``bigmrun ps``, ``/debug/vars`` and ``/metrics``.

The interval comes from ``BIGMRUN_SAMPLE_INTERVAL`` (seconds, default 2). ``0`` turns
sampling off: no ``Supervisor.stats`` calls at all (the debug server still answers, but
machine statistics, variables and charts stay empty).

Series names: the machine statistics (``cpu_percent``, ``rss``, ...), ``var:NAME`` per
counter and gauge, ``var:NAME:count`` and ``var:NAME:mean`` per histogram.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from .._machine import State
from .timeseries import TimeSeries

if TYPE_CHECKING:
    from .._session import B

DEFAULT_INTERVAL = 2.0


def sample_interval() -> float:
    """``$BIGMRUN_SAMPLE_INTERVAL`` in seconds (default 2; 0 or less: sampling off)."""
    raw = os.environ.get("BIGMRUN_SAMPLE_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_INTERVAL


def mem_threshold() -> float:
    """Percent of a host's memory in use above which a machine is flagged (default 90)."""
    try:
        return float(os.environ.get("BIGMRUN_MEM_THRESHOLD", "90"))
    except ValueError:
        return 90.0


class Monitor:
    def __init__(self, b: B, interval: float | None = None,
                 store: TimeSeries | None = None) -> None:
        self.b = b
        self.interval = sample_interval() if interval is None else max(0.0, interval)
        self.store = store or TimeSeries()
        self.latest: dict[str, dict[str, Any]] = {}
        self._prev_net: dict[str, tuple[float, float, float]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """False when sampling is off (interval 0)."""
        return self.interval > 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.enabled:
            return

        def go() -> None:
            self._task = loop.create_task(self._run())

        loop.call_soon_threadsafe(go)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._task
        if task is not None:
            loop.call_soon_threadsafe(task.cancel)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            machines = [m for m in self.b.machines() if m.state == State.RUNNING and m.owned]
            if machines:
                await asyncio.gather(*(self.sample(m) for m in machines),
                                     return_exceptions=True)

    async def sample(self, m: Any) -> None:
        try:
            st = await m._acall_loop("Supervisor.stats", timeout=max(self.interval * 2, 5.0))
        except Exception:
            return
        now = time.time()
        st["time"] = now
        st["mem_high"] = st.get("mem_percent", 0) >= mem_threshold()
        self.latest[m.name] = st
        values = {k: st[k] for k in ("cpu_percent", "rss", "mem_percent", "disk_used",
                                     "load1", "threads") if k in st}
        prev = self._prev_net.get(m.name)
        sent, recv = float(st.get("net_sent", 0)), float(st.get("net_recv", 0))
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            values["net_sent_rate"] = max(0.0, (sent - prev[1]) / dt)
            values["net_recv_rate"] = max(0.0, (recv - prev[2]) / dt)
        self._prev_net[m.name] = (now, sent, recv)
        v = st.get("vars") or {}
        for kind in ("counters", "gauges"):
            for name, val in (v.get(kind) or {}).items():
                values[f"var:{name}"] = val
        for name, h in (v.get("histograms") or {}).items():  # charted as count and mean
            values[f"var:{name}:count"] = h["count"]
            if h["count"]:
                values[f"var:{name}:mean"] = h["sum"] / h["count"]
        self.store.add(now, m.name, values)
