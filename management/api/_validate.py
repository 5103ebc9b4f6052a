"""Body and query validation: every problem becomes a 400 naming the field.

Handlers read a JSON object with `await json_object(request)` and pull typed values
with the helpers below; nothing here trusts the type of anything in the body.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
from typing import Any

from aiohttp import web

from ..errors import BadRequest, RequestTimeout
from ..store.passwords import password_problem

MAX_BODY = 1 << 20
BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
_LOGIN = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-256",
    "rsa-sha2-512",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        async with asyncio.timeout(BODY_TIMEOUT):  # a body dribbled in byte by byte holds a connection
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {BODY_TIMEOUT:g} s") from None
    if len(raw) > MAX_BODY:
        raise BadRequest("body too large", field="body")
    if not raw.strip():
        raise BadRequest("a JSON object body is required", field="body", code="invalid_json")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", field="body", code="invalid_json") from exc
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object", field="body", code="invalid_json")
    return doc


def _missing(name: str) -> BadRequest:
    return BadRequest(f"field {name!r} is required", field=name)


def _null(name: str) -> BadRequest:
    # The OpenAPI document types these fields without `nullable`: null is not "absent".
    return BadRequest(f"field {name!r} must not be null (leave it out for the default)", field=name)


def string(doc: dict[str, Any], name: str, *, required: bool = False, default: str | None = None,
           max_len: int = 255, min_len: int = 0) -> str | None:
    if name not in doc:
        if required:
            raise _missing(name)
        return default
    if doc[name] is None:
        raise _null(name)
    value = doc[name]
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} must be a string", field=name)
    if len(value) > max_len or len(value) < min_len:
        raise BadRequest(f"field {name!r} must be {min_len}..{max_len} characters", field=name)
    if "\x00" in value:
        raise BadRequest(f"field {name!r} contains a NUL character", field=name)
    return value


def boolean(doc: dict[str, Any], name: str, default: bool | None = None, *, field: str | None = None) -> bool | None:
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(field or name)
    value = doc[name]
    if not isinstance(value, bool):
        raise BadRequest(f"field {field or name!r} must be true or false", field=field or name)
    return value


def integer(doc: dict[str, Any], name: str, default: int | None = None, *, lo: int = 0,
            hi: int = 2**31 - 1) -> int | None:
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(name)
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {name!r} must be an integer", field=name)
    if not lo <= value <= hi:
        raise BadRequest(f"field {name!r} must be between {lo} and {hi}", field=name)
    return value


def str_list(doc: dict[str, Any], name: str, *, default: list[str] | None = None, max_items: int = 1000,
             max_len: int = 255, field: str | None = None) -> list[str] | None:
    field = field or name
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(field)
    value = doc[name]
    if not isinstance(value, list) or len(value) > max_items:
        raise BadRequest(f"field {field!r} must be a list of at most {max_items} strings", field=field)
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v or len(v) > max_len or "\x00" in v:
            raise BadRequest(f"field {field}[{i}] must be a non-empty string", field=f"{field}[{i}]")
    return list(value)


def password(doc: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """A new password in field `name`, held to the rules of `store.passwords`."""
    value = string(doc, name, required=required, max_len=MAX_BODY)
    problem = password_problem(value) if value is not None else None
    if problem:
        raise BadRequest(f"field {name!r} {problem}", field=name)
    return value


def email(value: str, field: str = "email") -> str:
    value = value.strip().lower()
    if not _EMAIL.match(value):
        raise BadRequest(f"field {field!r} is not an email address", field=field)
    return value


def name(value: str, field: str = "name") -> str:
    if not _NAME.match(value):
        raise BadRequest(
            f"field {field!r} must start with a letter or digit and use only letters, digits, '_', '.', '-'",
            field=field,
        )
    return value


def login_pattern(value: str, field: str) -> str:
    if value in ("*", "localpart") or _LOGIN.match(value):
        return value
    raise BadRequest(f"field {field!r}: {value!r} is not a login name, 'localpart' or '*'", field=field)


def accept_env(doc: dict[str, Any], field: str) -> list[str] | None:
    """A rule's AcceptEnv patterns, checked as the peer checks them; None when absent."""
    from meshsshd.netmap import NetmapError, check_accept_env

    patterns = str_list(doc, "accept_env", field=field, max_items=64, max_len=64)
    if patterns is None:
        return None
    try:
        return list(dict.fromkeys(check_accept_env(tuple(patterns), field)))
    except NetmapError as exc:
        raise BadRequest(str(exc), field=field) from exc


def wg_key(value: str, field: str = "wg_public_key") -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise BadRequest(f"field {field!r} is not base64", field=field) from exc
    if len(raw) != 32:
        raise BadRequest(f"field {field!r} must be a 32-byte WireGuard key in base64", field=field)
    return value


def ssh_public_key(value: str, field: str = "ssh_host_key") -> str:
    value = value.strip()
    if not value:
        return ""
    parts = value.split()
    if len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        raise BadRequest(f"field {field!r} must be an OpenSSH public key line (type base64)", field=field)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError as exc:
        raise BadRequest(f"field {field!r}: key data is not base64", field=field) from exc
    if len(blob) < 4 or int.from_bytes(blob[:4], "big") != len(parts[0]) or blob[4 : 4 + len(parts[0])] != parts[0].encode():
        raise BadRequest(f"field {field!r}: key data does not match its type", field=field)
    return f"{parts[0]} {parts[1]}"


def endpoint(value: str, field: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError as exc:
        raise BadRequest(f"field {field!r}: {value!r} is not IP:port", field=field) from exc
    return value


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name!r} must be an integer", field=name) from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name!r} must be between {lo} and {hi}", field=name)
    return value


def only_known(doc: dict[str, Any], known: set[str], where: str = "") -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise BadRequest(f"unknown field {where}{unknown[0]!r}", field=f"{where}{unknown[0]}")


def query_str(request: web.Request, name: str, max_len: int) -> str | None:
    raw = request.query.get(name)
    if not raw:
        return None
    if len(raw) > max_len or "\x00" in raw:
        raise BadRequest(f"query parameter {name!r} is too long or has a NUL character", field=name)
    return raw
