"""Admin routes for users, service users included: list, create, update, delete.

A service user has a client id and a one-time client secret instead of a password; a
changed password, role or block ends the user's logins made before it.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from aiohttp import web

from meshsshd.logs import event

from ..errors import Unprocessable
from ..idp.grants import revoke_user_families
from ..store import User, hash_password_async, hash_secret, new_secret
from . import _validate as v
from ._auth import require_admin
from ._rows import delete_recorded, flush_unique, get_row, iso, list_response
from .keys import EVENTS, STORE

log = logging.getLogger("meshmgmt.api.users")
routes = web.RouteTableDef()


def user_dict(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "email": u.email,
        "name": u.name,
        "role": u.role,
        "service": u.is_service,
        "client_id": u.client_id,
        "blocked": u.blocked,
        "has_password": u.password_hash is not None,
        "groups": sorted(g.name for g in u.groups),
        "created": iso(u.created),
    }


@routes.get("/api/users")
async def list_users(request: web.Request) -> web.Response:
    await require_admin(request)
    return await list_response(request, "users", User, User.email, user_dict)


@routes.post("/api/users")
async def create_user(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"email", "name", "password", "role", "service"})
    email = (v.string(doc, "email", v.EMAIL, required=True) or "").lower()
    name = v.string(doc, "name", v.USER_NAME, default="") or ""
    password = v.string(doc, "password", v.PASSWORD)
    role = v.string(doc, "role", v.ROLE, default="user")
    service = bool(v.boolean(doc, "service", False))
    if service and password is not None:
        raise Unprocessable("a service user has a client secret, not a password", field="password")
    secret = None
    user = User(email=email, name=name, role=role, is_service=service)
    if password is not None:
        user.password_hash = await hash_password_async(password)
    if service:
        secret = new_secret()
        user.client_id = "svc-" + secrets.token_hex(8)
        user.client_secret_hash = hash_secret(secret)
    async with request.app[STORE].change("user.created") as s:
        s.add(user)
        await flush_unique(s, f"a user with email {email} exists")
        await s.refresh(user, ["groups"])
        doc_out = user_dict(user)
    if secret is not None:
        doc_out["client_secret"] = secret  # shown once
    event(log, "user.created", user=user.id, role=role, service=service)
    await request.app[EVENTS].record("user.created", user_id=user.id, email=email, service=service)
    return web.json_response(doc_out, status=201)


@routes.put("/api/users/{id}")
async def update_user(request: web.Request) -> web.Response:
    caller = await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "password", "role", "blocked"})
    name = v.string(doc, "name", v.USER_NAME)
    password = v.string(doc, "password", v.PASSWORD)
    role = v.string(doc, "role", v.ROLE)
    blocked = v.boolean(doc, "blocked")
    pw_hash = await hash_password_async(password) if password is not None else None
    async with request.app[STORE].change("user.updated") as s:
        user = await get_row(s, User, request, "user")
        if pw_hash is not None:
            if user.is_service:
                raise Unprocessable("a service user has a client secret, not a password", field="password")
            user.password_hash = pw_hash
        if name is not None:
            user.name = name
        # What an admin changed about who may do what: each is an audit event with its actor.
        audited: list[tuple[str, dict[str, Any]]] = []
        if pw_hash is not None:
            audited.append(("user.password_reset", {}))
        if role is not None and role != user.role:
            audited.append(("user.role_changed", {"role_from": user.role, "role_to": role}))
        if blocked is not None and blocked != user.blocked:
            audited.append(("user.blocked" if blocked else "user.unblocked", {}))
        stale = [why for why, changed in (("password-reset", pw_hash is not None),
                                          ("role-changed", role is not None and role != user.role),
                                          ("blocked", bool(blocked))) if changed]
        if role is not None:
            user.role = role
        if blocked is not None:
            user.blocked = blocked
        logins = 0
        if stale:  # the logins made under the old password, role or access end with it
            logins = await revoke_user_families(s, user.id, ",".join(stale))
        out = user_dict(user)
    for etype, fields in audited:
        event(log, etype, user=out["id"], logins=logins)
        await request.app[EVENTS].record(etype, user_id=out["id"], email=out["email"],
                                         actor=caller.email or caller.kind, logins_signed_out=logins, **fields)
    return web.json_response(out)


@routes.delete("/api/users/{id}")
async def delete_user(request: web.Request) -> web.Response:
    await require_admin(request)
    return await delete_recorded(request, User, "user", "user.deleted", "email")


__all__ = ["routes", "user_dict"]
