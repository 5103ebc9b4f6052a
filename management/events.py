"""The audit log: events peers post (sessions, execs, forwards, refusals) and events
management records itself (peer registered/deleted, policy changed), listed and followed.

Peer events are validated field by field (`parse_peer_event`), stored with `peer_id` and
`received_at`, and handed out in id order, so `since=<last id>` pages without gaps.
Control characters in any string are stored as visible escapes (`meshmgmt.escaping`).
Following (`EventFeed.wait`) wakes at once for events written through this process and
polls the database about once a second for those written through other replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, select

from meshsshd.logs import event

from .errors import BadRequest
from .metrics import Registry
from .escaping import escape_strings
from .store import Event, Store, aware, utcnow

PEER_EVENT_TYPES = (
    "session.started",
    "session.ended",
    "exec",
    "subsystem",
    "forward.opened",
    "forward.closed",
    "auth.refused",
    "session.revoked",
    # detached sessions (meshsshd/detached/, docs/remoting-sessions.md)
    "detached.started",
    "detached.attached",
    "detached.detached",
    "detached.killed",
    "detached.revoked",
)
STR_FIELDS = ("session_id", "identity", "source_peer", "source_ip", "local_user", "command",
               "subsystem", "forward", "reason", "via", "signal")
INT_FIELDS = ("bytes_in", "bytes_out", "exit_status")
MAX_STRING = 4096  # characters of one string field
INT_RANGE = (-(2**31), 2**63 - 1)  # exit statuses are signed, byte counts large
log = logging.getLogger("meshmgmt.events")

MAX_EVENTS_PER_POST = 1000
PRUNE_BATCH = 5000  # rows per delete transaction, so pruning never holds the write lock for long
_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def parse_time(value: Any, field: str) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise BadRequest(f"field {field!r} must be an ISO 8601 time", field=field)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"field {field!r} must be an ISO 8601 time", field=field) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def parse_peer_event(doc: Any, where: str) -> tuple[str, datetime | None, dict[str, Any]]:
    """(type, time, data) of one posted AuditEvent; unknown fields are dropped."""
    if not isinstance(doc, dict):
        raise BadRequest(f"{where} must be an object", field=where)
    etype = doc.get("type")
    if not isinstance(etype, str) or etype not in PEER_EVENT_TYPES:
        raise BadRequest(f"{where}.type must be one of {', '.join(PEER_EVENT_TYPES)}", field=f"{where}.type")
    when = parse_time(doc["time"], f"{where}.time") if doc.get("time") is not None else None
    data: dict[str, Any] = {}
    for k in STR_FIELDS:
        v = doc.get(k)
        if v is None:
            continue
        if not isinstance(v, str) or len(v) > MAX_STRING:
            raise BadRequest(f"{where}.{k} must be a string (≤ {MAX_STRING} characters)", field=f"{where}.{k}")
        data[k] = v  # a NUL or ESC in a command is evidence: kept, and escaped when stored
    for k in INT_FIELDS:
        v = doc.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not INT_RANGE[0] <= v <= INT_RANGE[1]:
            raise BadRequest(f"{where}.{k} must be an integer", field=f"{where}.{k}")
        data[k] = v
    return etype, when, data


def event_to_dict(e: Event) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": e.id, "type": e.type}
    if e.peer_id:
        doc["peer_id"] = e.peer_id
    if e.time is not None:
        doc["time"] = aware(e.time).isoformat().replace("+00:00", "Z")  # type: ignore[union-attr]
    doc["received_at"] = aware(e.received_at).isoformat().replace("+00:00", "Z")  # type: ignore[union-attr]
    doc.update(e.data or {})
    return doc


class EventFeed:
    """Writes and reads the audit log; wakes followers when something new arrives."""

    def __init__(self, store: Store, poll_interval: float = 1.0) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._cond = asyncio.Condition()

    async def record(self, etype: str, *, peer_id: str | None = None, when: datetime | None = None,
                     **data: Any) -> None:
        """A management-side event (e.g. `peer.registered`)."""
        if not _TYPE.match(etype):
            raise ValueError(f"bad event type {etype!r}")
        async with self.store.write() as s:
            s.add(Event(type=etype, peer_id=peer_id, time=when or utcnow(), data=escape_strings(data)))
        await self._wake()

    async def ingest(self, peer_id: str, events: list[tuple[str, datetime | None, dict[str, Any]]]) -> int:
        now = utcnow()
        async with self.store.write() as s:
            for etype, when, data in events:
                s.add(Event(type=etype, peer_id=peer_id, time=when, received_at=now, data=escape_strings(data)))
        await self._wake()
        return len(events)

    async def prune(self, retention: float) -> int:
        """Delete events received more than `retention` seconds ago, in batches; how many."""
        cutoff = utcnow() - timedelta(seconds=retention)
        total = 0
        while True:
            old = select(Event.id).where(Event.received_at < cutoff).order_by(Event.id).limit(PRUNE_BATCH)
            async with self.store.write() as s:
                n = (await s.execute(delete(Event).where(Event.id.in_(old)))).rowcount or 0
            total += n
            if n < PRUNE_BATCH:
                return total

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def list(self, since: int = 0, limit: int = 100, peer_id: str | None = None,
                   etype: str | None = None) -> list[dict[str, Any]]:
        q = select(Event).where(Event.id > since)
        if peer_id:
            q = q.where(Event.peer_id == peer_id)
        if etype:
            q = q.where(Event.type == etype)
        async with self.store.session() as s:
            rows = (await s.execute(q.order_by(Event.id).limit(limit))).scalars().all()
        return [event_to_dict(e) for e in rows]

    async def latest_id(self) -> int:
        from sqlalchemy import func

        async with self.store.session() as s:
            return int((await s.execute(select(func.max(Event.id)))).scalar() or 0)

    async def wait(self, timeout: float | None = None) -> None:
        """Until something may have been written here, or the poll interval passed."""
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait(), timeout or self.poll_interval)
            except TimeoutError:
                pass


async def prune_events(feed: EventFeed, retention: int, registry: Registry) -> AsyncIterator[None]:
    """An aiohttp cleanup context: while the app runs, delete events older than `retention` seconds at start and then
    every `retention / 4` (at most hourly). A failed prune (disk full, database away) is
    logged and retried next time; it never stops the server."""
    pruned = registry.counter("meshmgmt_audit_events_pruned_total", "Audit events deleted by --audit-retention")

    async def loop() -> None:
        while True:
            try:
                n = await feed.prune(retention)
            except Exception as exc:  # noqa: BLE001  the store logs its own failures
                event(log, "audit.prune_failed", level=logging.WARNING, error=type(exc).__name__)
            else:
                if n:
                    pruned.inc(n)
                    event(log, "audit.pruned", events=n, retention_s=retention)
            await asyncio.sleep(min(3600.0, max(1.0, retention / 4)))

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
