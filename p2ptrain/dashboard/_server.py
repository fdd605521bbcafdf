"""The live page: a read-only aiohttp server on the node's own event loop.

::

    async with p2ptrain.Node(...) as node:
        jobs = p2ptrain.JobService(node)
        async with p2ptrain.Dashboard(node, jobs, address="127.0.0.1:8080") as dash:
            print(dash.url)
            await jobs.serve()

Routes (GET only; any other method gets 405 before a byte of its body is read):

- ``/``                  the page (``static/index.html``), which loads ``/static/app.js``
  and ``/static/style.css``: shipped in the package, no CDN, works offline;
- ``/api/status``        the ring now, as JSON (:meth:`RingStatus.snapshot`);
- ``/api/events``        the same as Server-Sent Events, once a second and at once on a
  view change.

Bounds: request lines and headers (4 KiB each, 64 headers), bodies (none: 413, unread),
requests per client address (:class:`~p2ptrain.dashboard._guard.RateLimiter`: 429),
live-update clients (:data:`MAX_STREAMS`: 503), connections (:data:`MAX_CONNECTIONS`;
one that has not finished its request within :data:`CONNECTION_S` is closed, so slow
headers or bodies hold nothing for long), and a stream whose client stops reading is
dropped after :data:`WRITE_TIMEOUT_S`. Training never waits on the page: the page only
reads what the hooks left in :class:`RingStatus`.

Binding an address other than loopback needs the cluster secret, and then every
``/api`` request must present :func:`dashboard_token` (``Authorization: Bearer`` or
``?token=``; the page asks for it): 401 otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from p2ptrain._errors import ConfigError, worth_logging
from p2ptrain.dashboard._guard import RateLimiter, dashboard_token, host_allowed, is_loopback, parse_address, token_matches
from p2ptrain.dashboard._share import StatusShare, within
from p2ptrain.ring import Node, check_secret

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["INSTALL_HINT", "Dashboard", "require_aiohttp"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'p2ptrain[dashboard]'"
MAX_STREAMS = 8  # live pages at once: a team glancing at one ring, not an audience
MAX_CONNECTIONS = 64
CONNECTION_S = 10.0  # a request (headers and any body) must be done by then; live streams are exempt
WRITE_TIMEOUT_S = 5.0
KEEPALIVE_S = 5.0
MIN_GAP_S = 0.25  # at most 4 updates a second, however often the ring changes
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
_HEADERS = {
    # The page runs only its own files: no inline script, nothing from elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _HttpLog(logging.LoggerAdapter):
    """aiohttp's log of request handling: a malformed request is the client's doing and goes to debug
    (a flood of them must not fill the host's log with tracebacks); anything else stays an error."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc_info, HttpProcessingError):
            self.debug("bad request refused: %s", exc_info)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kw)


def require_aiohttp() -> None:
    """Raise :class:`ConfigError` naming the extra to install when aiohttp is missing."""
    if importlib.util.find_spec("aiohttp") is None:
        raise ConfigError(f"the dashboard needs aiohttp, which is not installed: {INSTALL_HINT}")


