"""Admin routes over registered peers: list, one by id or name, rename or switch SSH, delete.

The peer-facing routes (register, self-update, sync, audit ingest) are in peers.py.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import NotFound
from ..idp.why_not import STATE_WORDS, ssh_state
from ..store import Peer
from . import _validate as v
from ._auth import require_admin
from ._lookup import by_id_or_name
from ._rows import all_rows, flush_unique, iso, path_id
from .keys import EVENTS, HUB, LOAD_STATE, SETTINGS, STORE

routes = web.RouteTableDef()


def peer_dict(p: Peer, dns_domain: str, connected: set[str]) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "fqdn": f"{p.name}.{dns_domain}",
        "mesh_ip": p.mesh_ip,
        "hostname": p.hostname,
        "wg_public_key": p.wg_public_key,
        "ssh_host_key": p.ssh_host_key,
        "flags": p.flags or {},
        "version": p.version,
        "endpoints": p.endpoints or [],
        "ssh_enabled": p.ssh_enabled,
        "groups": sorted(g.name for g in p.groups),
        "connected": p.id in connected,
        "created": iso(p.created),
        "last_seen": iso(p.last_seen),
    }


async def _with_ssh_state(request: web.Request, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer's effective SSH state next to its admin toggle (`ssh_enabled`): in words
    (`ssh_state`), as the token exchange's reason code, and why, naming the fix."""
    state = await request.app[LOAD_STATE]()
    for doc in docs:
        record = state.peers_by_id.get(doc["id"])
        if record is None:   # deleted since the row was read
            continue
        code, reason = ssh_state(state, record)
        doc.update(ssh_state=STATE_WORDS.get(code, code), ssh_state_code=code, ssh_state_reason=reason)
    return docs


async def _find_peer(s: Any, ref: str) -> Peer:
    peer = await by_id_or_name(s, Peer, ref)
    if peer is None:
        raise NotFound("no such peer")
    return peer


@routes.get("/api/peers")
async def list_peers(request: web.Request) -> web.Response:
    await require_admin(request)
    settings = request.app[SETTINGS]
    connected = request.app[HUB].connected_peers
    async with request.app[STORE].session() as s:
        peers = await all_rows(s, Peer, Peer.name)
        docs = [peer_dict(p, settings.dns_domain, connected) for p in peers]
    return web.json_response({"peers": await _with_ssh_state(request, docs)})


@routes.get("/api/peers/{id}")
async def get_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].session() as s:
        peer = await _find_peer(s, path_id(request))
        doc = peer_dict(peer, request.app[SETTINGS].dns_domain, request.app[HUB].connected_peers)
    return web.json_response((await _with_ssh_state(request, [doc]))[0])


@routes.put("/api/peers/{id}")
async def update_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "ssh_enabled"})
    name = v.string(doc, "name", v.PEER_NAME)
    ssh_enabled = v.boolean(doc, "ssh_enabled")
    async with request.app[STORE].change("peer.updated") as s:
        peer = await _find_peer(s, path_id(request))
        if name is not None:
            peer.name = name
        if ssh_enabled is not None:
            peer.ssh_enabled = ssh_enabled
        await flush_unique(s, f"a peer named {name} exists")
        out = peer_dict(peer, request.app[SETTINGS].dns_domain, request.app[HUB].connected_peers)
    await request.app[EVENTS].record("peer.updated", peer_id=out["id"], name=out["name"],
                                     ssh_enabled=out["ssh_enabled"])
    return web.json_response((await _with_ssh_state(request, [out]))[0])


@routes.delete("/api/peers/{id}")
async def delete_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].change("peer.deleted") as s:
        peer = await _find_peer(s, path_id(request))
        peer_id, name = peer.id, peer.name
        await s.delete(peer)
    await request.app[EVENTS].record("peer.deleted", peer_id=peer_id, name=name)
    return web.Response(status=204)


__all__ = ["peer_dict", "routes"]
