"""Admin routes for the audit log: a page of it, and a WebSocket that follows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from ..errors import BadRequest
from . import _validate as v
from ._auth import require_admin
from .keys import EVENTS

log = logging.getLogger("meshmgmt.api.audit")
routes = web.RouteTableDef()


@routes.get("/api/events")
async def list_events(request: web.Request) -> web.Response:
    await require_admin(request)
    since = v.query_int(request, "since", 0, v.SINCE)
    limit = v.query_int(request, "limit", 100, v.LIMIT)
    peer = v.query_str(request, "peer_id", v.QUERY_ID)
    etype = v.query_str(request, "type", v.QUERY_ID)
    events = await request.app[EVENTS].list(since=since, limit=limit, peer_id=peer, etype=etype)
    nxt = events[-1]["id"] if events else since
    return web.json_response({"events": events, "next": nxt})


@routes.get("/api/events/stream")
async def follow_events(request: web.Request) -> web.StreamResponse:
    """WebSocket: `{"type": "event", "event": {...}}` for each event after `since`
    (default: only new ones)."""
    await require_admin(request)
    feed = request.app[EVENTS]
    since_q = request.query.get("since")
    since = v.query_int(request, "since", 0, v.SINCE) if since_q else await feed.latest_id()
    ws = web.WebSocketResponse(heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise BadRequest("this endpoint is a WebSocket", field="Upgrade", code="websocket_required")
    await ws.prepare(request)

    async def pump() -> None:
        nonlocal since
        try:
            while not ws.closed:
                for e in await feed.list(since=since, limit=500):
                    await ws.send_json({"type": "event", "event": e})
                    since = e["id"]
                await feed.wait()
        except (ConnectionError, RuntimeError):
            pass  # the follower went away
        except Exception:
            log.exception("event stream failed")
        await ws.close()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return ws


__all__ = ["routes"]
