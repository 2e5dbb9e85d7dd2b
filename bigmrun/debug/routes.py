"""The debug server's JSON routes: session, machines, logs, time series, variables."""

from __future__ import annotations

import time
from typing import Any

from .server import DebugServer, HTTPError, Response, route


def machine_rows(srv: DebugServer) -> list[dict[str, Any]]:
    """One row per machine of the session: what ``bigmrun ps`` shows."""
    b = srv.b
    now = time.time()
    rows = []
    for m in b.machines():
        st = srv.monitor.latest.get(m.name, {})
        handle = m.handle.describe() if m.handle is not None else {}
        rows.append({
            "session": b.session_id,
            "machine": m.name,
            "addr": m.addr,
            "system": b.system.name,
            "state": m.state.name,
            "owned": m.owned,
            "uptime": (now - m.started_at) if m.started_at else None,
            "cpu_percent": st.get("cpu_percent"),
            "rss": st.get("rss"),
            "mem_percent": st.get("mem_percent"),
            "mem_high": bool(st.get("mem_high", False)),
            "load1": st.get("load1"),
            "calls_in_flight": m.calls_in_flight,
            "error": None if m.err is None else f"{type(m.err).__name__}: {m.err}",
            "sampled": st.get("time"),
            **{k: v for k, v in handle.items() if k in ("pid", "host", "instance_id")},
        })
    return rows


@route("/api/session")
def session(srv: DebugServer, q: dict[str, str]) -> Response:
    info = srv.info
    return Response({
        "session": srv.b.session_id,
        "system": srv.b.system.name,
        "pid": info.pid if info else None,
        "program": info.program if info else "",
        "started": srv.b.started_at,
        "uptime": srv.uptime(),
        "machines": len(srv.b.machines()),
        "sample_interval": srv.monitor.interval,
    })


@route("/api/machines")
def machines(srv: DebugServer, q: dict[str, str]) -> Response:
    return Response(machine_rows(srv))


@route("/api/logs")
def logs(srv: DebugServer, q: dict[str, str]) -> Response:
    """``?machine=NAME&since=SEQ&n=N``: lines after ``since`` (all machines if none)."""
    machine = q.get("machine") or None
    try:
        since = int(q.get("since", "0"))
        n = int(q["n"]) if q.get("n") else None
    except ValueError:
        raise HTTPError(400, "since and n must be whole numbers") from None
    names = sorted({m.name for m in srv.b.machines()} | set(srv.b.output.lines))
    if machine is not None and machine not in names:
        raise HTTPError(404, f"no machine {machine!r} in session {srv.b.session_id} "
                             f"(machines: {', '.join(names) or 'none'})")
    lines = srv.b.output.since(since, machine, n)
    return Response({"lines": [list(ln) for ln in lines], "last": srv.b.output.last_seq,
                     "machines": names})


@route("/api/timeseries")
def timeseries(srv: DebugServer, q: dict[str, str]) -> Response:
    try:
        since = float(q.get("since", "0"))
    except ValueError:
        raise HTTPError(400, "since must be a number (unix time)") from None
    return Response({"interval": srv.monitor.interval,
                     "series": srv.monitor.store.query(q.get("metric") or None, since)})


def aggregate_vars(srv: DebugServer) -> dict[str, Any]:
    """Every cluster variable: its kind, the sum, and the value per machine."""
    from .. import vars as bvars

    per_machine: dict[str, dict[str, Any]] = {
        name: st.get("vars") or {} for name, st in srv.monitor.latest.items()
        if any(m.name == name for m in srv.b.machines())
    }
    per_machine["driver"] = bvars.default_registry().snapshot()
    out: dict[str, Any] = {}
    for machine, snap in per_machine.items():
        for kind in ("counters", "gauges"):
            for name, v in (snap.get(kind) or {}).items():
                e = out.setdefault(name, {"kind": kind[:-1], "help": bvars.describe(name)[1],
                                          "sum": 0.0, "machines": {}})
                e["machines"][machine] = v
                e["sum"] += v
        for name, h in (snap.get("histograms") or {}).items():
            e = out.setdefault(name, {"kind": "histogram", "help": bvars.describe(name)[1],
                                      "buckets": h["buckets"], "counts": [0] * len(h["counts"]),
                                      "sum": 0.0, "count": 0, "machines": {}})
            e["machines"][machine] = h
            e["counts"] = [a + c for a, c in zip(e["counts"], h["counts"], strict=False)]
            e["sum"] += h["sum"]
            e["count"] += h["count"]
    return out


@route("/debug/vars")
def debug_vars(srv: DebugServer, q: dict[str, str]) -> Response:
    return Response(aggregate_vars(srv))
