"""Who is logging in: JWT validation (the password is the token), key and peer identities.

`JWTValidator.validate(token)` either returns an `Identity` or raises `AuthRefused` with
a stable `reason` (for logs, metrics, tests) and a `user_message` that tells the person
what to do. The order of checks is fixed so that nothing a token claims is trusted
before its signature is checked:

    size (≤ 16 KiB, unread otherwise) → header → alg in the asymmetric allowlist →
    key by kid (one rate-limited JWKS refresh on a miss) → alg fits that key's type →
    signature → required claims → iss → aud → exp → nbf → iat (future, too old) →
    identity claim → issued after the replay cache began, unless the replay log of
    earlier runs was read back → jti not seen before (recorded only when everything
    passed, in memory and in the replay log, meshsshd/replay_log.py)

`check_claims` is the pure core (claims, expectations, now → refusal or None); the
validator adds the keys (`meshsshd/jwks.py`), the clock and the replay cache. The token
itself never appears in a message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt

from .config import JWTSettings
from .config_values import number_problem
from .errors import AuthRefused
from .jwks import ALLOWED_ALGS, JWKSError, KeyStore, SigningKey, printable
from .logs import event
from .replay_log import ReplayLog

log = logging.getLogger("meshsshd.auth")

MAX_TOKEN_BYTES = 16 * 1024
REPLAY_CACHE_SIZE = 100_000
REQUIRED_CLAIMS = ("iss", "aud", "exp", "nbf", "iat", "jti")
LOGIN_HINT = "run `meshssh login`"
# Signature checks only; claims are checked by check_claims with the injected clock.
_JWS = jwt.PyJWS(algorithms=sorted(ALLOWED_ALGS), options={"enforce_minimum_key_length": True})


@dataclass(frozen=True)
class Identity:
    """The authenticated principal; what the access rules (`meshsshd/acl.py`) match."""

    value: str  # user_claim value, "key:SHA256:..." for public keys, "peer:<ip>" with disable_auth
    method: str  # "jwt" | "publickey" | "none"
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    token_id: str | None = None  # jti
    expires_at: float | None = None
    local_users: tuple[str, ...] | None = None  # the token's local_users claim, if any
    via: str | None = None  # delegation chain from the token's "via" claim


def key_identity(fingerprint: str) -> Identity:
    """Identity of a public-key login; `fingerprint` is asyncssh's "SHA256:..." form."""
    return Identity(value=f"key:{fingerprint}", method="publickey", claims=MappingProxyType({}))


def peer_identity(source_ip: str) -> Identity:
    """Identity with disable_auth: only the source address is known."""
    return Identity(value=f"peer:{source_ip}", method="none", claims=MappingProxyType({}))


@dataclass(frozen=True)
class ClaimExpectations:
    issuer: str
    audience: tuple[str, ...]
    max_token_age: float = 600.0
    leeway: float = 30.0
    user_claim: str = "sub"

    @classmethod
    def from_settings(cls, settings: JWTSettings) -> ClaimExpectations:
        return cls(settings.issuer, tuple(settings.audience), settings.max_token_age,
                   settings.leeway, settings.user_claim)


