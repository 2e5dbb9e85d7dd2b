"""The driver's debug server: a small HTTP API on 127.0.0.1, protected by a token.

How this works
--------------
Every driver starts one (``ThreadingHTTPServer`` on a daemon thread, port 0) and writes
its URL and token to a private session file (``sessions.py``); ``bigmrun ps``/``logs``/
``profile`` read that file and talk to it with ``requests``. Every request must carry
the token (``Authorization: Bearer TOKEN``, or ``?token=`` for a browser) and come from
a loopback address; anything else gets 401/403 before any handler runs. JSON is for
tools, HTML (the dashboard at ``/``) for people.

Routes are registered with :func:`route`; modules add their own (profiles, metrics,
dashboard) without this file knowing them.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from . import sessions
from .monitor import Monitor

if TYPE_CHECKING:
    from .._session import B

log = logging.getLogger("bigmrun.debug")


class Response:
    """What a route returns."""

    def __init__(self, body: bytes | str | Any, content_type: str = "application/json",
                 status: int = 200, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, (bytes, bytearray)):
            self.body = bytes(body)
        elif isinstance(body, str):
            self.body = body.encode()
        else:
            self.body = json.dumps(body, default=str).encode()
        self.content_type = content_type
        self.status = status
        self.headers = headers or {}


Handler = Callable[["DebugServer", dict[str, str]], Response]
ROUTES: dict[str, Handler] = {}


def route(path: str) -> Callable[[Handler], Handler]:
    """Register ``fn(server, query) -> Response`` for GET ``path``."""

    def register(fn: Handler) -> Handler:
        ROUTES[path] = fn
        return fn

    return register


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class _RequestHandler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        srv = self.server.debug
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not _is_loopback(self.client_address[0]):
            self._send(Response({"error": "the debug server only answers loopback"},
                                status=403))
            return
        token = query.pop("token", "")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[7:]
        if not token or not hmac.compare_digest(token.encode(), srv.token.encode()):
            self._send(Response({"error": "missing or wrong token (see the session file)"},
                                status=401))
            return
        fn = ROUTES.get(url.path.rstrip("/") or "/")
        if fn is None:
            self._send(Response({"error": f"no route {url.path}",
                                 "routes": sorted(ROUTES)}, status=404))
            return
        try:
            resp = fn(srv, query)
        except HTTPError as e:
            resp = Response({"error": str(e)}, status=e.status)
        except Exception as e:
            log.exception("debug route %s failed", url.path)
            resp = Response({"error": f"{type(e).__name__}: {e}"}, status=500)
        self._send(resp)

    def _send(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    debug: DebugServer


class DebugServer:
    """One per driver. ``url`` and ``token`` go into the session file."""

    def __init__(self, b: B, host: str = "127.0.0.1") -> None:
        self.b = b
        self.token = secrets.token_urlsafe(32)
        self.monitor = Monitor(b)
        self._httpd = _HTTPServer((host, 0), _RequestHandler)
        self._httpd.debug = self
        port = self._httpd.server_address[1]
        self.url = f"http://{host}:{port}"
        # A short poll interval: shutdown() waits for the serving loop to notice, and
        # every program's exit waits for shutdown().
        self._thread = threading.Thread(target=self._serve, name="bigmrun-debug",
                                        daemon=True)
        self.info: sessions.SessionInfo | None = None

    def __repr__(self) -> str:
        return f"<DebugServer {self.url} token=<hidden>>"

    def _serve(self) -> None:
        # The routes are imported here, off the program's own thread (prometheus_client
        # and friends take ~0.05 s): a request that comes meanwhile waits in the
        # listening socket's backlog, not for a route that is not there yet.
        from ..profiling import routes as _profile  # noqa: F401  (/debug/profile)
        from . import dashboard, metrics, routes  # noqa: F401  (registers the routes)

        self._httpd.serve_forever(0.05)

    def start(self) -> None:
        from .. import _loop

        self._thread.start()
        self.monitor.start(_loop.get_loop())
        self.info = sessions.SessionInfo(
            session=self.b.session_id, pid=os.getpid(), started=self.b.started_at,
            url=self.url, token=self.token, system=self.b.system.name,
            program=" ".join(sys.argv) or sys.executable)
        with contextlib.suppress(OSError):
            sessions.write(self.info)

    def stop(self) -> None:
        from .. import _loop

        sessions.remove(self.b.session_id)
        self.monitor.stop(_loop.get_loop())
        # shutdown() waits for the serving loop's next poll (up to 0.05 s): let a thread
        # of its own wait for that, not the program's exit.
        threading.Thread(target=self._close, name="bigmrun-debug-stop", daemon=True).start()

    def _close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def uptime(self) -> float:
        return time.time() - self.b.started_at
