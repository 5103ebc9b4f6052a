"""The OpenAPI 3 document of meshmgmt's REST API, written by hand next to the routes.

A test compares its paths and methods with the app's router, so a route cannot be added
without documenting it; the schemathesis fuzz run reads it to generate requests.
The OIDC endpoints are described by `/.well-known/openid-configuration`, not here.

Request fields take their limits and patterns from the `Text` and `Int` rules the
handlers check (management/api/_validate.py and the modules named below), so the
document cannot promise more than the handlers accept, nor less.
"""

from __future__ import annotations

from typing import Any

from meshsshd.netmap import MAX_ENV_PATTERNS

from .api import _validate as v
from .api.peers import MAX_ENDPOINTS, PEER_FLAGS
from .api.subsystems import COMMAND, RESERVED, SUBSYSTEM_NAME
from .events import INT_FIELDS, INT_RANGE, MAX_EVENTS_PER_POST, MAX_STRING, PEER_EVENT_TYPES, STR_FIELDS
from .netmap import RULE_PROTOCOLS

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}
_STRS = {"type": "array", "items": {"type": "string"}}
_TIME = {"type": "string", "format": "date-time", "nullable": True}


def _text(spec: v.Text, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "string", "maxLength": spec.max_len, "pattern": spec.pattern}
    if spec.min_len:
        doc["minLength"] = spec.min_len
    return {**doc, **extra}


def _texts(item: v.Text, max_items: int = v.MAX_LIST, min_items: int = 0, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "array", "items": _text(item), "maxItems": max_items}
    if min_items:
        doc["minItems"] = min_items
    return {**doc, **extra}


def _int(spec: v.Int, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": spec.lo, "maximum": spec.hi, **extra}


_WG_KEY = _text(v.WG_KEY, description="32-byte key, base64")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), extra: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        doc["required"] = list(required)
    return doc


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid input (the `field` names what)", 401: "missing or wrong credentials",
            403: "not allowed", 404: "no such object", 409: "conflict (name taken, object in use)",
            422: "names a peer, user or group that does not exist, combines fields that exclude each other, "
                 "or gives a port range that ends below its start",
            429: "rate limited (see Retry-After)"}
    return {str(c): {"description": text[c], **_json(_ref("Error"))} for c in codes}


def _op(summary: str, ok: dict[str, Any], *, body: dict[str, Any] | None = None, security: str = "admin",
        errors: tuple[int, ...] = (400, 401, 403), params: list[dict[str, Any]] | None = None,
        tag: str = "admin") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {**ok, **_errors(*errors)}}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = params
    return op


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_SUBSYSTEM = {"name": "name", "in": "path", "required": True,
              "schema": _text(SUBSYSTEM_NAME, **{"not": {"enum": list(RESERVED)}})}
_NO_CONTENT = {"204": {"description": "done"}}