def check_claims(claims: Mapping[str, Any], expect: ClaimExpectations, now: float) -> None:
    """Raise AuthRefused if verified claims do not admit a login at `now`. Pure."""
    for name in (*REQUIRED_CLAIMS, expect.user_claim):
        if claims.get(name) in (None, "", []):
            raise AuthRefused(
                "missing-claim",
                f"token lacks the `{printable(name)}` claim — the issuer must include it",
            )
    for name in ("exp", "nbf", "iat"):
        if problem := number_problem(claims[name], integer=True):
            raise AuthRefused(
                "malformed",
                f"token claim `{name}` {problem} — "
                "the issuer must send whole seconds since 1970 (RFC 7519 NumericDate)",
            )
    if not isinstance(claims["jti"], str) or not isinstance(claims["iss"], str):
        raise AuthRefused("malformed", f"token claims `iss`/`jti` must be strings — {LOGIN_HINT}")
    if not isinstance(claims[expect.user_claim], str):
        raise AuthRefused("malformed", f"token claim `{printable(expect.user_claim)}` is not a string")

    if claims["iss"] != expect.issuer:
        raise AuthRefused(
            "wrong-issuer",
            f"token is from issuer {printable(claims['iss'])}, this peer trusts "
            f"{printable(expect.issuer)} — {LOGIN_HINT} with the right management server",
        )
    aud = claims["aud"]
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in expect.audience for a in auds):
        raise AuthRefused(
            "wrong-audience",
            "token is for another peer — fetch a token for this peer (`meshssh` does it per host)",
        )
    leeway = expect.leeway
    exp, nbf, iat = float(claims["exp"]), float(claims["nbf"]), float(claims["iat"])
    # The clock skew tolerated is the same both ways: a fresh token is accepted by a peer
    # whose clock is up to its usable life + leeway ahead (exp edge) or behind (iat edge).
    # Tolerating a clock behind costs nothing: the token stops at exp + leeway by the
    # peer's clock either way, and nobody can hold a token before it is issued.
    skew = max(0.0, min(exp - iat, expect.max_token_age)) + leeway
    if now > exp + leeway:
        # A token fetched a moment ago looks just like an old one to a peer whose clock
        # is ahead: say both, with the offset that would explain it.
        raise AuthRefused(
            "expired",
            f"token expired {int(now - exp)} s ago, issued {int(now - iat)} s ago by this "
            f"peer's clock — if it was fetched just now, this peer's clock is about "
            f"{int(now - iat)} s ahead: check the clocks of this peer and your computer (NTP); "
            f"otherwise {LOGIN_HINT} for a fresh one",
        )
    if iat > now + skew:
        raise AuthRefused(
            "issued-in-future",
            f"clock skew: token issued in the future ({int(iat - now)} s ahead, at most "
            f"{int(skew)} s tolerated) — this peer's clock is behind the issuer's: check the "
            "clocks of this peer and your computer (NTP)",
        )
    if nbf > max(now, iat) + leeway:
        raise AuthRefused(
            "not-yet-valid",
            f"token is not valid for another {int(nbf - max(now, iat))} s (the issuer dated "
            "its `nbf` after its `iat`) — use it later, or ask the issuer not to post-date tokens",
        )
    if now - iat > expect.max_token_age + leeway:
        raise AuthRefused(
            "too-old",
            f"token was issued {int(now - iat)} s ago, this peer accepts at most "
            f"{int(expect.max_token_age)} s — {LOGIN_HINT} for a fresh one",
        )


