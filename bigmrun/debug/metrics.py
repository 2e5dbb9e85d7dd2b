"""``GET /metrics``: the cluster in Prometheus text format, one ``machine`` label per value.

How this works
--------------
Nothing here keeps state of its own: a custom collector on a private
``CollectorRegistry`` reads, at scrape time, what the driver's monitor last sampled from
each machine (``Supervisor.stats``) and turns it into metric families, rendered by
``prometheus_client.generate_latest``. The private registry keeps the process-wide
default one (and whatever the user's program put there) out of this output.

Exposed:

* every cluster variable (``bigmrun.vars``) under its own name: counters as
  ``NAME_total``, gauges as ``NAME``, histograms as ``NAME_bucket``/``_sum``/``_count``;
  label ``machine`` (the driver's own updates are ``machine="driver"``). Sums across
  machines are left to the query (``sum by () (NAME_total)``); ``/debug/vars`` has them;
* RPC statistics per machine and ``method`` (``"Service.method"``), as served by that
  machine: ``bigmrun_rpc_calls_total``, ``bigmrun_rpc_errors_total``,
  ``bigmrun_rpc_bytes_in_total``, ``bigmrun_rpc_bytes_out_total`` and the histogram
  ``bigmrun_rpc_latency_seconds``;
* machine gauges: ``bigmrun_machine_cpu_percent``, ``bigmrun_machine_rss_bytes``,
  ``bigmrun_machine_mem_percent``, ``bigmrun_machine_load1`` (from the last sample),
  ``bigmrun_machine_mem_high`` (1 above the memory threshold), and
  ``bigmrun_machine_calls_in_flight`` (the driver's own count, always current).

Values are as fresh as the last sample (``BIGMRUN_SAMPLE_INTERVAL``); with sampling
off only the driver's variables and calls in flight are shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .server import Response, route

if TYPE_CHECKING:
    from .server import DebugServer

#: (stats key, metric name, help) of the machine gauges taken from the last sample.
MACHINE_GAUGES = (
    ("cpu_percent", "bigmrun_machine_cpu_percent", "CPU use of the machine's process (%)."),
    ("rss", "bigmrun_machine_rss_bytes", "Resident memory of the machine's process."),
    ("mem_percent", "bigmrun_machine_mem_percent", "Memory in use on the machine's host (%)."),
    ("load1", "bigmrun_machine_load1", "1-minute load average of the machine's host."),
)


def cumulative(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one is the overflow) as Prometheus' cumulative
    ``(le, count)`` pairs ending with ``+Inf``."""
    out: list[tuple[str, float]] = []
    total = 0.0
    for i, bound in enumerate(bounds):
        total += counts[i] if i < len(counts) else 0.0
        out.append((floatToGoString(bound), total))
    total += sum(counts[len(bounds):])
    out.append(("+Inf", total))
    return out


class ClusterCollector(Collector):
    """A prometheus_client collector over one driver's debug server."""

    def __init__(self, srv: DebugServer) -> None:
        self.srv = srv

    def _sampled(self) -> dict[str, dict[str, Any]]:
        """The last sample of each machine of the session (name -> stats)."""
        latest = dict(self.srv.monitor.latest)
        return {m.name: latest[m.name] for m in self.srv.b.machines() if m.name in latest}

    def collect(self) -> Iterator[Metric]:
        sampled = self._sampled()
        yield from self._variables(sampled)
        yield from self._rpc(sampled)
        yield from self._machines(sampled)

    def _variables(self, sampled: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        from .. import vars as bvars

        snaps = {name: st.get("vars") or {} for name, st in sampled.items()}
        snaps["driver"] = bvars.default_registry().snapshot()
        counters: dict[str, CounterMetricFamily] = {}
        gauges: dict[str, GaugeMetricFamily] = {}
        hists: dict[str, HistogramMetricFamily] = {}
        for machine in sorted(snaps):
            snap = snaps[machine]
            for name, v in sorted((snap.get("counters") or {}).items()):
                c = counters.get(name)
                if c is None:
                    c = counters[name] = CounterMetricFamily(
                        name, bvars.describe(name)[1] or f"cluster counter {name}",
                        labels=["machine"])
                c.add_metric([machine], float(v))
            for name, v in sorted((snap.get("gauges") or {}).items()):
                g = gauges.get(name)
                if g is None:
                    g = gauges[name] = GaugeMetricFamily(
                        name, bvars.describe(name)[1] or f"cluster gauge {name}",
                        labels=["machine"])
                g.add_metric([machine], float(v))
            for name, h in sorted((snap.get("histograms") or {}).items()):
                hf = hists.get(name)
                if hf is None:
                    hf = hists[name] = HistogramMetricFamily(
                        name, bvars.describe(name)[1] or f"cluster histogram {name}",
                        labels=["machine"])
                hf.add_metric([machine], cumulative(h["buckets"], h["counts"]),
                              sum_value=float(h["sum"]))
        yield from counters.values()
        yield from gauges.values()
        yield from hists.values()

    def _rpc(self, sampled: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        labels = ["machine", "method"]
        families = {
            key: CounterMetricFamily(f"bigmrun_rpc_{key}", doc, labels=labels)
            for key, doc in (
                ("calls", "Calls received by the machine, per method."),
                ("errors", "Calls that raised (or failed) on the machine, per method."),
                ("bytes_in", "Bytes of call arguments received, per method."),
                ("bytes_out", "Bytes of replies sent, per method."),
            )
        }
        latency = HistogramMetricFamily(
            "bigmrun_rpc_latency_seconds",
            "Time from a call's arrival to its reply on the machine, per method.",
            labels=labels)
        for machine in sorted(sampled):
            for method, r in sorted((sampled[machine].get("rpc") or {}).items()):
                for key, fam in families.items():
                    fam.add_metric([machine, method], float(r.get(key, 0)))
                latency.add_metric(
                    [machine, method],
                    cumulative(r.get("latency_buckets", ()), r.get("latency_counts", ())),
                    sum_value=float(r.get("latency_sum", 0.0)))
        yield from families.values()
        yield latency

    def _machines(self, sampled: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        for key, name, doc in MACHINE_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["machine"])
            for machine in sorted(sampled):
                v = sampled[machine].get(key)
                if v is not None:
                    g.add_metric([machine], float(v))
            yield g
        high = GaugeMetricFamily("bigmrun_machine_mem_high",
                                 "1 when the host's memory use is above the threshold "
                                 "(BIGMRUN_MEM_THRESHOLD, default 90%).", labels=["machine"])
        for machine in sorted(sampled):
            high.add_metric([machine], 1.0 if sampled[machine].get("mem_high") else 0.0)
        yield high
        inflight = GaugeMetricFamily("bigmrun_machine_calls_in_flight",
                                     "Calls the driver has sent to the machine and awaits.",
                                     labels=["machine"])
        for m in sorted(self.srv.b.machines(), key=lambda m: m.name):
            inflight.add_metric([m.name], float(m.calls_in_flight))
        yield inflight


def render(srv: DebugServer) -> bytes:
    """The Prometheus text exposition of the cluster behind ``srv``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(srv))
    return generate_latest(registry)


@route("/metrics")
def metrics(srv: DebugServer, q: dict[str, str]) -> Response:
    return Response(render(srv), content_type=CONTENT_TYPE_LATEST)
