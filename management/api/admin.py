"""Admin routes: users (incl. service users), groups, setup keys, policies, peers, events.

All need the admin token or an admin's access token. Every write that can change a
network map goes through `store.change(...)`, which bumps the serial and wakes the sync
streams (on every replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from datetime import timedelta
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import WSMsgType, web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from meshsshd.logs import event

from ..errors import BadRequest, Conflict, NotFound, Unprocessable
from ..idp.grants import revoke_user_families
from ..netmap import RULE_PROTOCOLS, USER_PREFIX
from ..store import Group, Peer, Policy, SetupKey, User, aware, hash_password_async, hash_secret, new_secret, utcnow
from . import _validate as v
from ._auth import require_admin
from ._lookup import by_id_or_name, is_id_shaped
from .keys import EVENTS, HUB, SETTINGS, STORE

log = logging.getLogger("meshmgmt.api.admin")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
routes = web.RouteTableDef()


def _iso(dt: Any) -> str | None:
    dt = aware(dt)
    return dt.isoformat().replace("+00:00", "Z") if dt is not None else None


def _path_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if len(value) > 64 or "\x00" in value:
        raise NotFound("no such object")
    return value


_Row = TypeVar("_Row")


async def _get(s: Any, model: type[_Row], request: web.Request, what: str) -> _Row:
    """The row the path's {id} names, or 404 "no such <what>" (one wording for every collection)."""
    row = await s.get(model, _path_id(request))
    if row is None:
        raise NotFound(f"no such {what}")
    return row


async def _all(s: Any, model: type[_Row], order: Any) -> list[_Row]:
    """Every row of `model`, in `order`: what the list endpoints return."""
    return list((await s.execute(select(model).order_by(order))).scalars().all())


async def _list_response(request: web.Request, key: str, model: type[_Row], order: Any,
                         to_dict: Callable[[_Row], dict[str, Any]]) -> web.Response:
    """`{key: [...]}` of every row, for the collections whose dict needs nothing but the row."""
    async with request.app[STORE].session() as s:
        return web.json_response({key: [to_dict(row) for row in await _all(s, model, order)]})


async def _delete_recorded(request: web.Request, model: type[Any], what: str, change: str,
                           *attrs: str) -> web.Response:
    """Delete the path's row in one map-changing write, then record `change` in the audit feed.

    The row is gone once the event is written, so the named `attrs` (e.g. "email") are read
    before the delete: they are what lets a reader of the feed tell which row it was.
    """
    async with request.app[STORE].change(change) as s:
        row = await _get(s, model, request, what)
        fields = {a: getattr(row, a) for a in attrs}
        await s.delete(row)
    await request.app[EVENTS].record(change, **fields)
    return web.Response(status=204)


def _new_name(doc: dict[str, Any]) -> str | None:
    """The optional 'name' of an update: checked like a create's name, None when absent."""
    name = v.string(doc, "name", max_len=100)
    if name is not None:
        v.name(name)
    return name


async def _unique(s: Any, fn: Any) -> None:
    """Flush and turn a unique-constraint violation into 409."""
    try:
        await s.flush()
    except IntegrityError as exc:
        raise Conflict(fn) from exc


# --- users ------------------------------------------------------------------------------


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
        "created": _iso(u.created),
    }


@routes.get("/api/users")
async def list_users(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _list_response(request, "users", User, User.email, user_dict)


def _role(doc: dict[str, Any], default: str | None) -> str | None:
    role = v.string(doc, "role", default=default, max_len=16)
    if role is not None and role not in ("admin", "user"):
        raise BadRequest("field 'role' must be 'admin' or 'user'", field="role")
    return role


@routes.post("/api/users")
async def create_user(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"email", "name", "password", "role", "service"})
    email = v.email(v.string(doc, "email", required=True, max_len=320) or "")
    name = v.string(doc, "name", default="", max_len=200) or ""
    password = v.password(doc, "password")
    role = _role(doc, "user")
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
        await _unique(s, f"a user with email {email} exists")
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
    name = v.string(doc, "name", max_len=200)
    password = v.password(doc, "password")
    role = _role(doc, None)
    blocked = v.boolean(doc, "blocked")
    pw_hash = await hash_password_async(password) if password is not None else None
    async with request.app[STORE].change("user.updated") as s:
        user = await _get(s, User, request, "user")
        if pw_hash is not None:
            if user.is_service:
                raise Unprocessable("a service user has a client secret, not a password", field="password")
            user.password_hash = pw_hash
        if name is not None:
            user.name = name
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
    if pw_hash is not None:
        event(log, "user.password_reset", user=out["id"], logins=logins)
        await request.app[EVENTS].record("user.password_reset", user_id=out["id"], email=out["email"],
                                         actor=caller.email or caller.kind, logins_signed_out=logins)
    return web.json_response(out)


