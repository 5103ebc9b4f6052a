"""May this identity, from this source address, log in as this local user? A pure function.

Deny unless one `AccessRule` matches the source address AND the identity AND the
requested login. Rules only allow, so the first match decides; `rule_index` names it for
the log. On a deny, `reason` says how far the best rule got, which is what an operator
needs to fix the policy:

    "no-rules"    there are no rules at all
    "local-user"  the login name is not a valid POSIX user name, or no rule grants it
    "root"        root login is off, or no matching rule names `root` explicitly
    "source"      no rule covers the source address
    "identity"    a rule covers the source, none the identity
    "token-users" a rule allowed it, but the token's own `local_users` claim does not

User names in rules: a name, `localpart` (the JWT identity up to `@`), or `*` (any
non-root user). `root` is never covered by `*` or `localpart`; it must be named and
root login must be on. The token's `local_users` claim, when present, is a second,
independent fence with the same syntax (defence in depth: management already resolved it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .auth import Identity
from .netmap import AccessRule

# POSIX portable user names as useradd accepts them (shadow-utils default).
_VALID_LOGIN = re.compile(r"^[a-z_][a-z0-9_-]*[$]?$")
MAX_LOGIN_LEN = 32
ROOT = "root"


@dataclass(frozen=True)
class AccessResult:
    allowed: bool
    reason: str  # "allowed" | "no-rules" | "source" | "identity" | "local-user" | "root" | "token-users"
    message: str  # short text safe for the client
    rule_index: int | None = None  # which rule allowed it


# How a refusal for the source address starts; meshssh recognises it in the peer's banner
# to name the options that choose a source (client/target.py: source_hint).
SOURCE_REFUSED = "your address "

def is_valid_login(name: str) -> bool:
    return len(name) <= MAX_LOGIN_LEN and _VALID_LOGIN.fullmatch(name) is not None


def localpart(identity: Identity) -> str | None:
    """The local user an identity maps to under `localpart`; only JWT identities have one."""
    if identity.method != "jwt":
        return None
    part = identity.value.split("@", 1)[0]
    return part if is_valid_login(part) else None


def _parse_source(source_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(source_ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def source_matches(sources: Sequence[str], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    for cidr in sources:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue  # AccessRule validates CIDRs; an odd one never matches
        if addr.version == net.version and addr in net:
            return True
    return False


def identity_matches(patterns: Sequence[str], identity: Identity) -> bool:
    return any(p == "*" or p == identity.value for p in patterns)


def user_matches(patterns: Sequence[str], identity: Identity, login: str) -> bool:
    """Does a local_users list grant `login`? `root` only when named literally."""
    if login == ROOT:
        return ROOT in patterns
    for pattern in patterns:
        if pattern == "*" or pattern == login:
            return True
        if pattern == "localpart" and localpart(identity) == login:
            return True
    return False


def _deny(reason: str, message: str) -> AccessResult:
    return AccessResult(False, reason, message)


def evaluate(
    rules: Sequence[AccessRule],
    source_ip: str,
    identity: Identity,
    login: str,
    *,
    root_login: bool,
) -> AccessResult:
    """The decision for one login attempt. No I/O, no clock: same inputs, same answer."""
    if not is_valid_login(login):
        return _deny("local-user", "invalid user name")
    if login == ROOT and not root_login:
        return _deny("root", "root login is disabled on this peer")
    if not rules:
        return _deny("no-rules", "no access rules on this peer; ask the administrator")
    addr = _parse_source(source_ip)
    # How far the best rule got: 0 nothing, 1 source, 2 source+identity.
    progress = 0
    for index, rule in enumerate(rules):
        if addr is None or not source_matches(rule.sources, addr):
            continue
        progress = max(progress, 1)
        if not identity_matches(rule.identities, identity):
            continue
        progress = 2
        if not user_matches(rule.local_users, identity, login):
            continue
        if identity.local_users is not None and not user_matches(identity.local_users, identity, login):
            return _deny("token-users", f"your token does not allow logging in as {login}")
        return AccessResult(True, "allowed", "allowed", rule_index=index)
    if progress == 0:
        return _deny("source", f"{SOURCE_REFUSED}{source_ip} may not log in to this peer")
    if progress == 1:
        return _deny("identity", f"{identity.value} may not log in to this peer")
    if login == ROOT:
        return _deny("root", "root login is not granted to you on this peer")
    return _deny("local-user", f"you may not log in as {login} on this peer")