class Dashboard:
    """Serve the live page for ``node``'s ring from ``node``'s event loop.

    An async context manager; closing twice is safe.

    Args:
        node: a started node.
        jobs: its :class:`p2ptrain.JobService`, for the job, plan, loss and timeline
            (its hooks are chained; the host's own still run first).
        address: ``[ADDR:]PORT`` to bind; a bare port binds 127.0.0.1, port 0 a free one
            (read it back from :attr:`port` or :attr:`url`).
        secret: the cluster secret. Needed to bind anything but loopback; the page then
            asks for :attr:`token`.
        share: the node's :class:`StatusShare` when the host runs one already (one per
            node); by default the dashboard runs its own.
        interval: seconds between two updates of the page.
        token_required: ask for the token on loopback too (a machine other people log
            into); the default asks for it off loopback only. Needs ``secret``.

    Raises:
        ConfigError: a bad address, a non-loopback address without a secret, or aiohttp
            missing (``pip install 'p2ptrain[dashboard]'``).
    """

    def __init__(self, node: Node, jobs: Any = None, *, address: str = "127.0.0.1:0", secret: bytes | str | None = None,
                 share: StatusShare | None = None, interval: float = 1.0, token_required: bool | None = None) -> None:
        self.node = node
        self.host, self._port = parse_address(address)
        secret = check_secret(secret)
        if not is_loopback(self.host) and secret is None:
            raise ConfigError(f"the dashboard binds {self.host}, which is not loopback: that needs the cluster secret "
                              "(--secret-file F or $P2PTRAIN_SECRET), so the page can ask for a token; or bind 127.0.0.1")
        if token_required is None:
            token_required = not is_loopback(self.host)
        if token_required and secret is None:
            raise ConfigError("token_required=True needs the cluster secret: the token is derived from it")
        self.token: str | None = dashboard_token(secret) if token_required and secret is not None else None
        self.interval = interval
        self._own_share = share is None
        self.share = share if share is not None else StatusShare(node, jobs, interval=interval)
        if share is not None and jobs is not None and share._jobs is None:
            share.attach(jobs)
        self.stats: dict[str, int] = {"requests": 0, "rate_limited": 0, "unauthorized": 0, "bad_host": 0,
                                      "not_allowed": 0, "busy": 0, "closed_slow": 0, "dropped_streams": 0}
        self._limiter = RateLimiter()
        self._files: dict[str, bytes] = {}
        self._runner: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: set[Any] = set()  # the connections serving live updates
        self._seen: dict[Any, float] = {}  # connection -> when the watchdog first saw it
        self._frame = b""
        self._tick = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` of the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/"

    async def start(self) -> None:
        """Bind and serve; start the ring share if the dashboard runs its own.

        Raises:
            ConfigError: aiohttp is missing.
            TransportError: the address could not be bound.
        """
        if self._runner is not None or self._closed:
            return
        require_aiohttp()
        # aiohttp's first import takes ~0.2 s of the host's loop (a walkthrough measured its lag): a thread does it.
        await asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "aiohttp.web")
        from aiohttp import web

        from p2ptrain._errors import TransportError

        root = importlib.resources.files("p2ptrain.dashboard") / "static"
        self._files = {name: (root / name).read_bytes() for name in STATIC}

        @web.middleware
        async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
            return await self._guard(request, handler)

        app = web.Application(client_max_size=1024, middlewares=[guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events, allow_head=False)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=KEEPALIVE_S,
                               max_line_size=4096, max_field_size=4096, max_headers=64, lingering_time=1.0,
                               logger=_HttpLog(logging.getLogger(__name__ + ".http"), {}))
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port, backlog=32)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TransportError(f"the dashboard could not bind {self.host}:{self._port}: {exc}") from exc
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        if self._own_share:
            await self.share.start()
        self.share.watch(True)
        self._tasks = [asyncio.create_task(self._publisher(), name="p2ptrain-dashboard-publish"),
                       asyncio.create_task(self._watchdog(), name="p2ptrain-dashboard-watchdog")]
        logger.info("dashboard for %s at %s%s", self.node.node_id, self.url, " (token required)" if self.token else "")

    async def close(self) -> None:
        """Stop serving (live pages are cut) and stop asking the ring for reports. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._tick.set()  # streams waiting for an update end now
        if self._runner is not None:
            for handler in list(self._runner.server.connections if self._runner.server else ()):
                handler.force_close()
            await self._runner.cleanup()
        self.share.watch(False)
        if self._own_share:
            await self.share.close()

    def snapshot(self) -> dict[str, Any]:
        """The ring now, as the page gets it."""
        node = self.node
        snap = self.share.status.snapshot(node.members(), epoch=node.view.epoch, state=node.state.value, cluster=node.cluster)
        snap["server"] = dict(self.stats)
        return snap

    # --- HTTP ------------------------------------------------------------------------------

    @property
    def _web(self) -> Any:
        from aiohttp import web

        return web

    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.stats["requests"] += 1
        if request.method not in ("GET", "HEAD"):
            self.stats["not_allowed"] += 1
            return self._error(405, "the dashboard only reads: GET", {"Allow": "GET, HEAD"})
        if request.content_length or "Transfer-Encoding" in request.headers:
            self.stats["not_allowed"] += 1
            return self._error(413, "the dashboard takes no request body")
        if self.token is None and not host_allowed(request.headers.get("Host")):
            self.stats["bad_host"] += 1
            return self._error(403, "use an IP address or localhost in the URL")
        if not self._limiter.allow(request.remote or "?"):
            self.stats["rate_limited"] += 1
            return self._error(429, "too many requests", {"Retry-After": "1"})
        if self.token is not None and request.path.startswith("/api/"):
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else request.query.get("token")
            if not token_matches(given, self.token):
                self.stats["unauthorized"] += 1
                return self._error(401, "this page needs the dashboard token (printed where the dashboard started)")
        try:
            response: web.StreamResponse = await handler(request)
        except self._web.HTTPException as exc:  # 404 and friends: short plain text, our headers
            return self._error(exc.status, exc.reason)
        return response

    def _error(self, status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
        response: web.Response = self._web.Response(status=status, text=text + "\n", headers={**_HEADERS, **(headers or {})})
        response.force_close()
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        if name not in STATIC or name == "index.html":
            return self._error(404, "no such file")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        response: web.Response = self._web.Response(body=self._files[name], content_type=STATIC[name], headers=_HEADERS)
        return response

    async def _status(self, request: web.Request) -> web.Response:
        response: web.Response = self._web.Response(body=self._encode(self.snapshot()), content_type="application/json",
                                                    headers=_HEADERS)
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= MAX_STREAMS:
            self.stats["busy"] += 1
            return self._error(503, f"{MAX_STREAMS} live pages are open already; close one", {"Retry-After": "5"})
        response = self._web.StreamResponse(headers={**_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        conn = request.protocol
        self._streams.add(conn)
        try:
            await response.prepare(request)
            frame = self._build()  # fresh, not the last update made for other pages
            while not self._closed:
                if not await within(response.write(frame), WRITE_TIMEOUT_S):
                    self.stats["dropped_streams"] += 1  # the client stopped reading
                    break
                tick = self._tick
                frame = self._frame if await within(tick.wait(), 15.0) else b": keep-alive\n\n"
        except (ConnectionError, RuntimeError):
            self.stats["dropped_streams"] += 1  # the client went away
        finally:
            self._streams.discard(conn)
        return response

    # --- updates ---------------------------------------------------------------------------

    def _encode(self, snap: dict[str, Any]) -> bytes:
        return json.dumps(snap, separators=(",", ":"), allow_nan=False).encode()

    def _build(self) -> bytes:
        """Make the next update frame and wake every live stream."""
        try:
            data = self._encode(self.snapshot())
        except Exception:  # a value JSON cannot hold, or a bug: skip this update, keep serving
            n = self.stats["snapshot_errors"] = self.stats.get("snapshot_errors", 0) + 1
            if worth_logging(n):  # it is rebuilt up to 4 times a second
                logger.exception("dashboard snapshot failed (%d so far); the page keeps the last one", n)
            return self._frame
        self._frame = b"event: status\ndata: " + data + b"\n\n"
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        return self._frame

    async def _publisher(self) -> None:
        changed = self.share.changed
        while True:
            await within(changed.wait(), self.interval)
            changed.clear()
            if self._streams:
                self._build()
            await asyncio.sleep(MIN_GAP_S)  # pacing (an upper bound on the update rate), not a wait for anything

    async def _watchdog(self) -> None:
        """Close connections that are too slow or too many (slowloris); live streams are left alone."""
        while True:
            await asyncio.sleep(1.0)  # a periodic sweep; nothing to wait on for a connection that sends nothing
            server = self._runner.server if self._runner is not None else None
            if server is None:
                continue
            now = time.monotonic()
            conns = server.connections
            self._seen = {c: self._seen.get(c, now) for c in conns}
            idle = sorted((c for c in conns if c not in self._streams), key=self._seen.__getitem__)
            excess = max(0, len(conns) - MAX_CONNECTIONS)
            for i, conn in enumerate(reversed(idle)):  # newest first for the excess, then every slow one
                if i < excess or now - self._seen[conn] > CONNECTION_S:
                    self.stats["closed_slow"] += 1
                    conn.force_close()