def _local_users_claim(claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = claims.get("local_users")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthRefused("malformed", "token claim `local_users` must be a list of names")
    return tuple(value)


def _decode_segment(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def read_header(token: str) -> dict[str, Any]:
    """The unverified JOSE header of a compact JWS; AuthRefused("malformed") otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise AuthRefused("malformed", f"the password is not a token (JWT) — {LOGIN_HINT}")
    try:
        header = _decode_segment(parts[0])
    except (ValueError, binascii.Error, UnicodeError):
        raise AuthRefused("malformed", f"token header is not valid JSON — {LOGIN_HINT}") from None
    if not isinstance(header, dict):
        raise AuthRefused("malformed", f"token header is not a JSON object — {LOGIN_HINT}")
    return header


class _ReplayCache:
    """Seen (issuer, jti) pairs until the token could no longer be accepted anyway.

    Bounded: when full of live entries, new logins are refused (fail closed) rather than
    forgetting a jti that could then be replayed.
    """

    def __init__(self, max_entries: int = REPLAY_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _purge(self, now: float, full: bool) -> None:
        if full:
            for key in [k for k, until in self._seen.items() if until < now]:
                del self._seen[key]
            return
        # Entries arrive roughly in expiry order; drop the expired head cheaply.
        while self._seen:
            key, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[key]

    def entries(self) -> list[tuple[str, str, float]]:
        return [(iss, jti, until) for (iss, jti), until in self._seen.items()]

    def seen(self, key: tuple[str, str], now: float) -> bool:
        until = self._seen.get(key)
        return until is not None and until >= now

    def add(self, key: tuple[str, str], until: float, now: float) -> None:
        self._purge(now, full=False)
        if len(self._seen) >= self.max_entries:
            self._purge(now, full=True)
        if len(self._seen) >= self.max_entries:
            raise AuthRefused("replay-cache-full", "too many logins right now — try again in a minute")
        self._seen[key] = until


class JWTValidator:
    """Checks SSH tokens for one peer. One instance per server; `update()` swaps the
    settings (e.g. a new network map) and keeps the replay cache."""

    def __init__(self, settings: JWTSettings, *, clock: Callable[[], float] = time.time,
                 started: float | None = None, replay_log: ReplayLog | None = None) -> None:
        self._clock = clock
        self._replay = _ReplayCache()
        self._replay_log = replay_log
        # Until restore() has read the replay log back, the cache knows nothing of the
        # tokens used before it existed (before a restart): a token issued earlier cannot
        # be told from a replay. `started` defaults to now; whole seconds, as `iat` is: a
        # token from the same second still works.
        self._cache_since = float(int(clock() if started is None else started))
        self._settings = settings
        self._expect = ClaimExpectations.from_settings(settings)
        self._keys = self._store_for(settings)
        self._old_stores: list[KeyStore] = []

    def _store_for(self, settings: JWTSettings) -> KeyStore:
        # Precedence as documented in JWTSettings: inline jwks, then file, then URL.
        if settings.jwks:
            return KeyStore(jwks=settings.jwks, clock=self._clock)
        if settings.jwks_file is not None:
            return KeyStore(jwks_file=settings.jwks_file, clock=self._clock)
        return KeyStore(jwks_url=settings.jwks_url, clock=self._clock)

    @property
    def settings(self) -> JWTSettings:
        return self._settings

    @property
    def key_store(self) -> KeyStore:
        return self._keys

    def update(self, settings: JWTSettings) -> None:
        """New settings; keys are reloaded if their source changed; seen jtis are kept."""
        new_store = self._store_for(settings)
        if not self._keys.same_source(new_store):
            if self._keys.has_session:
                self._old_stores.append(self._keys)  # its HTTP session is closed in close()
            self._keys = new_store
        self._settings = settings
        self._expect = ClaimExpectations.from_settings(settings)

    async def restore(self) -> None:
        """Read back the tokens accepted before a restart; from then on any token may be
        judged by its jti. If the log cannot be read, older tokens stay refused."""
        if self._replay_log is None:
            return
        log_ = self._replay_log
        try:
            entries = await asyncio.get_running_loop().run_in_executor(None, log_.load, self._clock())
        except OSError as exc:
            event(log, "replay-log.unreadable", logging.WARNING, path=str(log_.path), error=str(exc),
                  effect="tokens issued before this start are refused")
            return
        now = self._clock()
        for iss, jti, until in entries:
            self._replay.add((iss, jti), until, now)
        self._cache_since = float("-inf")
        event(log, "replay-log.restored", entries=len(entries))

    async def _remember(self, key: tuple[str, str], until: float) -> None:
        """On disk before the login goes on; a failed write is logged, not fatal (a full
        disk must not lock everyone out), and leaves only this token replayable after a
        restart."""
        if self._replay_log is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self._replay_log.append, (key[0], key[1], until), self._replay.entries)
        except OSError as exc:
            event(log, "replay-log.write-failed", logging.WARNING, path=str(self._replay_log.path),
                  error=str(exc))

    async def close(self) -> None:
        for store in (*self._old_stores, self._keys):
            await store.close()
        self._old_stores.clear()

    async def validate(self, token: str) -> Identity:
        """The identity a token proves, or AuthRefused. Never logs or echoes the token.

        Whatever a token holds, the answer is a refusal with a reason: an exception no
        check foresaw (a claim value that breaks arithmetic) is logged and refused here
        rather than dropping the connection with no log line and no audit event."""
        try:
            return await self._validate(token)
        except AuthRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - the login must get an answer, see above
            event(log, "auth.check-failed", level=logging.ERROR, error=type(exc).__name__)
            raise AuthRefused("internal-error", "this peer could not check the token — "
                              "ask the administrator to look at the peer's log") from None

    async def _validate(self, token: str) -> Identity:
        if not isinstance(token, str):
            raise AuthRefused("malformed", f"the password is not a token (JWT) — {LOGIN_HINT}")
        if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
            raise AuthRefused(
                "too-large",
                f"token is larger than {MAX_TOKEN_BYTES} bytes — use `meshssh`, which sends "
                "a short per-peer token",
            )
        if not token.isascii():
            raise AuthRefused("malformed", f"the password is not a token (JWT) — {LOGIN_HINT}")
        header = read_header(token)
        if "crit" in header:
            raise AuthRefused(
                "unsupported-crit",
                f"token header marks extensions {printable(header['crit'])} as critical, which "
                "this peer does not implement (RFC 7515 crit) — the issuer must not set `crit`",
            )
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
            raise AuthRefused(
                "alg-not-allowed",
                f"token algorithm {printable(alg)} is not accepted (asymmetric RS/PS/ES/EdDSA "
                "only) — the issuer must sign with an asymmetric key",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthRefused("malformed", f"token key id (kid) is not a string — {LOGIN_HINT}")

        candidates = await self._keys_for(kid)
        usable = [k for k in candidates if alg in k.algs]
        if not usable:
            raise AuthRefused(
                "alg-not-allowed",
                f"token algorithm {alg} does not match the type of signing key "
                f"{printable(kid) if kid else '(no kid)'} — the issuer's JWKS and token disagree",
            )
        payload = self._verify(token, alg, usable)
        try:
            claims = json.loads(payload)
        except ValueError:
            raise AuthRefused("malformed", f"token payload is not JSON — {LOGIN_HINT}") from None
        if not isinstance(claims, dict):
            raise AuthRefused("malformed", f"token payload is not a JSON object — {LOGIN_HINT}")

        now = self._clock()
        expect = self._expect
        check_claims(claims, expect, now)
        local_users = _local_users_claim(claims)
        via = claims.get("via")
        replay_key = (claims["iss"], claims["jti"])
        if float(claims["iat"]) < self._cache_since:
            raise AuthRefused(
                "issued-before-start",
                "token was issued before this peer's SSH server started, so it could be a "
                "replay — run the command again (`meshssh` fetches a fresh token)",
            )
        if self._replay.seen(replay_key, now):
            raise AuthRefused(
                "replayed",
                "token was already used — each token works once; `meshssh` fetches a new one "
                "per connection",
            )
        # After this moment no leeway-stretched check could accept the token again.
        until = min(float(claims["exp"]), float(claims["iat"]) + expect.max_token_age) + expect.leeway
        self._replay.add(replay_key, until, now)
        await self._remember(replay_key, until)
        return Identity(
            value=claims[expect.user_claim],
            method="jwt",
            claims=MappingProxyType(dict(claims)),
            token_id=claims["jti"],
            expires_at=float(claims["exp"]),
            local_users=local_users,
            via=via if isinstance(via, str) else None,
        )

    async def _keys_for(self, kid: str | None) -> tuple[SigningKey, ...]:
        store = self._keys
        try:
            keyset = await store.keys()
        except JWKSError:
            raise AuthRefused(
                "no-keys",
                "this peer cannot load the token signing keys (JWKS) — ask the administrator "
                "to check [jwt] jwks_url / jwks_file",
            ) from None
        found = keyset.find(kid)
        if found:
            return found
        refreshed = await store.refresh_for_unknown_kid()
        if refreshed is not None:
            found = refreshed.find(kid)
            if found:
                return found
        event(log, "auth.unknown-kid", kid=printable(kid), known=[k.kid for k in keyset.keys],
              refreshed=refreshed is not None)
        raise AuthRefused(
            "unknown-kid",
            f"token signed with unknown key id {printable(kid)} — {LOGIN_HINT} for a fresh "
            "token; if it persists, the peer's JWKS is out of date",
        )

    @staticmethod
    def _verify(token: str, alg: str, keys: list[SigningKey]) -> bytes:
        for key in keys:
            try:
                return _JWS.decode_complete(token, key=key.key, algorithms=[alg])["payload"]
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidKeyError:
                continue
            except jwt.DecodeError:
                raise AuthRefused("malformed", f"token is not a valid JWT — {LOGIN_HINT}") from None
            except jwt.InvalidTokenError:
                continue
        raise AuthRefused("bad-signature", f"token signature is invalid — {LOGIN_HINT}")
