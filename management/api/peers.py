"""Peer-facing routes: register, self-update, the sync WebSocket, audit ingest — and the
user-facing list of reachable peers (`GET /api/me/peers`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from dataclasses import fields
from typing import Any

from aiohttp import WSMsgType, web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from meshsshd.logs import event
from meshsshd.state import PeerFlags

from ..errors import BadRequest, Conflict, TooManyRequests, Unauthorized
from ..events import MAX_EVENTS_PER_POST, parse_peer_event
from ..netmap import reachable_peers
from ..store import Group, Peer, SetupKey, aware, hash_secret, new_secret, utcnow
from . import _validate as v
from ._auth import require_peer, require_user
from ._lookup import reserve_id_shape
from .enrol import authorise_rekey, consume_proof
from .keys import AUDIT_LIMITER, EVENTS, HUB, LOAD_STATE, METRICS, REGISTER_LIMITER, SETTINGS, STORE

log = logging.getLogger("meshmgmt.api.peers")
routes = web.RouteTableDef()

# The switches a peer reports (docs/protocol.md). The daemon's PeerFlags is their one
# definition, so a new flag cannot be sent by peers and silently dropped here.
PEER_FLAGS = tuple(f.name for f in fields(PeerFlags))
MAX_ENDPOINTS = 16
DROPPED = "meshmgmt_audit_events_dropped_total"
DROPPED_HELP = "Audit events refused at ingest, by reason (rate_limited: the peer keeps them and retries)"


def parse_flags(value: Any) -> dict[str, bool]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("field 'flags' must be an object of booleans", field="flags")
    out: dict[str, bool] = {}
    for k in PEER_FLAGS:
        b = v.boolean(value, k, field=f"flags.{k}")
        if b is not None:
            out[k] = b
    return out


def parse_endpoints(doc: dict[str, Any]) -> list[str] | None:
    return v.str_list(doc, "endpoints", v.ENDPOINT, max_items=MAX_ENDPOINTS)


_LABEL_BAD = re.compile(r"[^a-z0-9-]+")


def dns_label(hostname: str) -> str:
    """A DNS label from a hostname: first label, lowercase, [a-z0-9-], ≤ 50 characters,
    never shaped like a peer id (admin commands take an id or a name)."""
    label = _LABEL_BAD.sub("-", hostname.split(".")[0].lower()).strip("-")[:50].strip("-")
    return reserve_id_shape(label or "peer")


async def unique_name(s: Any, base: str, exclude_id: str | None = None) -> str:
    taken = set((await s.execute(select(Peer.name).where(Peer.name.like(f"{base}%")))).scalars())
    if exclude_id is not None:
        own = (await s.execute(select(Peer.name).where(Peer.id == exclude_id))).scalar()
        taken.discard(own)
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def first_free_address(network: str, used: set[str]) -> str:
    """Lowest free host address; the network address, the first host (kept for a
    gateway/management) and the broadcast address are never handed out."""
    net = ipaddress.ip_network(network)
    for i in range(2, net.num_addresses - 1):
        candidate = str(net.network_address + i)
        if candidate not in used:
            return candidate
    raise Conflict(f"the address pool {network} is exhausted", code="pool_exhausted")


def setup_key_problem(key: SetupKey | None) -> str | None:
    if key is None:
        return "unknown setup key"
    if key.revoked:
        return "the setup key was revoked"
    expires = aware(key.expires_at)
    if expires is not None and expires <= utcnow():
        return "the setup key has expired"
    limit = key.usage_limit if key.reusable else 1
    if limit and key.used_count >= limit:
        return "the setup key has been used up"
    return None


@routes.post("/api/peers/register")
async def register(request: web.Request) -> web.Response:
    decision = request.app[REGISTER_LIMITER].hit(request.remote or "?")
    if not decision.allowed:
        raise TooManyRequests("too many registrations from this address; slow down", decision.retry_after)
    doc = await v.json_object(request)
    setup_key = v.string(doc, "setup_key", v.SETUP_KEY, required=True)
    wg = v.string(doc, "wg_public_key", v.WG_KEY, required=True) or ""
    host_key = v.ssh_public_key(v.string(doc, "ssh_host_key", v.SSH_PUBLIC_KEY, default="") or "")
    hostname = v.string(doc, "hostname", v.HOSTNAME, required=True) or ""
    flags = parse_flags(doc.get("flags"))
    version = v.string(doc, "version", v.VERSION, default="") or ""
    endpoints = parse_endpoints(doc) or []
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    credential = new_secret()
    for attempt in range(8):
        try:
            async with store.change("peer.registered") as s:
                await consume_proof(request, s, doc, wg)
                q = select(SetupKey).where(SetupKey.key_hash == hash_secret(setup_key or ""))
                if store.is_postgres:
                    q = q.with_for_update()
                key = (await s.execute(q)).scalar_one_or_none()
                problem = setup_key_problem(key)
                if problem is not None:
                    raise Unauthorized(problem, field="setup_key", code="invalid_setup_key")
                assert key is not None
                peer = (await s.execute(select(Peer).where(Peer.wg_public_key == wg))).scalar_one_or_none()
                created = peer is None
                rekey = "" if peer is None else authorise_rekey(request, peer)
                key.used_count += 1
                key.last_used = utcnow()
                if peer is None:
                    used = set((await s.execute(select(Peer.mesh_ip))).scalars())
                    peer = Peer(
                        name=await unique_name(s, dns_label(hostname)),
                        mesh_ip=first_free_address(settings.network, used),
                        wg_public_key=wg,
                        credential_hash=hash_secret(credential),
                        setup_key_id=key.id,
                    )
                    s.add(peer)
                peer.credential_hash = hash_secret(credential)
                peer.hostname = hostname
                peer.ssh_host_key = host_key
                peer.flags = flags
                peer.version = version
                peer.endpoints = endpoints
                peer.last_seen = utcnow()
                if key.auto_groups:
                    groups = (await s.execute(select(Group).where(Group.id.in_(list(key.auto_groups))))).scalars()
                    for g in groups:
                        if peer not in g.peers:
                            g.peers.append(peer)
                await s.flush()
                result = {"peer_id": peer.id, "name": peer.name, "mesh_ip": peer.mesh_ip}
            break
        except IntegrityError:
            if attempt == 7:
                raise Conflict("could not allocate a name and address; try again", code="busy") from None
            await asyncio.sleep(0.01 * (attempt + 1))
    result.update(fqdn=f"{result['name']}.{settings.dns_domain}", network=settings.network,
                  credential=credential)
    event(log, "peer.registered", peer=result["peer_id"], peer_name=result["name"], mesh_ip=result["mesh_ip"],
          new=created, rekey=rekey or None)
    await request.app[EVENTS].record("peer.registered" if created else "peer.reregistered",
                                     peer_id=result["peer_id"], name=result["name"], mesh_ip=result["mesh_ip"],
                                     hostname=hostname, **({"allowed_by": rekey} if rekey else {}))
    return web.json_response(result, status=201)


@routes.post("/api/peers/self")
async def update_self(request: web.Request) -> web.Response:
    peer = await require_peer(request)
    doc = await v.json_object(request)
    changes: dict[str, Any] = {}
    if "flags" in doc and doc["flags"] is not None:
        changes["flags"] = parse_flags(doc["flags"])
    version = v.string(doc, "version", v.VERSION)
    if version is not None:
        changes["version"] = version
    endpoints = parse_endpoints(doc)
    if endpoints is not None:
        changes["endpoints"] = endpoints
    host_key = v.string(doc, "ssh_host_key", v.SSH_PUBLIC_KEY)
    if host_key is not None:
        changes["ssh_host_key"] = v.ssh_public_key(host_key)
    store = request.app[STORE]
    differs = any(getattr(peer, k) != val for k, val in changes.items())
    ctx = store.change("peer.updated") if differs else store.write()
    async with ctx as s:
        row = await s.get(Peer, peer.id)
        if row is None:
            raise Unauthorized("unknown peer", code="peer_unauthorized")
        for k, val in changes.items():
            setattr(row, k, val)
        row.last_seen = utcnow()
    settings = request.app[SETTINGS]
    return web.json_response({"peer_id": peer.id, "name": peer.name, "mesh_ip": peer.mesh_ip,
                              "fqdn": f"{peer.name}.{settings.dns_domain}", "network": settings.network})


async def _touch(request: web.Request, peer_id: str) -> None:
    with contextlib.suppress(Exception):
        async with request.app[STORE].write() as s:
            row = await s.get(Peer, peer_id)
            if row is not None:
                row.last_seen = utcnow()


@routes.get("/api/peers/sync")
async def sync(request: web.Request) -> web.StreamResponse:
    peer = await require_peer(request)
    ws = web.WebSocketResponse(heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise BadRequest("this endpoint is a WebSocket", field="Upgrade", code="websocket_required")
    await ws.prepare(request)
    hub = request.app[HUB]
    await _touch(request, peer.id)
    stream = await hub.attach(peer.id, ws)
    event(log, "sync.connected", peer=peer.id)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError, TypeError):
                doc = json.loads(msg.data)
                if isinstance(doc, dict) and doc.get("type") == "ping":
                    await ws.send_json({"type": "pong"})
    finally:
        hub.detach(stream)
        event(log, "sync.disconnected", peer=peer.id)
        await _touch(request, peer.id)
    return ws


@routes.post("/api/peers/events")
async def ingest_events(request: web.Request) -> web.Response:
    peer = await require_peer(request)
    doc = await v.json_object(request)
    items = doc.get("events")
    if not isinstance(items, list):
        raise BadRequest("field 'events' must be a list of events", field="events")
    if len(items) > MAX_EVENTS_PER_POST:
        raise BadRequest(f"at most {MAX_EVENTS_PER_POST} events per request", field="events")
    # Each started KiB of body costs one event too, so a peer cannot fill the disk with
    # few huge events any faster than with many small ones.
    cost = max(len(items), -(-len(await request.read()) // 1024))
    decision = request.app[AUDIT_LIMITER].hit(peer.id, cost)
    if not decision.allowed:
        request.app[METRICS].counter(DROPPED, DROPPED_HELP).inc(len(items), reason="rate_limited")
        event(log, "audit.rate_limited", level=logging.WARNING, peer=peer.id, events=len(items),
              retry_after=round(decision.retry_after, 1))
        raise TooManyRequests(f"this peer sends audit events faster than {request.app[SETTINGS].audit_rate:g}/s; "
                              "keep them and retry later", decision.retry_after)
    try:
        parsed = [parse_peer_event(e, f"events[{i}]") for i, e in enumerate(items)]
    except BadRequest:
        request.app[METRICS].counter(DROPPED, DROPPED_HELP).inc(len(items), reason="invalid")
        raise
    n = await request.app[EVENTS].ingest(peer.id, parsed)
    return web.json_response({"accepted": n}, status=202)


@routes.get("/api/me/peers")
async def my_peers(request: web.Request) -> web.Response:
    caller = await require_user(request)
    from ..idp.exchange import resolve_local_users

    state = await request.app[LOAD_STATE]()
    email = caller.email or ""
    out = []
    groups_of: dict[str, list[str]] = {}
    for g in sorted(state.groups, key=lambda g: g.name):
        for pid in g.peer_ids:
            groups_of.setdefault(pid, []).append(g.name)
    for p in reachable_peers(state, email):
        # `localpart` is shown as the caller's own login name (what the SSH token will carry).
        # `groups`: the peer's group names, so clients can expand `group:NAME` (fan-out,
        # delegation lists) without admin rights.
        out.append({**p.to_dict(), "local_users": list(resolve_local_users(p.local_users, email)),
                    "groups": groups_of.get(p.id, [])})
    return web.json_response({"peers": out})


__all__ = ["routes", "dns_label", "first_free_address", "setup_key_problem"]
