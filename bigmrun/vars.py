"""Cluster variables: counters, gauges and histograms that services update.

::

    import bigmrun.vars as bvars

    samples = bvars.counter("samples", "points sampled")
    inflight = bvars.gauge("inflight")
    latency = bvars.histogram("latency_seconds", buckets=(0.01, 0.1, 1))

    class PI:
        def sample(self, n):
            ...
            samples.add(n)

Variables are declared anywhere (module level is fine) and updated inside services; each
machine keeps its own values, and the driver gathers them across the cluster: the sum
and the value per machine, at ``/debug/vars`` (JSON) and ``/metrics`` (Prometheus, with
a ``machine`` label) of its debug server. Updates are cheap (a lock and an add) and
never touch the network. Updates made on the driver itself are reported as machine
``driver``. On the in-process test system each machine still has its own values.
"""

from __future__ import annotations

import bisect
import re
import threading
from typing import Any

from ._context import current_b, process_b

__all__ = ["Counter", "Gauge", "Histogram", "Registry", "counter", "gauge", "histogram"]

DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class Registry:
    """The values of one machine (or the driver)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, list[float]] = {}  # bucket counts..., +Inf, sum, count

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy of every value."""
        with self._lock:
            hists = {}
            for name, h in self.histograms.items():
                buckets = _buckets[name]
                hists[name] = {"buckets": list(buckets), "counts": h[: len(buckets) + 1],
                               "sum": h[-2], "count": h[-1]}
            return {"counters": dict(self.counters), "gauges": dict(self.gauges),
                    "histograms": hists}


_default = Registry()
_help: dict[str, tuple[str, str]] = {}  # name -> (kind, help)
_buckets: dict[str, tuple[float, ...]] = {}
_decl_lock = threading.Lock()


def registry() -> Registry:
    """The registry updates go to here: this machine's, or the driver's."""
    b = current_b.get() or process_b[0]
    reg = getattr(b, "vars", None) if b is not None else None
    return reg if isinstance(reg, Registry) else _default


def default_registry() -> Registry:
    """The registry of updates made outside any machine (reported as ``driver``)."""
    return _default


def _declare(name: str, kind: str, help_: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"variable name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
    with _decl_lock:
        known = _help.get(name)
        if known is not None and known[0] != kind:
            raise ValueError(f"variable {name!r} is already a {known[0]}, not a {kind}")
        _help[name] = (kind, help_ or (known[1] if known else ""))


def describe(name: str) -> tuple[str, str]:
    """(kind, help) of a declared variable ("", "") if unknown."""
    return _help.get(name, ("", ""))


class Counter:
    """A value that only goes up (samples taken, bytes read, errors seen)."""

    def __init__(self, name: str, help: str = "") -> None:
        _declare(name, "counter", help)
        self.name = name

    def add(self, n: float = 1) -> None:
        if n < 0:
            raise ValueError(f"counter {self.name} can only go up (add({n}))")
        reg = registry()
        with reg._lock:
            reg.counters[self.name] = reg.counters.get(self.name, 0) + n

    def value(self) -> float:
        reg = registry()
        with reg._lock:
            return reg.counters.get(self.name, 0)


class Gauge:
    """A value that goes up and down (items queued, bytes held)."""

    def __init__(self, name: str, help: str = "") -> None:
        _declare(name, "gauge", help)
        self.name = name

    def set(self, v: float) -> None:
        reg = registry()
        with reg._lock:
            reg.gauges[self.name] = float(v)

    def add(self, n: float = 1) -> None:
        reg = registry()
        with reg._lock:
            reg.gauges[self.name] = reg.gauges.get(self.name, 0.0) + n

    def value(self) -> float:
        reg = registry()
        with reg._lock:
            return reg.gauges.get(self.name, 0.0)


class Histogram:
    """Observations counted into buckets (latencies, sizes)."""

    def __init__(self, name: str, help: str = "",
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        _declare(name, "histogram", help)
        b = tuple(sorted(float(x) for x in buckets))
        with _decl_lock:
            if _buckets.setdefault(name, b) != b:
                raise ValueError(f"histogram {name!r} already has buckets {_buckets[name]}")
        self.name = name
        self.buckets = b

    def observe(self, v: float) -> None:
        reg = registry()
        i = bisect.bisect_left(self.buckets, v)
        with reg._lock:
            h = reg.histograms.get(self.name)
            if h is None:
                h = reg.histograms[self.name] = [0.0] * (len(self.buckets) + 3)
            h[i] += 1
            h[-2] += v
            h[-1] += 1


def counter(name: str, help: str = "") -> Counter:
    """Declare (or get) the counter ``name``."""
    return Counter(name, help)


def gauge(name: str, help: str = "") -> Gauge:
    """Declare (or get) the gauge ``name``."""
    return Gauge(name, help)


def histogram(name: str, help: str = "", buckets: tuple[float, ...] = DEFAULT_BUCKETS
              ) -> Histogram:
    """Declare (or get) the histogram ``name`` (``buckets`` are upper bounds)."""
    return Histogram(name, help, buckets)
