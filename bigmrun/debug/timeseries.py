"""A small in-memory time-series store: one bounded series per (metric, machine)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

#: Points kept per series (at the default 2 s interval: 30 minutes).
DEFAULT_RETENTION = 900


class TimeSeries:
    """Thread-safe; ``add`` appends a sample, old points fall off the end."""

    def __init__(self, retention: int = DEFAULT_RETENTION) -> None:
        self.retention = retention
        self._lock = threading.Lock()
        self._series: dict[str, dict[str, deque[tuple[float, float]]]] = {}

    def add(self, t: float, machine: str, values: dict[str, float]) -> None:
        with self._lock:
            for metric, v in values.items():
                per = self._series.setdefault(metric, {})
                points = per.get(machine)
                if points is None:
                    points = per[machine] = deque(maxlen=self.retention)
                points.append((t, float(v)))

    def metrics(self) -> list[str]:
        with self._lock:
            return sorted(self._series)

    def query(self, metric: str | None = None, since: float = 0.0) -> dict[str, Any]:
        """``{metric: {machine: [[t, v], ...]}}`` for points newer than ``since``."""
        with self._lock:
            names = [metric] if metric is not None else list(self._series)
            return {
                name: {m: [[t, v] for t, v in pts if t > since]
                       for m, pts in self._series.get(name, {}).items()}
                for name in names
            }

    def latest(self, machine: str) -> dict[str, float]:
        with self._lock:
            return {name: per[machine][-1][1] for name, per in self._series.items()
                    if per.get(machine)}