@routes.delete("/api/users/{id}")
async def delete_user(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _delete_recorded(request, User, "user", "user.deleted", "email")


# --- groups -----------------------------------------------------------------------------


def group_dict(g: Group) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "peers": sorted(p.id for p in g.peers),
        "peer_names": sorted(p.name for p in g.peers),
        "users": sorted(u.id for u in g.users),
        "user_emails": sorted(u.email for u in g.users),
        "created": _iso(g.created),
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
    return await _list_response(request, "groups", Group, Group.name, group_dict)


@routes.post("/api/groups")
async def create_group(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "peers", "users"})
    name = v.name(v.string(doc, "name", required=True, max_len=100) or "")
    peers = v.str_list(doc, "peers", default=[], max_len=64) or []
    users = v.str_list(doc, "users", default=[], max_len=320) or []
    async with request.app[STORE].change("group.created") as s:
        group = Group(name=name)
        group.peers = await _resolve_peers(s, peers)
        group.users = await _resolve_users(s, users)
        s.add(group)
        await _unique(s, f"a group named {name} exists")
        out = group_dict(group)
    return web.json_response(out, status=201)


async def _policies_using(s: Any, group_name: str) -> list[Policy]:
    policies = (await s.execute(select(Policy))).scalars().all()
    return [p for p in policies if any(group_name in r.get("sources", []) or group_name in r.get("destinations", [])
                                       for r in (p.rules or []))]


@routes.put("/api/groups/{id}")
async def update_group(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "peers", "users"})
    name = _new_name(doc)
    peers = v.str_list(doc, "peers", max_len=64)
    users = v.str_list(doc, "users", max_len=320)
    async with request.app[STORE].change("group.updated") as s:
        group = await _get(s, Group, request, "group")
        if name is not None and name != group.name:
            # Rules name groups: a rename rewrites them so policies keep their meaning.
            for p in await _policies_using(s, group.name):
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
        await _unique(s, f"a group named {name} exists")
        out = group_dict(group)
    return web.json_response(out)


@routes.delete("/api/groups/{id}")
async def delete_group(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].change("group.deleted") as s:
        group = await _get(s, Group, request, "group")
        users = await _policies_using(s, group.name)
        if users:
            raise Conflict(f"group {group.name} is used by policy {users[0].name}; change the policy first",
                           code="in_use")
        await s.delete(group)
    return web.Response(status=204)


# --- setup keys ------------------------------------------------------------------------------


def setup_key_dict(k: SetupKey, groups: dict[str, str]) -> dict[str, Any]:
    from .peers import setup_key_problem

    problem = setup_key_problem(k)
    return {
        "id": k.id,
        "name": k.name,
        "reusable": k.reusable,
        "expires_at": _iso(k.expires_at),
        "usage_limit": k.usage_limit,
        "used_count": k.used_count,
        "revoked": k.revoked,
        "valid": problem is None,
        "state": "valid" if problem is None else problem,
        "auto_groups": sorted(groups.get(g, g) for g in (k.auto_groups or [])),
        "created": _iso(k.created),
        "last_used": _iso(k.last_used),
    }


async def _group_names(s: Any) -> dict[str, str]:
    return {gid: name for gid, name in (await s.execute(select(Group.id, Group.name))).all()}


@routes.get("/api/setup-keys")
async def list_setup_keys(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].session() as s:
        keys = await _all(s, SetupKey, SetupKey.created)
        names = await _group_names(s)
        return web.json_response({"setup_keys": [setup_key_dict(k, names) for k in keys]})


@routes.post("/api/setup-keys")
async def create_setup_key(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "reusable", "expires_in", "usage_limit", "auto_groups"})
    name = v.string(doc, "name", default="", max_len=100) or ""
    reusable = bool(v.boolean(doc, "reusable", False))
    expires_in = v.integer(doc, "expires_in", 0, lo=0, hi=10 * 365 * 86400)
    usage_limit = v.integer(doc, "usage_limit", 0, lo=0, hi=10_000_000) or 0
    auto_groups = v.str_list(doc, "auto_groups", default=[], max_len=100) or []
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
        row = await _get(s, SetupKey, request, "setup key")
        row.revoked = True
    return web.Response(status=204)