def _schemas() -> dict[str, Any]:
    flags = _obj({k: _BOOL for k in PEER_FLAGS}, extra=True)
    endpoints = _texts(v.ENDPOINT, MAX_ENDPOINTS, description="WireGuard endpoints, IPv4:port or [IPv6]:port")
    rule = _obj({
        "sources": _texts(v.SOURCE, v.MAX_RULE_ITEMS, 1, description="group names or user:<email>"),
        "destinations": _texts(v.NAME, v.MAX_RULE_ITEMS, 1, description="group names"),
        "protocol": {"type": "string", "enum": list(RULE_PROTOCOLS), "description": "absent: tcp"},
        "ports": {"type": "array", "items": {"oneOf": [_text(v.PORT_RANGE), _int(v.PORT)]},
                  "maxItems": v.MAX_RULE_ITEMS,
                  "description": f'"22", "8000-8080"; only with protocol {" or ".join(v.PORT_PROTOCOLS)}'},
        "bidirectional": _BOOL,
        "local_users": _texts(v.LOGIN, v.MAX_RULE_ITEMS, description="login names, localpart, or *"),
        "allow_root": _BOOL,
        "accept_env": _texts(v.ENV_PATTERN, MAX_ENV_PATTERNS,
                             description="client variables SSH sessions keep (AcceptEnv patterns, * and ?); "
                                         "absent: the peer's default, LANG LC_*; [] for none"),
        "action": {"type": "string", "enum": ["accept"]},
    }, ("sources", "destinations"))
    # Ports only where they mean something; an absent protocol is tcp.
    rule["anyOf"] = [{"properties": {"protocol": {"enum": list(v.PORT_PROTOCOLS)}}},
                     {"properties": {"ports": {"maxItems": 0}}}]
    host_key = _text(v.SSH_PUBLIC_KEY, description="an OpenSSH public key line, or empty")
    peer_info = _obj({"id": _STR, "name": _STR, "fqdn": _STR, "mesh_ip": _STR, "wg_public_key": _STR,
                      "endpoints": _STRS, "ssh_host_keys": _STRS, "ssh_enabled": _BOOL, "local_users": _STRS,
                      "groups": {**_STRS, "description": "group names (in the per-user peer list)"}},
                     ("id", "name", "mesh_ip"))
    rules = {"type": "array", "items": rule, "minItems": 1, "maxItems": v.MAX_RULES}
    role = {"type": "string", "enum": list(v.ROLES)}
    peer_refs = _texts(v.PEER_REF, description="peer ids or names")
    user_refs = _texts(v.USER_REF, description="user ids or emails")
    return {
        "Error": _obj({"error": _STR, "message": _STR, "field": _STR}, ("error", "message")),
        "PeerFlags": flags,
        "RegisterRequest": _obj({"setup_key": _text(v.SETUP_KEY), "wg_public_key": _WG_KEY, "ssh_host_key": host_key,
                                 "hostname": _text(v.HOSTNAME), "flags": flags, "version": _text(v.VERSION),
                                 "endpoints": endpoints, "challenge": _text(v.CHALLENGE), "proof": _text(v.PROOF)},
                                ("setup_key", "wg_public_key", "hostname", "challenge", "proof"), extra=True),
        "ChallengeRequest": _obj({"wg_public_key": _WG_KEY}, ("wg_public_key",)),
        "Challenge": _obj({"challenge": _STR, "management_key": _WG_KEY, "version": _INT, "expires_in": _INT},
                          ("challenge", "management_key", "version", "expires_in")),
        "RekeyApproval": _obj({"expires_in": _int(v.REKEY_FOR, description="seconds")}),
        "RekeyApproved": _obj({"id": _STR, "name": _STR, "rekey_approved_until": _STR},
                              ("id", "name", "rekey_approved_until")),
        "RegisterResponse": _obj({"peer_id": _STR, "name": _STR, "fqdn": _STR, "mesh_ip": _STR, "network": _STR,
                                  "credential": _STR}, ("peer_id", "name", "fqdn", "mesh_ip", "network", "credential")),
        "SelfUpdate": _obj({"flags": flags, "version": _text(v.VERSION), "endpoints": endpoints,
                            "ssh_host_key": host_key}, extra=True),
        "PeerSelf": _obj({"peer_id": _STR, "name": _STR, "fqdn": _STR, "mesh_ip": _STR, "network": _STR}),
        "AuditEvent": _obj({"type": {"type": "string", "enum": list(PEER_EVENT_TYPES)},
                            "time": {"type": "string", "format": "date-time", "maxLength": 64},
                            **{k: {"type": "string", "maxLength": MAX_STRING} for k in STR_FIELDS},
                            **{k: {"type": "integer", "minimum": INT_RANGE[0], "maximum": INT_RANGE[1]}
                               for k in INT_FIELDS}}, ("type",), extra=True),
        "EventsPost": _obj({"events": {"type": "array", "items": _ref("AuditEvent"), "maxItems": MAX_EVENTS_PER_POST}},
                           ("events",)),
        "StoredEvent": _obj({"id": _INT, "type": _STR, "peer_id": _STR, "time": _STR, "received_at": _STR},
                            ("id", "type", "received_at"), extra=True),
        "EventList": _obj({"events": {"type": "array", "items": _ref("StoredEvent")}, "next": _INT}),
        "PeerInfo": peer_info,
        "PeerList": _obj({"peers": {"type": "array", "items": peer_info}}),
        "User": _obj({"id": _STR, "email": _STR, "name": _STR, "role": _STR, "service": _BOOL,
                      "client_id": {"type": "string", "nullable": True}, "client_secret": _STR, "blocked": _BOOL,
                      "has_password": _BOOL, "groups": _STRS, "created": _TIME}),
        "UserCreate": {**_obj({"email": _text(v.EMAIL), "name": _text(v.USER_NAME), "password": _text(v.PASSWORD),
                               "role": role, "service": {**_BOOL, "description": "a service user has no password"}},
                              ("email",)),
                       "not": {"required": ["service", "password"], "properties": {"service": {"enum": [True]}}}},
        "UserUpdate": _obj({"name": _text(v.USER_NAME),
                            "password": _text(v.PASSWORD, description="signs the user's logins out"), "role": role,
                            "blocked": _BOOL}),
        "PasswordChange": _obj({"current_password": _text(v.CURRENT_PASSWORD),
                                "new_password": _text(v.PASSWORD)}, ("current_password", "new_password")),
        "PasswordChanged": _obj({"logins_signed_out": {**_INT, "description": "refresh-token logins ended, "
                                                                               "the caller's own included"}},
                                ("logins_signed_out",)),
        "Group": _obj({"id": _STR, "name": _STR, "peers": _STRS, "peer_names": _STRS, "users": _STRS,
                       "user_emails": _STRS, "created": _TIME}),
        "GroupCreate": _obj({"name": _text(v.NAME), "peers": peer_refs, "users": user_refs}, ("name",)),
        "GroupUpdate": _obj({"name": _text(v.NAME), "peers": peer_refs, "users": user_refs}),
        "SetupKey": _obj({"id": _STR, "name": _STR, "key": {**_STR, "description": "only in the create response"},
                          "reusable": _BOOL, "expires_at": _TIME, "usage_limit": _INT, "used_count": _INT,
                          "revoked": _BOOL, "valid": _BOOL, "state": _STR, "auto_groups": _STRS,
                          "created": _TIME, "last_used": _TIME}),
        "SetupKeyCreate": _obj({"name": _text(v.SETUP_KEY_NAME), "reusable": _BOOL,
                                "expires_in": _int(v.EXPIRES_IN, description="seconds; 0 = never"),
                                "usage_limit": _int(v.USAGE_LIMIT, description="0 = no limit"),
                                "auto_groups": _texts(v.GROUP_REF, description="group ids or names")}),
        "Rule": rule,
        "Policy": _obj({"id": _STR, "name": _STR, "description": _STR, "enabled": _BOOL,
                        "rules": {"type": "array", "items": rule}, "created": _TIME}),
        "PolicyCreate": _obj({"name": _text(v.NAME), "description": _text(v.DESCRIPTION), "enabled": _BOOL,
                              "rules": rules}, ("name", "rules")),
        "PolicyUpdate": _obj({"name": _text(v.NAME), "description": _text(v.DESCRIPTION), "enabled": _BOOL,
                              "rules": rules}),
        "Peer": _obj({"id": _STR, "name": _STR, "fqdn": _STR, "mesh_ip": _STR, "hostname": _STR,
                      "wg_public_key": _STR, "ssh_host_key": _STR, "flags": flags, "version": _STR,
                      "endpoints": _STRS, "ssh_enabled": {**_BOOL, "description": "the admin toggle"},
                      "ssh_state": {"type": "string", "description": "effective SSH state: serving, not served, "
                                    "no policy, policy disabled, toggle off, no source peers"},
                      "ssh_state_code": {"type": "string", "description": "the same as the token exchange's "
                                         "reason code (serving, ssh-not-served, no-policy-for-peer, ...)"},
                      "ssh_state_reason": {"type": "string", "description": "why it is not serving, naming the "
                                           "fix; empty when serving"},
                      "groups": _STRS, "connected": _BOOL, "created": _TIME, "last_seen": _TIME}),
        "PeerUpdate": _obj({"name": _text(v.PEER_NAME), "ssh_enabled": _BOOL}),
        "Subsystem": _obj({"id": _STR, "name": _STR, "command": _STR,
                           "peer": {"type": "string", "nullable": True},
                           "peer_name": {"type": "string", "nullable": True},
                           "group": {"type": "string", "nullable": True},
                           "group_name": {"type": "string", "nullable": True}}),
        "SigningKey": _obj({"kid": _STR, "alg": _STR, "created": _TIME, "retired": _TIME, "signing": _BOOL,
                            "published": _BOOL, "withdrawn_at": {**_TIME, "description": "when it stops verifying"}}),
        "SigningKeyRotate": _obj({"drop_previous": {**_BOOL, "description": "withdraw the old keys at once"}}),
        "SubsystemSet": _obj({"command": _text(COMMAND, description="one command line, run through the user's shell")},
                             ("command",)),
    }


