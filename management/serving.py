"""Serving the app on a socket with limits a slow or greedy client cannot get around.

aiohttp has no header-read timeout of its own, but its keep-alive timer starts when a
connection opens and closes it if no complete request head arrived by then; a short
`keepalive_timeout` is therefore the header timeout. Bodies are read under their own
deadline (`api._validate.json_object`). What neither covers is how many connections one
client address may hold: 1100 slow ones exhausted a 1024-fd limit. `ConnectionCap`
wraps each new connection's protocol and closes the connection at once past the cap,
before aiohttp gives it any state. Trusted reverse proxies carry everyone, so they are
exempt. Errors that come in floods (accept failures, malformed requests) are logged at
most a few times per window (`FloodFilter`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from meshsshd.logs import event

log = logging.getLogger("meshmgmt.serving")

HEADER_TIMEOUT = 15.0  # seconds from connect (or from the last answer) to a complete request head
LOG_WINDOW = 10.0  # seconds; FloodFilter lets LOG_BURST lines of one kind through per window
LOG_BURST = 5


class FloodFilter(logging.Filter):
    """At most LOG_BURST records per (logger, message template) per LOG_WINDOW; the first
    record after a quiet window says how many were suppressed."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # key -> (window start, passed, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        start, passed, dropped = self._seen.get(key, (now, 0, 0))
        if now - start >= LOG_WINDOW:
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this suppressed in the last {LOG_WINDOW:g}s]"
            start, passed, dropped = now, 0, 0
        if passed >= LOG_BURST:
            self._seen[key] = (start, passed, dropped + 1)
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (start, passed + 1, dropped)
        return True


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's protocol, or closes the connection if its client is over the cap."""

    def __init__(self, cap: ConnectionCap, inner: Any) -> None:
        self._cap = cap
        self._inner = inner
        self._key: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._key = self._cap.admit(transport)
        if self._key is None:
            transport.abort()
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._key is None:
            return
        self._cap.release(self._key)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._key is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._key is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionCap:
    """Open connections per client address, at most `per_client` (exempt: `exempt` nets)."""

    def __init__(self, per_client: int, exempt: tuple[str, ...] = ()) -> None:
        self.per_client = per_client
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self._open: dict[str, int] = {}
        self.refused = 0

    def wrap(self, factory: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, factory())

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self._is_exempt(host):
            key = ""  # counted nowhere: a proxy's connections are its clients'
        elif self._open.get(host, 0) >= self.per_client:
            self.refused += 1
            event(log, "http.connection_refused", level=logging.WARNING, ip=host, open=self.per_client,
                  refused_total=self.refused)
            return None
        else:
            key = host
        if key:
            self._open[key] = self._open.get(key, 0) + 1
        return key

    def release(self, key: str) -> None:
        if key:
            left = self._open.get(key, 1) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

    def _is_exempt(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._exempt)


def install_flood_filter() -> None:
    """On the loggers that floods reach: asyncio (accept errors) and aiohttp's server."""
    flood = FloodFilter()
    for name in ("asyncio", "aiohttp.server", "aiohttp.web", "meshmgmt.serving"):
        logging.getLogger(name).addFilter(flood)


async def serve(make_app: Awaitable[web.Application], host: str, port: int, cap: ConnectionCap,
                header_timeout: float = HEADER_TIMEOUT, shutdown_timeout: float = 5.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (what `web.run_app` does,
    with the connection cap in front of aiohttp's protocol)."""
    app = await make_app
    # No handler_cancellation: a handler cancelled between a commit and its change
    # notification would leave every sync stream on a stale map.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=header_timeout,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        assert runner.server is not None
        server = await loop.create_server(cap.wrap(runner.server), host, port, reuse_address=True)
        event(log, "mgmt.listening", host=host, port=port, max_connections_per_client=cap.per_client)
        try:
            await stop.wait()
            event(log, "mgmt.stopping", signal=received[0], shutdown_timeout=shutdown_timeout)
        finally:
            server.close()
    finally:
        await runner.cleanup()
    event(log, "mgmt.stopped")
