"""The issuer's signing keys (JWKS): parsed, typed by algorithm, cached, refreshed.

Why not PyJWT's `PyJWKClient`: it fetches with urllib on the event loop and never expires
its cache. Here every fetch goes through aiohttp (`jwks_url`) or an executor read
(`jwks_file`); an inline document (`settings.jwks`, the managed mode) needs no I/O.

Which algorithms a key may verify is decided from the key itself (kty/crv, and its
`alg` member if present), never from a token's header: an RSA key verifies only
RS256/384/512 and PS256, a P-256 key only ES256, an Ed25519 key only EdDSA. That is what
defeats the HS256-with-the-public-key confusion and `alg: none`.

Caching: a fetched set lives for the server's Cache-Control max-age, clamped to
[MIN_TTL, MAX_TTL], DEFAULT_TTL when absent. A token with an unknown `kid` may force one
refresh, at most every REFRESH_COOLDOWN seconds. When a refresh fails the last good set
stays in use. All timing comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .logs import event

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("meshsshd.jwks")

# Asymmetric only; HS*/none never appear here, so no key can ever verify them.
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256"})
EC_ALGS = {"P-256": "ES256", "P-384": "ES384"}
OKP_ALGS = {"Ed25519": "EdDSA"}
ALLOWED_ALGS = RSA_ALGS | frozenset(EC_ALGS.values()) | frozenset(OKP_ALGS.values())
MIN_RSA_BITS = 2048

DEFAULT_TTL = 300.0
MIN_TTL = 60.0
MAX_TTL = 86400.0
FILE_TTL = 60.0
REFRESH_COOLDOWN = 30.0
FAILURE_RETRY = 5.0
FETCH_TIMEOUT = 10.0
MAX_JWKS_BYTES = 1024 * 1024
MAX_KEYS = 100


class JWKSError(Exception):
    """The key set could not be loaded; the message is for the operator's log."""


def url_problem(url: str) -> str | None:
    """Why keys must not be fetched from `url`, or None. Whoever can answer for the URL
    can mint logins for every account, so only TLS — or a loopback address, where
    nothing sits on the path — will do."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return f"{url!r} is not a valid URL"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower() == "localhost"
        if loopback:
            return None
        return f"{url} is plain http to {host}: use https (http only to a loopback address)"
    return f"{url} is not an https URL"


def file_problem(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why the keys in `path` cannot be trusted, or None: a key file that another user
    may write (or replace, through its directory) lets that user log in as anyone."""
    try:
        st = st or os.stat(path)
        parent = os.stat(path.parent)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        return f"{path} belongs to uid {st.st_uid}, not to root"
    if st.st_mode & 0o002:
        return f"{path} is writable by others (mode {st.st_mode & 0o7777:o})"
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        return f"{path.parent} is writable by others (mode {parent.st_mode & 0o7777:o})"
    if parent.st_uid not in (0, euid):
        return f"{path.parent} belongs to uid {parent.st_uid}, not to root"
    return None


@dataclass(frozen=True)
class SigningKey:
    """One usable public key and the algorithms it may verify."""

    kid: str | None
    algs: frozenset[str]
    key: Any  # a cryptography public key object


@dataclass(frozen=True)
class KeySet:
    keys: tuple[SigningKey, ...]
    source: str
    loaded_at: float
    expires_at: float

    def find(self, kid: str | None) -> tuple[SigningKey, ...]:
        """Keys for a token's kid; a token without kid may be checked against all."""
        if kid is None:
            return self.keys
        return tuple(k for k in self.keys if k.kid == kid)


def _algs_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWK may verify, from its type; empty if it is unusable here."""
    kty = jwk.get("kty")
    if kty == "RSA":
        algs = RSA_ALGS
    elif kty == "EC":
        alg = EC_ALGS.get(jwk.get("crv", ""))
        algs = frozenset({alg}) if alg else frozenset()
    elif kty == "OKP":
        alg = OKP_ALGS.get(jwk.get("crv", ""))
        algs = frozenset({alg}) if alg else frozenset()
    else:  # "oct" (shared secrets) and anything unknown
        algs = frozenset()
    declared = jwk.get("alg")
    if declared is not None:
        algs = algs & {declared}
    return algs


def parse_jwks(doc: Any, *, source: str) -> tuple[SigningKey, ...]:
    """A JWKS document → usable keys. Unusable keys are skipped with one log line each;
    a document with no usable key at all is an error."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JWKSError(f"{source}: not a JWKS document (no \"keys\" list)")
    keys: list[SigningKey] = []
    for index, jwk in enumerate(doc["keys"][:MAX_KEYS]):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        why = _skip_reason(jwk)
        if why is None:
            algs = _algs_for(jwk)
            try:
                key = jwt.PyJWK(jwk, algorithm=min(algs)).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
                why = f"cannot build key: {exc.__class__.__name__}"
            else:
                if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
                    why = f"RSA key of {key.key_size} bits is below {MIN_RSA_BITS}"
                elif hasattr(key, "private_bytes"):
                    why = "the JWKS contains a private key"
                else:
                    keys.append(SigningKey(kid=kid if isinstance(kid, str) else None, algs=algs, key=key))
        if why is not None:
            event(log, "jwks.key-skipped", logging.WARNING, source=source, index=index,
                  kid=printable(kid), why=why)
    if not keys:
        raise JWKSError(f"{source}: no usable signing key (asymmetric RSA/EC/Ed25519 only)")
    return tuple(keys)


