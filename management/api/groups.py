"""Admin routes for groups of peers and users: list, create, update, delete.

Policies name groups by name, so a rename rewrites their rules and a group a policy
uses cannot be deleted.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from ..errors import Conflict, Unprocessable
from ..store import Group, Peer, User
from . import _validate as v
from ._auth import require_admin
from ._lookup import by_id_or_name
from ._rows import flush_unique, get_row, iso, list_response
from .keys import STORE
from .policies import policies_using

routes = web.RouteTableDef()


def group_dict(g: Group) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "peers": sorted(p.id for p in g.peers),
        "peer_names": sorted(p.name for p in g.peers),
        "users": sorted(u.id for u in g.users),
        "user_emails": sorted(u.email for u in g.users),
        "created": iso(g.created),
    }


async def _resolve_peers(s: Any, refs: list[str], field: str = "peers") -> list[Peer]:
    out = []
    for i, ref in enumerate(refs):
        peer = await by_id_or_name(s, Peer, ref)
        if peer is None:
            raise Unprocessable(f"{field}[{i}]: no peer with id or name {ref!r}", field=f"{field}[{i}]")
        out.append(peer)
    return list(dict.fromkeys(out))


async def _resolve_users(s: Any, refs: list[str], field: str = "users") -> list[User]:
    out = []
    for i, ref in enumerate(refs):
        user = (
            await s.execute(select(User).where((User.id == ref) | (User.email == ref.strip().lower())))
        ).scalars().first()
        if user is None:
            raise Unprocessable(f"{field}[{i}]: no user with id or email {ref!r}", field=f"{field}[{i}]")
        out.append(user)
    return list(dict.fromkeys(out))


@routes.get("/api/groups")
async def list_groups(request: web.Request) -> web.Response:
    await require_admin(request)
    return await list_response(request, "groups", Group, Group.name, group_dict)


@routes.post("/api/groups")
async def create_group(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "peers", "users"})
    name = v.string(doc, "name", v.NAME, required=True) or ""
    peers = v.str_list(doc, "peers", v.PEER_REF, default=[]) or []
    users = v.str_list(doc, "users", v.USER_REF, default=[]) or []
    async with request.app[STORE].change("group.created") as s:
        group = Group(name=name)
        group.peers = await _resolve_peers(s, peers)
        group.users = await _resolve_users(s, users)
        s.add(group)
        await flush_unique(s, f"a group named {name} exists")
        out = group_dict(group)
    return web.json_response(out, status=201)


@routes.put("/api/groups/{id}")
async def update_group(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "peers", "users"})
    name = v.string(doc, "name", v.NAME)
    peers = v.str_list(doc, "peers", v.PEER_REF)
    users = v.str_list(doc, "users", v.USER_REF)
    async with request.app[STORE].change("group.updated") as s:
        group = await get_row(s, Group, request, "group")
        if name is not None and name != group.name:
            # Rules name groups: a rename rewrites them so policies keep their meaning.
            for p in await policies_using(s, group.name):
                p.rules = [
                    {**r,
                     "sources": [name if x == group.name else x for x in r.get("sources", [])],
                     "destinations": [name if x == group.name else x for x in r.get("destinations", [])]}
                    for r in p.rules
                ]
            group.name = name
        if peers is not None:
            group.peers = await _resolve_peers(s, peers)
        if users is not None:
            group.users = await _resolve_users(s, users)
        await flush_unique(s, f"a group named {name} exists")
        out = group_dict(group)
    return web.json_response(out)


@routes.delete("/api/groups/{id}")
async def delete_group(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].change("group.deleted") as s:
        group = await get_row(s, Group, request, "group")
        users = await policies_using(s, group.name)
        if users:
            raise Conflict(f"group {group.name} is used by policy {users[0].name}; change the policy first",
                           code="in_use")
        await s.delete(group)
    return web.Response(status=204)


__all__ = ["group_dict", "routes"]
