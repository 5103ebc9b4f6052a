"""Token exchange (RFC 8693) for SSH: one identity, many target peers, one answer each.

Pure: given the mesh snapshot, the identity and what the client named, decide per
target whether an SSH token may be issued and with which local users, or why not. The
issuer signs the tokens; this module never sees keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshmgmt.netmap import find_peer, ssh_access
from meshmgmt.state import MeshState, PeerRecord
from meshsshd.acl import is_valid_login

from .tokens import Identity
from .why_not import SERVING, ssh_state, why_no_grant


@dataclass(frozen=True)
class Allowed:
    asked: str
    peer: PeerRecord
    local_users: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    asked: str
    error: str  # RFC 8693 / 6749 code: invalid_target | access_denied
    reason: str  # stable code for metrics and tests
    description: str
    status: int


def resolve_local_users(patterns: tuple[str, ...], email: str) -> tuple[str, ...]:
    """`localpart` becomes the identity's own name (when it is a valid login); `*`, names
    and `root` stay. The peer applies the same meaning to the claim, so this only makes
    the token readable, it grants nothing new."""
    out: dict[str, None] = {}
    for p in patterns:
        if p == "localpart":
            part = email.split("@", 1)[0]
            if is_valid_login(part):
                out.setdefault(part, None)
        else:
            out.setdefault(p, None)
    return tuple(out)


MAX_AUDIENCE_LEN = 253  # the longest DNS name


def _shown(asked: str) -> str:
    """What a refusal quotes of a name the client sent: all of a plausible one."""
    return asked if len(asked) <= MAX_AUDIENCE_LEN else asked[:40] + "…"


def decide(state: MeshState, identity: Identity, asked: str) -> Allowed | Refused:
    peer = find_peer(state, asked) if asked.strip() and len(asked) <= MAX_AUDIENCE_LEN else None
    if peer is None:
        shown = _shown(asked)
        return Refused(shown, "invalid_target", "unknown-peer", f"unknown peer {shown}", 400)
    grant = ssh_access(state, identity.email, None, peer.id)
    if grant is not None:
        users = resolve_local_users(grant.local_users, identity.email)
        if users:
            return Allowed(asked, peer, users)
    reason, message = ssh_state(state, peer)
    if reason != SERVING:
        return Refused(asked, "access_denied", reason, message, 403)
    reason, message = why_no_grant(state, identity.email, peer)
    return Refused(asked, "access_denied", reason, message, 403)


def first_duplicate(decisions: list[Allowed | Refused]) -> str | None:
    """The first audience whose token would go to a peer an earlier audience already got
    one for (by id, name, FQDN or mesh IP), or that repeats an earlier refused name; None
    when all are distinct. Two tokens for one peer from one request serve no client (the
    client names each peer once by id) and would let one request mint a pile of live
    tokens for the same target."""
    seen: set[str] = set()
    for d in decisions:
        key = d.peer.id if isinstance(d, Allowed) else d.asked.strip().lower().rstrip(".")
        if key in seen:
            return d.asked
        seen.add(key)
    return None


def check_via(state: MeshState, identity: Identity, via: str) -> PeerRecord | Refused:
    """The peer a delegated request comes through (the session on B asking the user's
    client on A for a token for C). It must be a known peer that this identity may reach
    by SSH itself: a token "via" a peer the user never had a session on would be a lie
    in the audit trail. Its id goes into the SSH token's `via` claim."""
    ok_ref = bool(via.strip()) and len(via) <= MAX_AUDIENCE_LEN
    peer = find_peer(state, via) if ok_ref else None
    shown = _shown(via)
    if peer is None:
        return Refused(shown, "invalid_request", "via-unknown-peer", f"via: unknown peer {shown}", 400)
    if ssh_access(state, identity.email, None, peer.id) is None:
        return Refused(shown, "invalid_request", "via-not-reachable",
                       f"via: {identity.email} may not reach {peer.name} by SSH, so nothing "
                       f"can be delegated through it", 400)
    return peer
