"""Admin routes for SSH subsystems set from management, per peer or per group.

    GET    /api/subsystems                          → {"subsystems": [...]}
    PUT    /api/peers/{id}/subsystems/{name}         {"command": "..."} → the entry (upsert)
    DELETE /api/peers/{id}/subsystems/{name}         → 204
    PUT    /api/groups/{id}/subsystems/{name}        {"command": "..."}
    DELETE /api/groups/{id}/subsystems/{name}

`{id}` is the id or the name. Entries reach peers in their network map's
`ssh.subsystems` (management/netmap.py `subsystems_for`); the peer runs the command as
the logged-in user through the user's shell, exactly as a `[subsystems]` line of its
local config. `sftp` is not configurable here: the peer's `--enable-ssh-sftp` decides it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from ..errors import BadRequest, NotFound
from ..store import Group, Peer
from ..store.models import Subsystem
from . import _validate as v
from ._auth import require_admin
from ._lookup import by_id_or_name
from .keys import EVENTS, STORE

routes = web.RouteTableDef()

RESERVED = ("sftp",)
# A subsystem name as SSH clients send it (RFC 4254 §6.5; `name@domain` allowed).
SUBSYSTEM_NAME = v.Text(64, 1, v.whole("[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"),
                        "is letters, digits and . _ - @ (at most 64)")
# One command line for the user's shell: no NUL or line break, and not only blanks.
COMMAND = v.Text(1024, 1, v.whole("[^\\x00\\r\\n]*[^\\x00\\r\\n \\t\\f\\v][^\\x00\\r\\n]*"),
                 "must be one line (no NUL, CR or LF) and not blank")


def check_name(name: str) -> str:
    SUBSYSTEM_NAME.check(name, "name")
    if name in RESERVED:
        raise BadRequest("sftp is the peer's own (turn it on with --enable-ssh-sftp)", field="name")
    return name


def subsystem_dict(x: Subsystem, peers: dict[str, str], groups: dict[str, str]) -> dict[str, Any]:
    return {
        "id": x.id, "name": x.name, "command": x.command,
        "peer": x.peer_id, "peer_name": peers.get(x.peer_id or ""),
        "group": x.group_id, "group_name": groups.get(x.group_id or ""),
    }


async def _names(s: Any) -> tuple[dict[str, str], dict[str, str]]:
    peers = dict((await s.execute(select(Peer.id, Peer.name))).all())
    groups = dict((await s.execute(select(Group.id, Group.name))).all())
    return peers, groups


async def _owner(s: Any, kind: str, ref: str) -> tuple[str, str]:
    """(id, name) of the peer or group named by id or name in the path."""
    model = Peer if kind == "peer" else Group
    if len(ref) > 100 or "\x00" in ref:
        raise NotFound(f"no such {kind}")
    row = await by_id_or_name(s, model, ref)
    if row is None:
        raise NotFound(f"no such {kind}")
    return row.id, row.name


def _column(kind: str) -> Any:
    return Subsystem.peer_id if kind == "peer" else Subsystem.group_id


@routes.get("/api/subsystems")
async def list_subsystems(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].session() as s:
        rows = (await s.execute(select(Subsystem).order_by(Subsystem.name, Subsystem.id))).scalars().all()
        peers, groups = await _names(s)
        return web.json_response({"subsystems": [subsystem_dict(x, peers, groups) for x in rows]})


async def _set(request: web.Request, kind: str) -> web.Response:
    await require_admin(request)
    name = check_name(request.match_info["name"])
    doc = await v.json_object(request)
    v.only_known(doc, {"command"})
    command = v.string(doc, "command", COMMAND, required=True) or ""
    async with request.app[STORE].change("subsystem.set") as s:
        owner_id, owner_name = await _owner(s, kind, request.match_info["id"])
        col = _column(kind)
        row = (await s.execute(select(Subsystem).where(col == owner_id, Subsystem.name == name))).scalars().first()
        if row is None:
            row = Subsystem(name=name, command=command, **{f"{kind}_id": owner_id})
            s.add(row)
        else:
            row.command = command
        await s.flush()
        peers, groups = await _names(s)
        out = subsystem_dict(row, peers, groups)
    await request.app[EVENTS].record("subsystem.set", **{kind: owner_name}, name=name, command=command)
    return web.json_response(out)


async def _unset(request: web.Request, kind: str) -> web.Response:
    await require_admin(request)
    name = request.match_info["name"]
    async with request.app[STORE].change("subsystem.unset") as s:
        owner_id, owner_name = await _owner(s, kind, request.match_info["id"])
        row = (await s.execute(select(Subsystem).where(_column(kind) == owner_id,
                                                         Subsystem.name == name))).scalars().first()
        if row is None:
            raise NotFound(f"{kind} {owner_name} has no subsystem {name!r}")
        await s.delete(row)
    await request.app[EVENTS].record("subsystem.unset", **{kind: owner_name}, name=name)
    return web.Response(status=204)


@routes.put("/api/peers/{id}/subsystems/{name}")
async def set_peer_subsystem(request: web.Request) -> web.Response:
    return await _set(request, "peer")


@routes.delete("/api/peers/{id}/subsystems/{name}")
async def unset_peer_subsystem(request: web.Request) -> web.Response:
    return await _unset(request, "peer")


@routes.put("/api/groups/{id}/subsystems/{name}")
async def set_group_subsystem(request: web.Request) -> web.Response:
    return await _set(request, "group")


@routes.delete("/api/groups/{id}/subsystems/{name}")
async def unset_group_subsystem(request: web.Request) -> web.Response:
    return await _unset(request, "group")


__all__ = ["COMMAND", "RESERVED", "SUBSYSTEM_NAME", "check_name", "routes"]
