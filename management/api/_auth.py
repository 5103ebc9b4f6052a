"""Who is calling: an admin (admin token or an admin's access token), a user (access
token), or a peer (`Authorization: Peer <id>:<credential>`). Each check raises 401/403."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import select

from meshsshd.logs import event

from ..errors import Forbidden, Unauthorized
from ..store import AdminToken, Peer, User, aware, hash_secret, utcnow
from .keys import ISSUER, STORE

log = logging.getLogger("meshmgmt.auth")


@dataclass(frozen=True)
class Caller:
    kind: str  # "admin-token" | "user"
    user_id: str | None = None
    email: str | None = None
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin-token" or self.role == "admin"


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an 'Authorization: Bearer <token>' header is required")
    return token.strip()


async def _caller(request: web.Request) -> Caller:
    token = _bearer(request)
    store = request.app[STORE]
    async with store.session() as s:
        expires = (await s.execute(select(AdminToken.expires_at)
                                   .where(AdminToken.token_hash == hash_secret(token)))).first()
    if expires is not None:
        until = aware(expires[0])
        if until is None or until <= utcnow():
            event(log, "auth.token_refused", reason="admin-token-expired")
            raise Unauthorized(f"the admin token expired{f' on {until:%Y-%m-%d %H:%M} UTC' if until else ''}; "
                               "run `meshmgmt admin-token rotate --data-dir DIR` on the management server",
                               code="admin_token_expired")
        return Caller("admin-token", role="admin")
    issuer = request.app[ISSUER]
    if issuer is None or token.count(".") != 2:
        raise Unauthorized("the token is not valid")
    try:
        claims: dict[str, Any] = await issuer.verify_access_token(token)
    except Exception as exc:  # the issuer raises its own error types for bad tokens
        event(log, "auth.token_refused", reason=type(exc).__name__)
        raise Unauthorized("the access token is not valid or has expired") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or len(sub) > 64:
        raise Unauthorized("the access token has no subject")
    async with store.session() as s:
        user = await s.get(User, sub)
    if user is None or user.blocked:
        raise Unauthorized("the token's user does not exist or is blocked")
    return Caller("user", user_id=user.id, email=user.email, role=user.role)


async def require_admin(request: web.Request) -> Caller:
    caller = await _caller(request)
    if not caller.is_admin:
        raise Forbidden("this needs an admin")
    return caller


async def require_user(request: web.Request) -> Caller:
    """A person's (or service user's) access token; the admin token has no identity."""
    caller = await _caller(request)
    if caller.email is None:
        raise Forbidden("this needs a user's access token (meshssh login), not the admin token")
    return caller


def peer_header(request: web.Request) -> tuple[str, str] | None:
    """(peer id, credential) from `Authorization: Peer <id>:<credential>`, None without one."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    peer_id, sep, credential = value.strip().partition(":")
    if scheme != "Peer" or not sep or not peer_id or not credential or "\x00" in peer_id:
        return None
    return peer_id[:64], credential


async def require_peer(request: web.Request) -> Peer:
    claimed = peer_header(request)
    if claimed is None:
        raise Unauthorized("an 'Authorization: Peer <peer_id>:<credential>' header is required")
    peer_id, credential = claimed
    async with request.app[STORE].session() as s:
        peer = await s.get(Peer, peer_id)
    if peer is None or not hmac.compare_digest(peer.credential_hash, hash_secret(credential)):
        raise Unauthorized("unknown peer or wrong credential", code="peer_unauthorized")
    return peer
