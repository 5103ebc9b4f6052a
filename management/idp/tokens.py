"""Token rules: which claims each token carries, how long it lives, how it is checked.

Pure functions; the clock comes in as `now` (epoch seconds). Three kinds of JWT:

- login access token: `typ` at+jwt (RFC 9068), aud "meshmgmt", 15 min; sub/email/name/role.
- id token (device flow with scope openid): aud = the client id, same lifetime.
- SSH token (token exchange): aud = one peer id, 60 s, random `jti`, `local_users`,
  optional `via`. Peers check it offline against the JWKS in their network map.

Verification checks the time claims itself (PyJWT's clock cannot be injected) and maps
PyJWT's exceptions to stable reason codes at this one boundary.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import IdpError
from .keys import ALGORITHMS, KeyRing, SigningKey

ACCESS_AUDIENCE = "meshmgmt"
ACCESS_TOKEN_TYPE = "at+jwt"
ACCESS_TTL = 900
SSH_TTL = 60
LEEWAY = 30
SSH_TOKEN_TYPE_URN = "urn:meshsshd:token-type:ssh"


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for; `sub` is the management user id."""

    sub: str
    email: str
    name: str = ""
    role: str = "user"
    service: bool = False


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def _times(now: float, ttl: int) -> dict[str, int]:
    iat = int(now)
    return {"iat": iat, "nbf": iat, "exp": iat + ttl}


def access_claims(identity: Identity, issuer: str, client_id: str, now: float,
                  ttl: int = ACCESS_TTL, scope: str = "") -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": issuer, "aud": ACCESS_AUDIENCE, "sub": identity.sub, "email": identity.email,
        "name": identity.name, "role": identity.role, "client_id": client_id, "jti": new_jti(),
        **_times(now, ttl),
    }
    if identity.service:
        claims["service"] = True
    if scope:
        claims["scope"] = scope
    return claims


def id_token_claims(identity: Identity, issuer: str, client_id: str, now: float,
                    ttl: int = ACCESS_TTL) -> dict[str, Any]:
    return {
        "iss": issuer, "aud": client_id, "sub": identity.sub, "email": identity.email,
        "name": identity.name, "auth_time": int(now), "jti": new_jti(), **_times(now, ttl),
    }


def ssh_claims(identity: Identity, issuer: str, peer_id: str, local_users: list[str] | tuple[str, ...],
               now: float, ttl: int = SSH_TTL, via: str | None = None) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": issuer, "aud": peer_id, "sub": identity.sub, "email": identity.email,
        "jti": new_jti(), "local_users": list(local_users), **_times(now, ttl),
    }
    if identity.name:
        claims["name"] = identity.name
    if via:
        claims["via"] = via
    return claims


def sign(claims: dict[str, Any], key: SigningKey, typ: str = "JWT") -> str:
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ})


def unverified_kid(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise IdpError("invalid_grant", "the token is not a JWT", reason="malformed") from exc
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise IdpError("invalid_grant", "the token names no signing key", reason="unknown-key")
    return kid


def verify(token: str, ring: KeyRing, issuer: str, audience: str, now: float, *,
           typ: str | None = None, leeway: int = LEEWAY) -> dict[str, Any]:
    """Claims of a token this issuer signed for `audience`; IdpError(reason=...) otherwise."""
    kid = unverified_kid(token)
    header = jwt.get_unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise IdpError("invalid_grant", "the token uses a refused algorithm", reason="bad-algorithm")
    if typ is not None and str(header.get("typ", "")).lower() != typ:
        raise IdpError("invalid_grant", f"the token is not of type {typ}", reason="wrong-type")
    key = ring.verifier(kid, now)
    if key is None:
        raise IdpError("invalid_grant", "the token was signed by an unknown or retired key", reason="unknown-key")
    if header.get("alg") != key.alg:
        raise IdpError("invalid_grant", "the token's algorithm does not match its key", reason="bad-algorithm")
    try:
        claims = jwt.decode(
            token, key.private_key.public_key(), algorithms=[key.alg], audience=audience, issuer=issuer,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                     "require": ["iss", "aud", "sub", "exp", "iat", "jti"]},
        )
    except jwt.InvalidSignatureError as exc:
        raise IdpError("invalid_grant", "the token's signature is invalid", reason="bad-signature") from exc
    except jwt.InvalidAudienceError as exc:
        raise IdpError("invalid_grant", "the token is not meant for this audience", reason="wrong-audience") from exc
    except jwt.InvalidIssuerError as exc:
        raise IdpError("invalid_grant", "the token comes from another issuer", reason="wrong-issuer") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise IdpError("invalid_grant", f"the token lacks the {exc.claim!r} claim", reason="missing-claim") from exc
    except jwt.PyJWTError as exc:
        raise IdpError("invalid_grant", "the token is malformed", reason="malformed") from exc
    _check_times(claims, now, leeway)
    return claims


def _check_times(claims: dict[str, Any], now: float, leeway: int) -> None:
    for name in ("exp", "iat", "nbf"):
        if name in claims and not isinstance(claims[name], (int, float)):
            raise IdpError("invalid_grant", f"the token's {name} is not a number", reason="malformed")
    if now >= claims["exp"] + leeway:
        raise IdpError("invalid_grant", "the token has expired", reason="expired")
    if claims["iat"] > now + leeway or claims.get("nbf", claims["iat"]) > now + leeway:
        raise IdpError("invalid_grant", "the token is not valid yet", reason="not-yet-valid")
