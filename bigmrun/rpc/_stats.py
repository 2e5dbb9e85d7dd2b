"""Per-method RPC statistics kept by each machine's server: calls, errors, bytes, latency."""

from __future__ import annotations

import bisect
import threading
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class RpcStats:
    """Counters per ``"Service.method"``; updated on the I/O loop, read from anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, list[float]] = {}

    # layout: calls, errors, bytes_in, bytes_out, latency_sum, then bucket counts (+Inf)
    def _row(self, method: str) -> list[float]:
        row = self._methods.get(method)
        if row is None:
            row = self._methods[method] = [0.0] * (5 + len(LATENCY_BUCKETS) + 1)
        return row

    def started(self, method: str, bytes_in: int) -> None:
        with self._lock:
            row = self._row(method)
            row[0] += 1
            row[2] += bytes_in

    def finished(self, method: str, ok: bool, bytes_out: int, seconds: float) -> None:
        with self._lock:
            row = self._row(method)
            if not ok:
                row[1] += 1
            row[3] += bytes_out
            row[4] += seconds
            row[5 + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                m: {"calls": r[0], "errors": r[1], "bytes_in": r[2], "bytes_out": r[3],
                    "latency_sum": r[4], "latency_buckets": list(LATENCY_BUCKETS),
                    "latency_counts": r[5:]}
                for m, r in self._methods.items()
            }
