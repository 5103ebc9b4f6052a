"""Prometheus `/metrics` for the peer, on a local address, off unless `--metrics-listen`.

Counters come from the audit events the server emits (the same stream management gets,
so the numbers agree with the audit log): logins refused by reason, sessions started and
ended, bytes moved, live-session revocations; accepted logins come from the server's
`auth.accepted` log event (the audit stream has none). Gauges are read when scraped: live sessions
from the server, the applied map's serial, whether the sync stream is up, the audit queue.
The server's own `stats` dict (connections dropped by MaxStartups, evicted, ...) is
exported as `meshsshd_server_<name>`. The text format is rendered here (`render()` is pure); no client library.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from typing import Any

from aiohttp import web

from .audit import AuditEvent
from .config import parse_listen
from .logs import event

log = logging.getLogger("meshsshd.metrics")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# The text exposition format's own media type (Prometheus negotiates on it); both
# daemons' /metrics answer with exactly this.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(families: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """[(name, type, help, [(labels, value)])] → Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    for name, kind, help_text, samples in families:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            num = repr(float(value)) if value != int(value) else str(int(value))
            out.append(f"{name}{{{lab}}} {num}" if lab else f"{name} {num}")
    return "\n".join(out) + "\n"


class Counters:
    """What the audit stream tells us, accumulated."""

    def __init__(self) -> None:
        self.auth_failures: Counter[str] = Counter()
        self.auth_successes: Counter[str] = Counter()
        self.sessions_started = 0
        self.sessions_ended = 0
        self.sessions_revoked = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def observe(self, ev: AuditEvent) -> None:
        doc = ev.to_dict()
        kind = doc.get("type")
        if kind == "auth.refused":
            self.auth_failures[str(doc.get("reason") or "unknown")] += 1
        elif kind == "session.started":
            self.sessions_started += 1
        elif kind == "session.ended":
            self.sessions_ended += 1
            self.bytes_in += int(doc.get("bytes_in") or 0)
            self.bytes_out += int(doc.get("bytes_out") or 0)
        elif kind == "session.revoked":
            self.sessions_revoked += 1


class _AcceptedLogins(logging.Handler):
    """Counts the SSH server's `auth.accepted` events by method. The audit stream has no
    event for a successful login (only for the sessions that follow), and the server logs
    one structured event per accepted login, so this is where successes are counted."""

    def __init__(self, counters: Counters) -> None:
        super().__init__(logging.INFO)
        self.counters = counters

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "auth.accepted":
            fields = getattr(record, "fields", None) or {}
            self.counters.auth_successes[str(fields.get("method") or "unknown")] += 1


class MetricsServer:
    def __init__(self, listen: str, agent: Any) -> None:
        self.host, self.port = parse_listen(listen)
        self.agent = agent
        self.counters = Counters()
        self._runner: web.AppRunner | None = None
        self._logins = _AcceptedLogins(self.counters)

    def observe(self, ev: AuditEvent) -> None:
        self.counters.observe(ev)

    emit = observe   # an AuditSink too: `serve` mode fans its audit events out to it

    async def families(self) -> list[tuple[str, str, str, list[tuple[dict[str, str], float]]]]:
        c = self.counters
        agent = self.agent
        live = 0
        server = getattr(agent, "server", None)
        stats: dict[str, Any] = {}
        if server is not None:
            sessions = server.sessions()
            if inspect.isawaitable(sessions):
                sessions = await sessions
            live = len(sessions)
            raw = getattr(server, "stats", None)
            raw = raw() if callable(raw) else raw
            stats = dict(raw) if isinstance(raw, dict) else {}
        netmap = getattr(agent, "netmap", None)
        mgmt = getattr(agent, "_mgmt", {})
        uplink = getattr(agent, "uplink", None)
        fams: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
            ("meshsshd_sessions", "gauge", "Live SSH sessions.", [({}, live)]),
            ("meshsshd_ssh_serving", "gauge", "1 while the SSH server runs.",
             [({}, 1 if server is not None else 0)]),
            ("meshsshd_sessions_started_total", "counter", "SSH sessions started.", [({}, c.sessions_started)]),
            ("meshsshd_sessions_ended_total", "counter", "SSH sessions ended.", [({}, c.sessions_ended)]),
            ("meshsshd_sessions_revoked_total", "counter", "Live sessions closed by a policy change.",
             [({}, c.sessions_revoked)]),
            ("meshsshd_auth_failures_total", "counter", "Logins refused, by reason.",
             [({"reason": r}, n) for r, n in sorted(c.auth_failures.items())]),
            ("meshsshd_auth_successes_total", "counter", "Logins accepted, by method.",
             [({"method": m}, n) for m, n in sorted(c.auth_successes.items())]),
            ("meshsshd_session_bytes_total", "counter", "Bytes moved by ended sessions.",
             [({"direction": "in"}, c.bytes_in), ({"direction": "out"}, c.bytes_out)]),
            ("meshsshd_netmap_serial", "gauge", "Serial of the network map in force.",
             [({}, netmap.serial if netmap is not None else 0)]),
            ("meshsshd_management_connected", "gauge", "1 while the sync stream is up.",
             [({}, 1 if mgmt.get("connected") else 0)]),
        ]
        if uplink is not None:
            fams.append(("meshsshd_audit_queued", "gauge", "Audit events waiting for management.",
                         [({}, len(uplink.queue))]))
            fams.append(("meshsshd_audit_dropped_total", "counter", "Audit events dropped (queue full).",
                         [({}, uplink.dropped)]))
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)):
                fams.append((f"meshsshd_server_{key}", "counter" if key.endswith("_total") else "gauge",
                             f"SSH server statistic {key}.", [({}, value)]))
            elif isinstance(value, dict):
                fams.append((f"meshsshd_server_{key}", "counter", f"SSH server statistic {key}.",
                             [({"reason": str(k)}, v) for k, v in sorted(value.items())]))
        return fams

    async def _handle(self, request: web.Request) -> web.Response:
        text = render(await self.families())
        return web.Response(text=text, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE,
                                                "X-Content-Type-Options": "nosniff"})

    async def start(self) -> None:
        # (Counted only while the log level is info or lower, the default.)
        logging.getLogger("meshsshd.server").addHandler(self._logins)
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        event(log, "metrics.listening", listen=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        logging.getLogger("meshsshd.server").removeHandler(self._logins)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