# --- policies ---------------------------------------------------------------------------------

_RULE_KEYS = {"sources", "destinations", "protocol", "ports", "bidirectional", "local_users", "allow_root",
              "action", "accept_env"}


async def parse_rules(s: Any, value: Any) -> list[dict[str, Any]]:
    from meshsshd.netmap import NetmapError, parse_port_range

    if not isinstance(value, list) or not value or len(value) > 100:
        raise BadRequest("field 'rules' must be a list of 1..100 rules", field="rules")
    groups = set((await s.execute(select(Group.name))).scalars())
    out = []
    for i, r in enumerate(value):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise BadRequest(f"{where} must be an object", field=where)
        v.only_known(r, _RULE_KEYS, where=f"{where}.")
        action = r.get("action", "accept")
        if action != "accept":
            raise BadRequest(f"{where}.action: only 'accept' exists (everything else is denied)",
                             field=f"{where}.action")
        sources = v.str_list(r, "sources", field=f"{where}.sources", max_items=100, max_len=330)
        if not sources:
            raise BadRequest(f"{where}.sources must name at least one group or user:<email>",
                             field=f"{where}.sources")
        norm_sources = []
        for j, src in enumerate(sources):
            if src.startswith(USER_PREFIX):
                norm_sources.append(USER_PREFIX + v.email(src[len(USER_PREFIX):], f"{where}.sources[{j}]"))
            elif src in groups:
                norm_sources.append(src)
            else:
                raise Unprocessable(f"{where}.sources[{j}]: no group named {src!r}", field=f"{where}.sources[{j}]")
        dests = v.str_list(r, "destinations", field=f"{where}.destinations", max_items=100, max_len=100)
        if not dests:
            raise BadRequest(f"{where}.destinations must name at least one group", field=f"{where}.destinations")
        for j, d in enumerate(dests):
            if d not in groups:
                raise Unprocessable(f"{where}.destinations[{j}]: no group named {d!r}",
                                 field=f"{where}.destinations[{j}]")
        protocol = r.get("protocol", "tcp")
        if protocol not in RULE_PROTOCOLS:
            raise BadRequest(f"{where}.protocol must be one of {', '.join(RULE_PROTOCOLS)}",
                             field=f"{where}.protocol")
        raw_ports = r.get("ports", [])
        if not isinstance(raw_ports, list) or len(raw_ports) > 100:
            raise BadRequest(f"{where}.ports must be a list like [\"22\", \"8000-8080\"]", field=f"{where}.ports")
        ports = []
        for j, p in enumerate(raw_ports):
            if isinstance(p, int) and not isinstance(p, bool):
                p = str(p)
            if not isinstance(p, str):
                raise BadRequest(f"{where}.ports[{j}] must be a port or range", field=f"{where}.ports[{j}]")
            try:
                parse_port_range(p)
            except NetmapError as exc:
                raise BadRequest(f"{where}.ports[{j}]: {exc}", field=f"{where}.ports[{j}]") from exc
            ports.append(p)
        if ports and protocol not in ("tcp", "udp"):
            raise BadRequest(f"{where}.ports only apply to tcp and udp", field=f"{where}.ports")
        local_users = v.str_list(r, "local_users", default=[], field=f"{where}.local_users", max_items=100,
                                 max_len=32) or []
        for j, u in enumerate(local_users):
            v.login_pattern(u, f"{where}.local_users[{j}]")
        accept_env = v.accept_env(r, f"{where}.accept_env")
        out.append({
            "sources": list(dict.fromkeys(norm_sources)),
            "destinations": list(dict.fromkeys(dests)),
            "protocol": protocol,
            "ports": list(dict.fromkeys(ports)),
            "bidirectional": bool(v.boolean(r, "bidirectional", False, field=f"{where}.bidirectional")),
            "local_users": list(dict.fromkeys(local_users)),
            "allow_root": bool(v.boolean(r, "allow_root", False, field=f"{where}.allow_root")),
            "action": "accept",
            **({"accept_env": accept_env} if accept_env is not None else {}),
        })
    return out


def policy_dict(p: Policy) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "description": p.description, "enabled": p.enabled,
            "rules": p.rules, "created": _iso(p.created)}


