"""Body and query validation: every problem becomes a 400 naming the field.

Handlers read a JSON object with `await json_object(request)` and pull typed values
with the helpers below; nothing here trusts the type of anything in the body.

Each string field's limits are a `Text` and each integer's an `Int`: the handlers check
values with them and management/openapi.py states them, so a request the OpenAPI document
calls valid is one the handlers accept. Patterns are written in the regex syntax JSON
Schema (ECMA 262) and `re` read alike: explicit character classes, no `\\s` or `\\d`
(whose sets differ between the two), and always matched whole.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field as dc_field
from typing import Any

from aiohttp import web

from meshsshd.netmap import ENV_PATTERN as _ENV_PATTERN, MAX_ENV_PATTERNS

from ..errors import BadRequest, RequestTimeout
from ._lookup import ID_SHAPE
from ..store.passwords import MAX_LENGTH as _PASSWORD_MAX, MIN_LENGTH as _PASSWORD_MIN

MAX_BODY = 1 << 20
BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive
MAX_LIST = 1000  # items in a list field that names no tighter bound


def whole(body: str) -> str:
    """`body` as a pattern that must match the whole value."""
    return f"^(?:{body})$"


@dataclass(frozen=True)
class Text:
    """What a string field may hold: min_len..max_len characters matching `pattern` whole."""

    max_len: int
    min_len: int = 0
    pattern: str = "^[^\\x00]*$"
    hint: str = "must not contain a NUL character"  # what `pattern` demands, for the 400
    _compiled: re.Pattern[str] = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.pattern))

    def check(self, value: str, field: str) -> str:
        if len(value) < self.min_len:
            least = "not be empty" if self.min_len == 1 else f"have at least {self.min_len} characters"
            raise BadRequest(f"field {field!r} must {least}", field=field)
        if len(value) > self.max_len:
            raise BadRequest(f"field {field!r} must have at most {self.max_len} characters", field=field)
        if not self._compiled.fullmatch(value):
            raise BadRequest(f"field {field!r} {self.hint}", field=field)
        return value


@dataclass(frozen=True)
class Int:
    """The inclusive range of an integer field or query parameter."""

    lo: int
    hi: int


_SPACE = " \\t\\n\\r\\f\\v"  # ASCII whitespace, spelled out
_NAME_BODY = "[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_EMAIL_BODY = f"[^@\\x00{_SPACE}]{{1,64}}@[^@\\x00{_SPACE}]{{1,255}}"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SSH_KEY_TYPES = (
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


def _literal(text: str) -> str:
    """`text` as a pattern; escapes only what base64 and key type names hold ('.', '+'),
    since ECMA 262 refuses escapes `re.escape` writes, like `\\-`."""
    return re.sub(r"([.+])", r"\\\1", text)


def _base64_starting_with(prefix: bytes) -> str:
    """A pattern for padded base64 text whose decoded bytes begin with `prefix`.

    Whole 3-byte groups of the prefix spell fixed characters; a partial last group fixes
    the leading bits of the next character, which leaves a class of 16 or 4 of them."""
    full = len(prefix) // 3 * 3
    head = _literal(base64.b64encode(prefix[:full]).decode())
    rest = prefix[full:]
    q = "[A-Za-z0-9+/]"
    tail = f"(?:{q}{{4}})*(?:{q}{{2}}==|{q}{{3}}=)?"
    if not rest:
        return head + tail
    if len(rest) == 1:
        b = rest[0]
        free = "".join(_B64[((b & 3) << 4) | i] for i in range(16))
        return f"{head}{_literal(_B64[b >> 2])}[{free}](?:==|{q}(?:=|{q}{tail}))"
    b0, b1 = rest
    free = "".join(_B64[((b1 & 15) << 2) | i] for i in range(4))
    fixed = _B64[b0 >> 2] + _B64[((b0 & 3) << 4) | (b1 >> 4)]
    return f"{head}{_literal(fixed)}[{free}](?:=|{q}{tail})"


def _ssh_key_body() -> str:
    # The key blob starts with its own type name (RFC 4253 §6.6): uint32 length, then the name.
    alts = "|".join(f"{_literal(t)}[ \\t]+{_base64_starting_with(len(t).to_bytes(4, 'big') + t.encode())}"
                    for t in SSH_KEY_TYPES)
    return f"(?:{alts})(?:[{_SPACE}][^\\x00]*)?"


_OCTET = "25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]"
_IPV4 = f"(?:{_OCTET})(?:\\.(?:{_OCTET})){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join((  # RFC 3986 §3.2.2
    f"(?:{_H16}:){{6}}{_LS32}",
    f"::(?:{_H16}:){{5}}{_LS32}",
    f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    *(f"(?:(?:{_H16}:){{0,{n - 1}}}{_H16})?::(?:{_H16}:){{{5 - n}}}{_LS32}" for n in (2, 3)),
    f"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
    f"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
    f"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
    f"(?:(?:{_H16}:){{0,6}}{_H16})?::",
))
_PORT = "[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]"

NAME = Text(100, 1, whole(_NAME_BODY),
            "must start with a letter or digit and use only letters, digits, '_', '.', '-' (at most 100)")
EMAIL = Text(320, 3, whole(_EMAIL_BODY), "is not an email address")
LOGIN = Text(32, 1, whole("\\*|localpart|[A-Za-z_][A-Za-z0-9_.-]{0,31}\\$?"),
             "is not a login name, 'localpart' or '*'")
WG_KEY = Text(44, 44, whole("[A-Za-z0-9+/]{43}="), "must be a 32-byte WireGuard key in base64")
SSH_PUBLIC_KEY = Text(16384, 0, whole(f"(?:{_ssh_key_body()})?"),
                      "must be an OpenSSH public key line (type base64 [comment]) whose data matches its type")
ENDPOINT = Text(64, 1, whole(f"(?:{_IPV4}|\\[(?:{_IPV6})\\]):(?:{_PORT})"),
                "is not IPv4:port or [IPv6]:port")
SOURCE = Text(330, 1, whole(f"user:{_EMAIL_BODY}|{_NAME_BODY}"), "is neither a group name nor user:<email>")
PORT_RANGE = Text(11, 1, whole(f"(?:{_PORT})(?:-(?:{_PORT}))?"), 'must be a port or a range like "8000-8080"')
DESCRIPTION = Text(1000)
USER_NAME = Text(200)
PASSWORD = Text(_PASSWORD_MAX, _PASSWORD_MIN)  # store/passwords.py's rules
CURRENT_PASSWORD = Text(_PASSWORD_MAX)  # checked against the hash, whatever rules it was set under
ROLES = ("admin", "user")
ROLE = Text(16, 1, whole("|".join(ROLES)), f"must be {' or '.join(map(repr, ROLES))}")
PEER_REF = Text(64, 1)  # a peer's id or name
USER_REF = Text(320, 1)  # a user's id or email
GROUP_REF = Text(100, 1)  # a group's id or name
SETUP_KEY_NAME = Text(100)
SETUP_KEY = Text(200, 1)
HOSTNAME = Text(255, 1)
VERSION = Text(64)
CHALLENGE = Text(64, 1)
PROOF = Text(256, 1)
PEER_NAME = Text(63, 1, whole(f"(?!{ID_SHAPE}$)[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?"),
                 "must be a DNS label (lowercase letters, digits and '-') not shaped like a peer id (16 hex digits)")
QUERY_ID = Text(64)  # the audit log's peer_id and type filters

EXPIRES_IN = Int(0, 10 * 365 * 86400)  # a setup key's lifetime; 0 = never
USAGE_LIMIT = Int(0, 10_000_000)
REKEY_FOR = Int(60, 7 * 86400)
SINCE = Int(0, 2**62)
LIMIT = Int(1, 1000)
PORT = Int(1, 65535)

MAX_RULES = 100  # per policy
MAX_RULE_ITEMS = 100  # sources, destinations, ports, local_users of one rule
PORT_PROTOCOLS = ("tcp", "udp")  # the protocols a rule's ports apply to
ENV_PATTERN = Text(64, 1, whole(_ENV_PATTERN), "is not a variable name pattern (letters, digits, '_', wildcards '*' and '?')")


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


def string(doc: dict[str, Any], name: str, spec: Text, *, required: bool = False,
           default: str | None = None) -> str | None:
    if name not in doc:
        if required:
            raise _missing(name)
        return default
    if doc[name] is None:
        raise _null(name)
    value = doc[name]
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} must be a string", field=name)
    return spec.check(value, name)


def boolean(doc: dict[str, Any], name: str, default: bool | None = None, *, field: str | None = None) -> bool | None:
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(field or name)
    value = doc[name]
    if not isinstance(value, bool):
        raise BadRequest(f"field {field or name!r} must be true or false", field=field or name)
    return value


def integer(doc: dict[str, Any], name: str, spec: Int, default: int | None = None) -> int | None:
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(name)
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {name!r} must be an integer", field=name)
    if not spec.lo <= value <= spec.hi:
        raise BadRequest(f"field {name!r} must be between {spec.lo} and {spec.hi}", field=name)
    return value


def str_list(doc: dict[str, Any], name: str, item: Text, *, default: list[str] | None = None,
             max_items: int = MAX_LIST, field: str | None = None) -> list[str] | None:
    field = field or name
    if name not in doc:
        return default
    if doc[name] is None:
        raise _null(field)
    value = doc[name]
    if not isinstance(value, list) or len(value) > max_items:
        raise BadRequest(f"field {field!r} must be a list of at most {max_items} strings", field=field)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise BadRequest(f"field {field}[{i}] must be a string", field=f"{field}[{i}]")
        item.check(v, f"{field}[{i}]")
    return list(value)


def email(value: str, field: str = "email") -> str:
    """An address typed at a command line (`meshmgmt init --admin-email`), spaces around forgiven."""
    return EMAIL.check(value.strip(), field).lower()


def accept_env(doc: dict[str, Any], field: str) -> list[str] | None:
    """A rule's AcceptEnv patterns (the peer's own rule, `ENV_PATTERN`); None when absent."""
    patterns = str_list(doc, "accept_env", ENV_PATTERN, field=field, max_items=MAX_ENV_PATTERNS)
    return None if patterns is None else list(dict.fromkeys(patterns))


def ssh_public_key(line: str) -> str:
    """`type base64` of a line `SSH_PUBLIC_KEY` admitted (its comment dropped), or ""."""
    return " ".join(line.split()[:2])


def query_int(request: web.Request, name: str, default: int, spec: Int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name!r} must be an integer", field=name) from exc
    if not spec.lo <= value <= spec.hi:
        raise BadRequest(f"query parameter {name!r} must be between {spec.lo} and {spec.hi}", field=name)
    return value


def only_known(doc: dict[str, Any], known: set[str], where: str = "") -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise BadRequest(f"unknown field {where}{unknown[0]!r}", field=f"{where}{unknown[0]}")


def query_str(request: web.Request, name: str, spec: Text) -> str | None:
    raw = request.query.get(name)
    if not raw:
        return None
    return spec.check(raw, name)
