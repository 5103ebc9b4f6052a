"""Admin routes for setup keys: list (never the keys themselves), create, revoke.

The key is in the create answer only; the store keeps its hash.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select

from ..errors import Unprocessable
from ..store import Group, SetupKey, hash_secret, new_secret, utcnow
from . import _validate as v
from ._auth import require_admin
from ._lookup import by_id_or_name
from ._rows import all_rows, get_row, iso
from .keys import STORE
from .peers import setup_key_problem

routes = web.RouteTableDef()


def setup_key_dict(k: SetupKey, groups: dict[str, str]) -> dict[str, Any]:
    problem = setup_key_problem(k)
    return {
        "id": k.id,
        "name": k.name,
        "reusable": k.reusable,
        "expires_at": iso(k.expires_at),
        "usage_limit": k.usage_limit,
        "used_count": k.used_count,
        "revoked": k.revoked,
        "valid": problem is None,
        "state": "valid" if problem is None else problem,
        "auto_groups": sorted(groups.get(g, g) for g in (k.auto_groups or [])),
        "created": iso(k.created),
        "last_used": iso(k.last_used),
    }


async def _group_names(s: Any) -> dict[str, str]:
    return {gid: name for gid, name in (await s.execute(select(Group.id, Group.name))).all()}


@routes.get("/api/setup-keys")
async def list_setup_keys(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].session() as s:
        keys = await all_rows(s, SetupKey, SetupKey.created)
        names = await _group_names(s)
        return web.json_response({"setup_keys": [setup_key_dict(k, names) for k in keys]})


@routes.post("/api/setup-keys")
async def create_setup_key(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "reusable", "expires_in", "usage_limit", "auto_groups"})
    name = v.string(doc, "name", v.SETUP_KEY_NAME, default="") or ""
    reusable = bool(v.boolean(doc, "reusable", False))
    expires_in = v.integer(doc, "expires_in", v.EXPIRES_IN, 0)
    usage_limit = v.integer(doc, "usage_limit", v.USAGE_LIMIT, 0) or 0
    auto_groups = v.str_list(doc, "auto_groups", v.GROUP_REF, default=[]) or []
    key = "mk_" + new_secret(24)
    async with request.app[STORE].write() as s:
        gids = []
        for i, ref in enumerate(auto_groups):
            g = await by_id_or_name(s, Group, ref)
            if g is None:
                raise Unprocessable(f"auto_groups[{i}]: no group {ref!r}", field=f"auto_groups[{i}]")
            gids.append(g.id)
        row = SetupKey(
            name=name, key_hash=hash_secret(key), reusable=reusable,
            expires_at=utcnow() + timedelta(seconds=expires_in) if expires_in else None,
            usage_limit=usage_limit, auto_groups=list(dict.fromkeys(gids)),
        )
        s.add(row)
        await s.flush()
        out = setup_key_dict(row, await _group_names(s))
    out["key"] = key  # shown once
    return web.json_response(out, status=201)


@routes.delete("/api/setup-keys/{id}")
async def revoke_setup_key(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].write() as s:
        row = await get_row(s, SetupKey, request, "setup key")
        row.revoked = True
    return web.Response(status=204)


__all__ = ["routes", "setup_key_dict"]