@routes.get("/api/policies")
async def list_policies(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _list_response(request, "policies", Policy, Policy.name, policy_dict)


@routes.post("/api/policies")
async def create_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "description", "enabled", "rules"})
    name = v.name(v.string(doc, "name", required=True, max_len=100) or "")
    description = v.string(doc, "description", default="", max_len=1000) or ""
    enabled = bool(v.boolean(doc, "enabled", True))
    async with request.app[STORE].change("policy.created") as s:
        if "rules" not in doc:
            raise BadRequest("field 'rules' is required", field="rules")
        rules = await parse_rules(s, doc["rules"])
        policy = Policy(name=name, description=description, enabled=enabled, rules=rules)
        s.add(policy)
        await _unique(s, f"a policy named {name} exists")
        out = policy_dict(policy)
    await request.app[EVENTS].record("policy.created", policy_id=out["id"], name=name)
    return web.json_response(out, status=201)


@routes.put("/api/policies/{id}")
async def update_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "description", "enabled", "rules"})
    name = _new_name(doc)
    description = v.string(doc, "description", max_len=1000)
    enabled = v.boolean(doc, "enabled")
    async with request.app[STORE].change("policy.updated") as s:
        policy = await _get(s, Policy, request, "policy")
        if "rules" in doc:
            policy.rules = await parse_rules(s, doc["rules"])
        if name is not None:
            policy.name = name
        if description is not None:
            policy.description = description
        if enabled is not None:
            policy.enabled = enabled
        await _unique(s, f"a policy named {name} exists")
        out = policy_dict(policy)
    await request.app[EVENTS].record("policy.updated", policy_id=out["id"], name=out["name"])
    return web.json_response(out)


@routes.delete("/api/policies/{id}")
async def delete_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    return await _delete_recorded(request, Policy, "policy", "policy.deleted", "name")


# --- peers ------------------------------------------------------------------------------------


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
        "created": _iso(p.created),
        "last_seen": _iso(p.last_seen),
    }


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
        peers = await _all(s, Peer, Peer.name)
        return web.json_response({"peers": [peer_dict(p, settings.dns_domain, connected) for p in peers]})


@routes.get("/api/peers/{id}")
async def get_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].session() as s:
        peer = await _find_peer(s, _path_id(request))
        return web.json_response(peer_dict(peer, request.app[SETTINGS].dns_domain, request.app[HUB].connected_peers))


@routes.put("/api/peers/{id}")
async def update_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "ssh_enabled"})
    name = v.string(doc, "name", max_len=63)
    if name is not None and not _DNS_LABEL.match(name):
        raise BadRequest("field 'name' must be a DNS label: lowercase letters, digits and '-'", field="name")
    if name is not None and is_id_shaped(name):
        raise BadRequest("field 'name' must not look like a peer id (16 hex digits)", field="name")
    ssh_enabled = v.boolean(doc, "ssh_enabled")
    async with request.app[STORE].change("peer.updated") as s:
        peer = await _find_peer(s, _path_id(request))
        if name is not None:
            peer.name = name
        if ssh_enabled is not None:
            peer.ssh_enabled = ssh_enabled
        await _unique(s, f"a peer named {name} exists")
        out = peer_dict(peer, request.app[SETTINGS].dns_domain, request.app[HUB].connected_peers)
    await request.app[EVENTS].record("peer.updated", peer_id=out["id"], name=out["name"],
                                     ssh_enabled=out["ssh_enabled"])
    return web.json_response(out)


@routes.delete("/api/peers/{id}")
async def delete_peer(request: web.Request) -> web.Response:
    await require_admin(request)
    async with request.app[STORE].change("peer.deleted") as s:
        peer = await _find_peer(s, _path_id(request))
        peer_id, name = peer.id, peer.name
        await s.delete(peer)
    await request.app[EVENTS].record("peer.deleted", peer_id=peer_id, name=name)
    return web.Response(status=204)


# --- events -----------------------------------------------------------------------------------


@routes.get("/api/events")
async def list_events(request: web.Request) -> web.Response:
    await require_admin(request)
    since = v.query_int(request, "since", 0, 0, 2**62)
    limit = v.query_int(request, "limit", 100, 1, 1000)
    peer = v.query_str(request, "peer_id", 64)
    etype = v.query_str(request, "type", 64)
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
    since = v.query_int(request, "since", 0, 0, 2**62) if since_q else await feed.latest_id()
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
