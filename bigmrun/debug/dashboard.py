"""``GET /``: the dashboard, one self-contained HTML page for people.

The page (``dashboard.html`` beside this module: inline CSS and JavaScript, no external
resources, so it works offline) shows the session, a machine table with links to each
machine's logs and to the merged profile, and one chart per metric (CPU, memory, disk,
network, load, threads, every cluster variable) with a line per machine, drawn on a
canvas by its own code. It takes the token from its own URL (``/?token=TOKEN``) and
sends it as a Bearer header on its fetches of the JSON routes, every few seconds.

For tests and tools the page exposes ``window.bigmrunDashboard``: ``charts`` (metric ->
machine -> points drawn), ``machines``, ``refreshes`` and ``errors``; each chart's element
carries ``data-metric``, ``data-points`` and ``data-machines``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

from .server import Response, route

if TYPE_CHECKING:
    from .server import DebugServer


@lru_cache(maxsize=1)
def page() -> bytes:
    """The dashboard's HTML."""
    return resources.files("bigmrun.debug").joinpath("dashboard.html").read_bytes()


@route("/")
def dashboard(srv: DebugServer, q: dict[str, str]) -> Response:
    return Response(page(), content_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy":
                             "default-src 'none'; script-src 'unsafe-inline'; "
                             "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
                             "frame-ancestors 'none'",
                             "Referrer-Policy": "no-referrer"})