def _skip_reason(jwk: Any) -> str | None:
    if not isinstance(jwk, dict):
        return "not an object"
    if jwk.get("use") not in (None, "sig"):
        return f"use is {jwk.get('use')!r}, not sig"
    if "kid" in jwk and not isinstance(jwk["kid"], str):
        return "kid is not a string"
    if not _algs_for(jwk):
        return f"key type {jwk.get('kty')!r}/{jwk.get('crv')!r} alg {jwk.get('alg')!r} is not accepted"
    return None


def printable(value: Any, limit: int = 64) -> str:
    """Attacker-supplied text (kid, alg, iss) made safe for a log line or a banner."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


def ttl_from_cache_control(header: str | None) -> float:
    """Cache-Control → seconds to keep the key set, clamped to [MIN_TTL, MAX_TTL]."""
    if not header:
        return DEFAULT_TTL
    lowered = header.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return MIN_TTL
    match = _MAX_AGE.search(header)
    if not match:
        return DEFAULT_TTL
    return min(max(float(match.group(1)), MIN_TTL), MAX_TTL)


class KeyStore:
    """Holds the current key set for one [jwt] configuration and refreshes it."""

    def __init__(
        self,
        *,
        jwks: Mapping[str, Any] | None = None,
        jwks_file: Path | None = None,
        jwks_url: str | None = None,
        clock: Callable[[], float],
    ) -> None:
        self._inline = jwks
        self._file = jwks_file
        self._url = jwks_url
        self._clock = clock
        self._current: KeySet | None = None
        self._lock = asyncio.Lock()
        self._last_forced = float("-inf")
        self._next_attempt = float("-inf")
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # how many loads were attempted; tests and metrics read it

    @property
    def source(self) -> str:
        if self._inline:
            return "inline"
        if self._file is not None:
            return str(self._file)
        return self._url or "none"

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def same_source(self, other: KeyStore) -> bool:
        """Would `other` load the same keys? Then the cached set can stay."""
        return (self._inline, self._file, self._url) == (other._inline, other._file, other._url)

    async def keys(self) -> KeySet:
        """The current set, loading it if missing or expired. Raises JWKSError only when
        no set at all is available."""
        now = self._clock()
        current = self._current
        if current is not None and now < current.expires_at:
            return current
        async with self._lock:
            current = self._current
            if current is not None and self._clock() < current.expires_at:
                return current
            return await self._reload_locked(forced=False)

    async def refresh_for_unknown_kid(self) -> KeySet | None:
        """One forced reload on an unknown kid, at most every REFRESH_COOLDOWN seconds.
        Returns the new set, or None when the cooldown forbids a reload."""
        if self._inline:
            return None  # managed mode: new keys arrive with the next network map
        async with self._lock:
            now = self._clock()
            if now - self._last_forced < REFRESH_COOLDOWN:
                return None
            self._last_forced = now
            return await self._reload_locked(forced=True)

    async def _reload_locked(self, *, forced: bool) -> KeySet:
        now = self._clock()
        if not forced and now < self._next_attempt:
            if self._current is not None:
                return self._current
            raise JWKSError(f"{self.source}: keys unavailable (last load failed, retrying soon)")
        self.fetches += 1
        try:
            keys, ttl = await self._load()
        except JWKSError as exc:
            self._next_attempt = self._clock() + FAILURE_RETRY
            event(log, "jwks.load-failed", logging.WARNING, source=self.source, why=str(exc),
                  keeping_old=self._current is not None)
            if self._current is None:
                raise
            # Keep the stale set, but do not retry on every login.
            self._current = KeySet(self._current.keys, self._current.source,
                                   self._current.loaded_at, self._clock() + FAILURE_RETRY)
            return self._current
        now = self._clock()
        self._current = KeySet(keys, self.source, now, now + ttl)
        event(log, "jwks.loaded", source=self.source, keys=len(keys),
              kids=[k.kid for k in keys], ttl=ttl, forced=forced)
        return self._current

    async def _load(self) -> tuple[tuple[SigningKey, ...], float]:
        if self._inline:
            return parse_jwks(self._inline, source="inline"), MAX_TTL
        if self._file is not None:
            return parse_jwks(await self._read_file(self._file), source=str(self._file)), FILE_TTL
        if self._url:
            doc, ttl = await self._fetch_url(self._url)
            return parse_jwks(doc, source=self._url), ttl
        raise JWKSError("no JWKS configured (jwks_url, jwks_file or inline jwks)")

    @staticmethod
    async def _read_file(path: Path) -> Any:
        def read() -> bytes:
            with open(path, "rb") as f:
                # Checked on the open file: what was checked is what is read.
                problem = file_problem(path, os.fstat(f.fileno()))
                if problem:
                    raise JWKSError(problem)
                return f.read(MAX_JWKS_BYTES + 1)

        try:
            data = await asyncio.get_running_loop().run_in_executor(None, read)
        except OSError as exc:
            raise JWKSError(f"{path}: {exc.strerror or exc}") from exc
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSError(f"{path}: larger than {MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise JWKSError(f"{path}: not JSON ({exc})") from exc

    async def _fetch_url(self, url: str) -> tuple[Any, float]:
        # Imported here: aiohttp is ~11 MiB of a daemon's memory, and only a jwks_url needs it.
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                headers={"Accept": "application/json"},
            )
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise JWKSError(f"{url}: HTTP {resp.status}")
                data = await resp.content.read(MAX_JWKS_BYTES + 1)
                ttl = ttl_from_cache_control(resp.headers.get("Cache-Control"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise JWKSError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSError(f"{url}: larger than {MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(data), ttl
        except ValueError as exc:
            raise JWKSError(f"{url}: not JSON ({exc})") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
