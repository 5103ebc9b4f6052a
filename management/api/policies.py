"""Admin routes for access policies: list, create, update, delete, and the rule parser.

A rule's sources are group names or `user:<email>`, its destinations group names; both
must exist (422 otherwise). Only `accept` exists: what no rule accepts is denied.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from ..errors import BadRequest, Unprocessable
from ..netmap import RULE_PROTOCOLS, USER_PREFIX
from ..store import Group, Policy
from . import _validate as v
from ._auth import require_admin
from ._rows import delete_recorded, flush_unique, get_row, iso, list_response
from .keys import EVENTS, STORE

routes = web.RouteTableDef()

_RULE_KEYS = {"sources", "destinations", "protocol", "ports", "bidirectional", "local_users", "allow_root",
              "action", "accept_env"}


async def parse_rules(s: Any, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value or len(value) > v.MAX_RULES:
        raise BadRequest(f"field 'rules' must be a list of 1..{v.MAX_RULES} rules", field="rules")
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
        sources = v.str_list(r, "sources", v.SOURCE, field=f"{where}.sources", max_items=v.MAX_RULE_ITEMS)
        if not sources:
            raise BadRequest(f"{where}.sources must name at least one group or user:<email>",
                             field=f"{where}.sources")
        norm_sources = []
        for j, src in enumerate(sources):
            if src.startswith(USER_PREFIX):
                norm_sources.append(USER_PREFIX + src[len(USER_PREFIX):].lower())
            elif src in groups:
                norm_sources.append(src)
            else:
                raise Unprocessable(f"{where}.sources[{j}]: no group named {src!r}", field=f"{where}.sources[{j}]")
        dests = v.str_list(r, "destinations", v.NAME, field=f"{where}.destinations", max_items=v.MAX_RULE_ITEMS)
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
        if not isinstance(raw_ports, list) or len(raw_ports) > v.MAX_RULE_ITEMS:
            raise BadRequest(f"{where}.ports must be a list like [\"22\", \"8000-8080\"]", field=f"{where}.ports")
        ports = []
        for j, p in enumerate(raw_ports):
            at = f"{where}.ports[{j}]"
            if isinstance(p, int) and not isinstance(p, bool):
                if not v.PORT.lo <= p <= v.PORT.hi:
                    raise BadRequest(f"{at} must be between {v.PORT.lo} and {v.PORT.hi}", field=at)
                p = str(p)
            elif isinstance(p, str):
                v.PORT_RANGE.check(p, at)
            else:
                raise BadRequest(f"{at} must be a port or range", field=at)
            first, _, last = p.partition("-")
            if last and int(last) < int(first):
                raise Unprocessable(f"{at}: the range {p!r} ends below its start", field=at)
            ports.append(p)
        if ports and protocol not in v.PORT_PROTOCOLS:
            raise BadRequest(f"{where}.ports only apply to {' and '.join(v.PORT_PROTOCOLS)}", field=f"{where}.ports")
        local_users = v.str_list(r, "local_users", v.LOGIN, default=[], field=f"{where}.local_users",
                                 max_items=v.MAX_RULE_ITEMS) or []
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
            "rules": p.rules, "created": iso(p.created)}


@routes.get("/api/policies")
async def list_policies(request: web.Request) -> web.Response:
    await require_admin(request)
    return await list_response(request, "policies", Policy, Policy.name, policy_dict)


@routes.post("/api/policies")
async def create_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "description", "enabled", "rules"})
    name = v.string(doc, "name", v.NAME, required=True) or ""
    description = v.string(doc, "description", v.DESCRIPTION, default="") or ""
    enabled = bool(v.boolean(doc, "enabled", True))
    async with request.app[STORE].change("policy.created") as s:
        if "rules" not in doc:
            raise BadRequest("field 'rules' is required", field="rules")
        rules = await parse_rules(s, doc["rules"])
        policy = Policy(name=name, description=description, enabled=enabled, rules=rules)
        s.add(policy)
        await flush_unique(s, f"a policy named {name} exists")
        out = policy_dict(policy)
    await request.app[EVENTS].record("policy.created", policy_id=out["id"], name=name)
    return web.json_response(out, status=201)


@routes.put("/api/policies/{id}")
async def update_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"name", "description", "enabled", "rules"})
    name = v.string(doc, "name", v.NAME)
    description = v.string(doc, "description", v.DESCRIPTION)
    enabled = v.boolean(doc, "enabled")
    async with request.app[STORE].change("policy.updated") as s:
        policy = await get_row(s, Policy, request, "policy")
        if "rules" in doc:
            policy.rules = await parse_rules(s, doc["rules"])
        if name is not None:
            policy.name = name
        if description is not None:
            policy.description = description
        if enabled is not None:
            policy.enabled = enabled
        await flush_unique(s, f"a policy named {name} exists")
        out = policy_dict(policy)
    await request.app[EVENTS].record("policy.updated", policy_id=out["id"], name=out["name"])
    return web.json_response(out)


@routes.delete("/api/policies/{id}")
async def delete_policy(request: web.Request) -> web.Response:
    await require_admin(request)
    return await delete_recorded(request, Policy, "policy", "policy.deleted", "name")



async def policies_using(s: Any, group_name: str) -> list[Policy]:
    """The policies whose rules name the group, as a source or a destination."""
    policies = (await s.execute(select(Policy))).scalars().all()
    return [p for p in policies if any(group_name in r.get("sources", []) or group_name in r.get("destinations", [])
                                       for r in (p.rules or []))]


__all__ = ["parse_rules", "policies_using", "policy_dict", "routes"]
