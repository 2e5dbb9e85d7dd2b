"""The debug server's ``/debug/profile`` route: the merged profile of a running session.

``GET /debug/profile?seconds=5&format=svg|speedscope|collapsed|raw&machine=NAME
&native=1&idle=1&driver=1&by_machine=1&rate=100&nonblocking=1&lines=1`` (token required, like
every debug route) profiles the RUNNING machines for ``seconds`` and answers with ONE
merged profile: an interactive SVG flamegraph (the default, shown inline), speedscope
JSON or collapsed text (as downloads), or ``raw``: the JSON bundle of per-machine
stacks that ``bigmrun profile`` fetches. The samples per participant are in the
``X-Bigmrun-Samples`` header, machines that failed in ``X-Bigmrun-Errors`` (JSON); when
every participant failed the answer is 502 with their errors.
"""

from __future__ import annotations

import json
import time

from ..debug.server import DebugServer, HTTPError, Response, route
from .capture import DEFAULT_RATE, MAX_SECONDS
from .cluster import FORMATS, SelectionError, profile_cluster, render_bundle

_TRUE = ("1", "true", "yes", "on")


def _flag(q: dict[str, str], name: str) -> bool:
    value = q.get(name, "").strip().lower()
    if value and value not in (*_TRUE, "0", "false", "no", "off"):
        raise HTTPError(400, f"{name} must be 1 or 0 (true or false), got {value!r}")
    return value in _TRUE


def _int(q: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(q.get(name) or default)
    except ValueError:
        raise HTTPError(400, f"{name} must be a whole number, got {q.get(name)!r}") from None
    if not lo <= value <= hi:
        raise HTTPError(400, f"{name} must be {lo}..{hi}, got {value}")
    return value


def _header(value: object) -> str:
    return json.dumps(value, ensure_ascii=True).replace("\n", " ")[:4000]


@route("/debug/profile")
def profile(srv: DebugServer, q: dict[str, str]) -> Response:
    fmt = q.get("format") or "svg"
    if fmt not in (*FORMATS, "raw"):
        raise HTTPError(400, f"format must be one of {', '.join([*FORMATS, 'raw'])}, "
                             f"got {fmt!r}")
    seconds = _int(q, "seconds", 5, 1, MAX_SECONDS)
    rate = _int(q, "rate", DEFAULT_RATE, 1, 10000)
    try:
        bundle = profile_cluster(
            srv.b, seconds, machine=q.get("machine") or None, native=_flag(q, "native"),
            idle=_flag(q, "idle"), driver=_flag(q, "driver"), rate=rate,
            nonblocking=_flag(q, "nonblocking"), lines=_flag(q, "lines"))
    except SelectionError as e:
        raise HTTPError(e.status, str(e)) from None
    if fmt == "raw":
        return Response(bundle)
    if not bundle["profiles"]:
        lines = "\n".join(f"{k}: {v}" for k, v in bundle["errors"].items())
        raise HTTPError(502, f"no participant could be profiled:\n{lines}")
    body = render_bundle(bundle, fmt, by_machine=_flag(q, "by_machine"))
    ctype, ext = FORMATS[fmt]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(bundle["time"]))
    name = f"bigmrun-profile-{srv.b.session_id[:8]}-{stamp}.{ext}"
    headers = {
        "Content-Disposition": f'{"inline" if fmt == "svg" else "attachment"}; '
                               f'filename="{name}"',
        "X-Bigmrun-Samples": _header({k: p["samples"] for k, p in bundle["profiles"].items()}),
    }
    if bundle["errors"]:
        headers["X-Bigmrun-Errors"] = _header(bundle["errors"])
    return Response(body, content_type=ctype, headers=headers)