def _list(key: str, item: str) -> dict[str, Any]:
    return {"200": {"description": "the list", **_json(_obj({key: {"type": "array", "items": _ref(item)}}))}}


def _one(item: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": "the object", **_json(_ref(item))}}


def openapi_document(server_url: str = "") -> dict[str, Any]:
    ws = "WebSocket: send `Connection: Upgrade` / `Upgrade: websocket`; a plain GET gets 400."
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("liveness and store reachability", {"200": {"description": "ok"}}, security="",
                                errors=(), tag="ops")},
        "/metrics": {"get": _op("Prometheus metrics (text format)", {"200": {"description": "metrics"}},
                                security="", errors=(), tag="ops")},
        "/api/openapi.json": {"get": _op("this document", {"200": {"description": "OpenAPI 3"}}, security="",
                                         errors=(), tag="ops")},
        "/api/peers/challenge": {"post": _op(
            "a single-use challenge to answer with the WireGuard private key (docs/protocol.md)",
            _one("Challenge"), body=_ref("ChallengeRequest"), security="", errors=(400, 429), tag="peer")},
        "/api/peers/register": {"post": _op(
            "register a peer with a setup key and a proof of its WireGuard key (a registered key again: "
            "only with its credential or an admin's approval)",
            _one("RegisterResponse", "201"), body=_ref("RegisterRequest"), security="", errors=(400, 401, 409, 429),
            tag="peer")},
        "/api/peers/{id}/approve-rekey": {"post": _op(
            "let this peer's WireGuard key register once more without its credential (lost state)",
            _one("RekeyApproved"), body=_ref("RekeyApproval"), params=[_ID], errors=(400, 401, 403, 404))},
        "/api/peers/self": {"post": _op("update what this peer advertises", _one("PeerSelf"),
                                        body=_ref("SelfUpdate"), security="peer", errors=(400, 401), tag="peer")},
        "/api/peers/sync": {"get": _op(f"the network-map stream. {ws}",
                                       {"101": {"description": "switching to WebSocket"}}, security="peer",
                                       errors=(400, 401), tag="peer")},
        "/api/peers/events": {"post": _op("audit events from this peer", {"202": {
            "description": "stored", **_json(_obj({"accepted": _INT}))}}, body=_ref("EventsPost"),
            security="peer", errors=(400, 401), tag="peer")},
        "/api/me/peers": {"get": _op("peers the caller may reach by SSH, with the local users", {"200": {
            "description": "peers", **_json(_ref("PeerList"))}}, security="bearer", errors=(401, 403), tag="user")},
        "/api/me/password": {"post": _op(
            "change the caller's own password (the current one proves it); every login of the user ends, "
            "this one too", _one("PasswordChanged"), body=_ref("PasswordChange"), security="bearer",
            errors=(400, 401, 403, 409, 422, 429), tag="user")},
        "/api/users": {
            "get": _op("list users", _list("users", "User"), errors=(401, 403)),
            "post": _op("create a user (service users get client_id and a one-time client_secret)",
                        _one("User", "201"), body=_ref("UserCreate"), errors=(400, 401, 403, 409, 422)),
        },
        "/api/users/{id}": {
            "put": _op("update a user", _one("User"), body=_ref("UserUpdate"), params=[_ID],
                       errors=(400, 401, 403, 404, 422)),
            "delete": _op("delete a user", _NO_CONTENT, params=[_ID], errors=(401, 403, 404)),
        },
        "/api/groups": {
            "get": _op("list groups", _list("groups", "Group"), errors=(401, 403)),
            "post": _op("create a group", _one("Group", "201"), body=_ref("GroupCreate"),
                        errors=(400, 401, 403, 409, 422)),
        },
        "/api/groups/{id}": {
            "put": _op("update a group (a rename follows into policies)", _one("Group"), body=_ref("GroupUpdate"),
                       params=[_ID], errors=(400, 401, 403, 404, 409, 422)),
            "delete": _op("delete a group no policy uses", _NO_CONTENT, params=[_ID], errors=(401, 403, 404, 409)),
        },
        "/api/setup-keys": {
            "get": _op("list setup keys (never the keys themselves)", _list("setup_keys", "SetupKey"),
                       errors=(401, 403)),
            "post": _op("create a setup key (the key is in this response only)", _one("SetupKey", "201"),
                        body=_ref("SetupKeyCreate"), errors=(400, 401, 403, 422)),
        },
        "/api/setup-keys/{id}": {"delete": _op("revoke a setup key", _NO_CONTENT, params=[_ID],
                                               errors=(401, 403, 404))},
        "/api/policies": {
            "get": _op("list policies", _list("policies", "Policy"), errors=(401, 403)),
            "post": _op("create a policy", _one("Policy", "201"), body=_ref("PolicyCreate"),
                        errors=(400, 401, 403, 409, 422)),
        },
        "/api/policies/{id}": {
            "put": _op("update a policy", _one("Policy"), body=_ref("PolicyUpdate"), params=[_ID],
                       errors=(400, 401, 403, 404, 409, 422)),
            "delete": _op("delete a policy", _NO_CONTENT, params=[_ID], errors=(401, 403, 404)),
        },
        "/api/peers": {"get": _op("list peers", _list("peers", "Peer"), errors=(401, 403))},
        "/api/subsystems": {"get": _op("SSH subsystems set per peer or group", _list("subsystems", "Subsystem"),
                                       errors=(401, 403))},
        "/api/peers/{id}/subsystems/{name}": {
            "put": _op("set a subsystem on one peer (its own entry wins over its groups')", _one("Subsystem"),
                       body=_ref("SubsystemSet"), params=[_ID, _SUBSYSTEM], errors=(400, 401, 403, 404)),
            "delete": _op("remove a peer's subsystem", _NO_CONTENT, params=[_ID, _SUBSYSTEM],
                          errors=(401, 403, 404)),
        },
        "/api/groups/{id}/subsystems/{name}": {
            "put": _op("set a subsystem on every peer of a group", _one("Subsystem"), body=_ref("SubsystemSet"),
                       params=[_ID, _SUBSYSTEM], errors=(400, 401, 403, 404)),
            "delete": _op("remove a group's subsystem", _NO_CONTENT, params=[_ID, _SUBSYSTEM],
                          errors=(401, 403, 404)),
        },
        "/api/peers/{id}": {
            "get": _op("one peer (by id or name)", _one("Peer"), params=[_ID], errors=(401, 403, 404)),
            "put": _op("rename a peer or switch its SSH toggle", _one("Peer"), body=_ref("PeerUpdate"),
                       params=[_ID], errors=(400, 401, 403, 404, 409)),
            "delete": _op("delete a peer (its sync stream gets peer-deleted)", _NO_CONTENT, params=[_ID],
                          errors=(401, 403, 404)),
        },
        "/api/signing-keys": {"get": _op("the issuer's signing keys (public facts only), signer first",
                                         _list("signing_keys", "SigningKey"), errors=(400, 401, 403))},
        "/api/signing-keys/rotate": {"post": _op("make a new signing key; the old ones verify for the overlap",
                                                 _list("signing_keys", "SigningKey"), body=_ref("SigningKeyRotate"),
                                                 errors=(400, 401, 403))},
        "/api/events": {"get": _op("the audit log, oldest first after `since`", {"200": {
            "description": "events", **_json(_ref("EventList"))}}, errors=(400, 401, 403), params=[
            {"name": "since", "in": "query", "schema": _int(v.SINCE)},
            {"name": "limit", "in": "query", "schema": _int(v.LIMIT)},
            {"name": "peer_id", "in": "query", "schema": _text(v.QUERY_ID)},
            {"name": "type", "in": "query", "schema": _text(v.QUERY_ID)}])},
        "/api/events/stream": {"get": _op(f"follow the audit log. {ws}",
                                          {"101": {"description": "switching to WebSocket"}},
                                          errors=(400, 401, 403),
                                          params=[{"name": "since", "in": "query", "schema": _int(v.SINCE)}])},
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "meshmgmt", "version": "1",
                 "description": "Management API of meshsshd. Errors: {error, message, field?}. "
                                "See docs/protocol.md."},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer",
                          "description": "the admin token (DIR/admin.token) or an admin's access token"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "a user's access token"},
                "peer": {"type": "apiKey", "in": "header", "name": "Authorization",
                         "description": "Peer <peer_id>:<credential>"},
            },
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
