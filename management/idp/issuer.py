"""The issuer: keys, grants and token issuance behind one object (no HTTP here).

`http.py` parses requests and calls these methods; the rest of management uses only
`jwks()`, `verify_access_token()`, `on_keys_changed()` and `rotate_keys()`.

Several replicas share keys, device codes and refresh tokens through the store. Each
replica keeps the key ring in memory and reloads it when a token names an unknown key,
when the store announces a change, and once a minute; when the published set changed,
the `on_keys_changed` callbacks run so network maps (which carry the JWKS) are pushed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshmgmt.ratelimit import RateLimiter
from meshsshd.logs import event

from . import exchange, tokens
from .errors import IdpError
from .grants import Grants
from .keys import ALGORITHMS, KeyRing
from .keystore import KeyStore
from .metrics import IdpMetrics
from .secret import SECRET_BYTES, KeySecretError, create_key_secret, read_key_secret
from .signin import SignInThrottle

log = logging.getLogger("meshmgmt.idp")

MAX_AUDIENCES = 512  # fan-out (`meshssh exec`) asks for every target at once; aiohttp caps a form at 1000 fields
PUBLIC_CLIENTS = ("meshssh",)
BAD_PASSWORD = "bad-password"  # the refusal reason of a failed sign-in (what sign-in throttling counts)


@dataclass
class IssuerSettings:
    access_ttl: int = tokens.ACCESS_TTL
    ssh_ttl: int = tokens.SSH_TTL
    refresh_ttl: int = 30 * 24 * 3600  # idle: a refresh token unused this long is dead
    refresh_family_ttl: int = 30 * 24 * 3600  # absolute: a login ends this long after it began
    device_ttl: int = 600
    poll_interval: int = 5
    key_overlap: float = 3600.0  # ≥ access_ttl: tokens of the previous key stay valid
    key_rotation_interval: float = 30 * 24 * 3600.0  # 0 = only on request
    algorithm: str = "EdDSA"
    key_secret: bytes | None = field(default=None, repr=False)  # seals private keys at rest ...
    key_secret_file: Path | None = None  # ... or read from here at start (created when no key needs it)
    public_clients: tuple[str, ...] = PUBLIC_CLIENTS
    housekeeping_interval: float = 60.0
    # Token buckets per client IP: (rate per second, burst).
    login_limit: tuple[float, int] = (1 / 6, 10)
    # Sign-in failures (management/idp/signin.py): per (email, client) a doubling wait
    # (first, cap) in seconds; per email a ceiling drained by failures only, which clients
    # that signed in as that email within `login_remember` seconds are exempt from.
    login_backoff: tuple[float, float] = (1.0, 900.0)
    login_email_ceiling: tuple[float, int] = (1 / 60, 50)
    login_remember: float = 30 * 86400.0
    device_code_limit: tuple[float, int] = (1.0, 20)
    token_limit: tuple[float, int] = (10.0, 120)
    clock: Callable[[], float] = field(default=time.time)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"issuer algorithm must be one of {ALGORITHMS}")
        if self.key_overlap < self.access_ttl:
            raise ValueError("key_overlap must be at least access_ttl, or tokens die with their key")
        if self.key_secret is not None and len(self.key_secret) != SECRET_BYTES:
            raise ValueError(f"key_secret must be {SECRET_BYTES} bytes")
        if self.refresh_family_ttl <= 0 or self.refresh_ttl <= 0:
            raise ValueError("refresh token lifetimes must be positive")


KeysChanged = Callable[[], Awaitable[None] | None]


class Issuer:
    def __init__(self, store: Any, issuer_url: str, settings: IssuerSettings | None = None) -> None:
        self.store = store
        self.issuer_url = issuer_url.rstrip("/")
        self.settings = settings or IssuerSettings()
        self.clock = self.settings.clock
        self.metrics = IdpMetrics()
        self.keystore = KeyStore(store, secret=self.settings.key_secret, overlap=self.settings.key_overlap,
                                 alg=self.settings.algorithm)
        self.grants = Grants(store, clock=self.clock, device_ttl=self.settings.device_ttl,
                             poll_interval=self.settings.poll_interval, refresh_ttl=self.settings.refresh_ttl,
                             refresh_family_ttl=self.settings.refresh_family_ttl)
        # Every check of a person's password (the verification page, a password change)
        # shares one throttle, so no endpoint is a faster guessing oracle than another.
        self.sign_in = SignInThrottle(self.settings.login_backoff, self.settings.login_email_ceiling,
                                      self.settings.login_remember)
        self._ring = KeyRing([], self.settings.key_overlap)
        self._published: tuple[str, ...] = ()
        self._fingerprint: tuple[tuple[str, float | None], ...] = ()
        self._callbacks: list[KeysChanged] = []
        self._unknown_kid_reloads = RateLimiter(rate=2.0, burst=5)
        self._reload_lock = asyncio.Lock()
        # How token exchange reads the mesh: the app's loader when there is one (it knows
        # the DNS domain that FQDNs use), else the store's default snapshot.
        self.load_state: Callable[[], Awaitable[Any]] = store.load_state

    # --- keys -----------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the key secret, seal keys an older version stored in the clear, load (or
        create) the signing keys; call once before serving. KeySecretError when the
        secret is missing for sealed keys, unsafe, or not the one that sealed them."""
        if self.keystore.secret is None:
            self.keystore.secret = await self._resolve_secret()
        for kid in await self.keystore.seal_plaintext():
            # Its clear copy may survive in backups or free pages: a new key takes over and
            # this one is withdrawn after the overlap, like any rotation.
            rotated = await self.keystore.rotate_if_current(kid, self.clock())
            event(log, "idp.key_sealed", level=logging.WARNING, kid=kid, rotated=rotated)
        self._ring = await self.keystore.ensure(self.clock())
        self._fingerprint = await self.keystore.kids()
        self._published = self._published_kids()
        event(log, "idp.started", issuer=self.issuer_url, kid=self._ring.current().kid,
              keys=len(self._published))

    async def _resolve_secret(self) -> bytes:
        path = self.settings.key_secret_file
        if path is None:
            raise KeySecretError("the issuer needs a key-encryption secret (key_secret or key_secret_file)")
        loop = asyncio.get_running_loop()
        secret = await loop.run_in_executor(None, read_key_secret, path)
        if secret is not None:
            return secret
        if await self.keystore.has_sealed():
            raise KeySecretError(
                f"the signing keys in the store are sealed, but {path} is missing: copy issuer.secret from "
                "the server where `meshmgmt init` ran (every replica needs the same file)")
        # A store from before the secret existed (or with no keys yet): nothing is lost by
        # making one now. O_EXCL, so two processes cannot both write one.
        try:
            secret = await loop.run_in_executor(None, create_key_secret, path)
        except FileExistsError:
            secret = await loop.run_in_executor(None, read_key_secret, path)
            assert secret is not None
        event(log, "idp.secret_created", level=logging.WARNING, path=str(path),
              hint="copy it to every replica's data dir and into backups kept apart from the database")
        return secret

    def _published_kids(self) -> tuple[str, ...]:
        return tuple(k.kid for k in self._ring.published(self.clock()))

    def jwks(self) -> dict[str, Any]:
        """Public JWKS: the signer and every key retired less than the overlap ago."""
        return self._ring.jwks(self.clock())

    def on_keys_changed(self, fn: KeysChanged) -> None:
        self._callbacks.append(fn)

    async def _changed(self) -> None:
        for fn in list(self._callbacks):
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # one failing listener must not stop the others or rotation
                log.exception("keys-changed callback failed")

    async def reload_keys(self) -> bool:
        """Re-read keys from the store; run callbacks if the published set changed."""
        async with self._reload_lock:
            fingerprint = await self.keystore.kids()
            if fingerprint != self._fingerprint or not self._ring.keys:
                self._ring = await self.keystore.ensure(self.clock())
                self._fingerprint = await self.keystore.kids()
            published = self._published_kids()
            changed = published != self._published
            self._published = published
        if changed:
            event(log, "idp.keys_changed", kids=list(published))
            await self._changed()
        return changed

    async def rotate_keys(self, *, drop_previous: bool = False) -> None:
        """A new key signs from now on; the old one stays published for the overlap, or,
        with `drop_previous` (suspected leak), is withdrawn at once: every token it signed
        stops working and users log in again."""
        now = self.clock()
        self._ring = await self.keystore.rotate(now, drop_previous=drop_previous)
        self.metrics.key_rotations += 1
        event(log, "idp.keys_rotated", kid=self._ring.current().kid,
              overlap=0 if drop_previous else self.settings.key_overlap)
        if drop_previous:
            await self.keystore.prune(now)
        await self.reload_keys()

    def key_list(self) -> list[dict[str, Any]]:
        """Every stored key as an operator sees it (`meshmgmt keys list`); no private part."""
        now = self.clock()
        signer = self._ring.current().kid
        overlap = self.settings.key_overlap
        return [{"kid": k.kid, "alg": k.alg, "created": k.created_at, "retired": k.retired_at,
                 "signing": k.kid == signer, "published": k.is_published(now, overlap),
                 "withdrawn_at": None if k.retired_at is None else k.retired_at + overlap}
                for k in reversed(self._ring.keys)]

    async def maintain(self) -> None:
        """Periodic work: auto-rotation, pruning retired keys, expiring grants, reload."""
        now = self.clock()
        interval = self.settings.key_rotation_interval
        current = self._ring.current()
        if interval and now - current.created_at >= interval:
            if await self.keystore.rotate_if_current(current.kid, now):
                self.metrics.key_rotations += 1
                event(log, "idp.keys_rotated", kid="(auto)", overlap=self.settings.key_overlap)
        pruned = await self.keystore.prune(now)
        if pruned:
            event(log, "idp.keys_pruned", count=pruned)
        await self.grants.housekeeping()
        await self.reload_keys()

    async def run_maintenance(self) -> None:
        while True:
            await asyncio.sleep(self.settings.housekeeping_interval)
            try:
                await self.maintain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("issuer maintenance failed")

    # --- token helpers -----------------------------------------------------------------

    def _sign(self, claims: dict[str, Any], typ: str = "JWT") -> str:
        return tokens.sign(claims, self._ring.current(), typ)

    async def _verify(self, token: str, audience: str, typ: str | None) -> dict[str, Any]:
        try:
            return tokens.verify(token, self._ring, self.issuer_url, audience, self.clock(), typ=typ)
        except IdpError as exc:
            # Another replica may have rotated: look at the store (bounded, since anyone can
            # send tokens with made-up kids) and retry once.
            if exc.reason != "unknown-key" or not self._unknown_kid_reloads.allow("kid"):
                raise
        await self.reload_keys()
        return tokens.verify(token, self._ring, self.issuer_url, audience, self.clock(), typ=typ)

    async def verify_access_token(self, token: str) -> dict[str, Any]:
        """Claims of a valid login access token (aud "meshmgmt"); IdpError with a reason."""
        return await self._verify(token, tokens.ACCESS_AUDIENCE, tokens.ACCESS_TOKEN_TYPE)

    def _access_response(self, identity: tokens.Identity, client_id: str, scope: str,
                         refresh_token: str | None = None) -> dict[str, Any]:
        now = self.clock()
        ttl = self.settings.access_ttl
        body: dict[str, Any] = {
            "access_token": self._sign(tokens.access_claims(identity, self.issuer_url, client_id, now, ttl, scope),
                                       tokens.ACCESS_TOKEN_TYPE),
            "token_type": "Bearer",
            "expires_in": ttl,
        }
        if scope:
            body["scope"] = scope
        if refresh_token:
            body["refresh_token"] = refresh_token
        if "openid" in scope.split():
            body["id_token"] = self._sign(tokens.id_token_claims(identity, self.issuer_url, client_id, now, ttl))
        return body

    def _check_public_client(self, client_id: str) -> None:
        if client_id not in self.settings.public_clients:
            raise IdpError("invalid_client", f"unknown client {client_id or '(none)'}", status=401,
                           reason="unknown-client")

    # --- grants ---------------------------------------------------------------------------

    async def device_authorization(self, client_id: str, scope: str) -> dict[str, Any]:
        self._check_public_client(client_id)
        start = await self.grants.start_device(client_id, scope)
        uri = f"{self.issuer_url}/device"
        event(log, "idp.device_started", client=client_id)
        return {
            "device_code": start.device_code,
            "user_code": start.user_code,
            "verification_uri": uri,
            "verification_uri_complete": f"{uri}?user_code={start.user_code}",
            "expires_in": start.expires_in,
            "interval": start.interval,
        }

    async def device_token(self, device_code: str, client_id: str) -> dict[str, Any]:
        self._check_public_client(client_id)
        user_id, scope = await self.grants.poll_device(device_code, client_id)
        identity = await self.grants.active_identity(user_id, "access_denied")
        refresh = await self.grants.issue_refresh(identity.sub, client_id, scope)
        event(log, "idp.login", user=identity.email, grant="device_code", client=client_id)
        return self._access_response(identity, client_id, scope, refresh)

    async def refresh(self, refresh_token: str, client_id: str) -> dict[str, Any]:
        self._check_public_client(client_id)
        identity, scope, successor = await self.grants.rotate_refresh(refresh_token, client_id)
        return self._access_response(identity, client_id, scope, successor)

    async def client_credentials(self, client_id: str, client_secret: str, scope: str = "") -> dict[str, Any]:
        identity = await self.grants.authenticate_client(client_id, client_secret)
        event(log, "idp.login", user=identity.email, grant="client_credentials", client=client_id)
        return self._access_response(identity, client_id, scope)

    async def approve_device(self, user_code: str, email: str, password: str, approve: bool) -> tokens.Identity:
        """The verification page: sign the user in, then approve or deny the code."""
        identity = await self.grants.authenticate_user(email, password)
        if identity is None:
            raise IdpError("access_denied", "wrong email or password", status=401, reason=BAD_PASSWORD)
        refused = await self.grants.decide_device(user_code, identity.sub, approve)
        if refused is not None:
            raise IdpError("invalid_request", "this code is unknown, expired or already used; "
                           "start `meshssh login` again", reason=f"device-{refused.value}")
        event(log, "idp.device_decided", user=identity.email, approved=approve)
        return identity

    async def exchange(self, subject_token: str, audiences: list[str], via: str | None = None
                       ) -> tuple[tokens.Identity, list[exchange.Allowed | exchange.Refused], str | None]:
        """Who asks, the per-audience decisions of an SSH token exchange (nothing signed),
        and the id of the `via` peer (delegation), checked by `exchange.check_via`."""
        # RFC 8693 §2.2.2: an invalid or unacceptable subject token is `invalid_request`.
        try:
            claims = await self.verify_access_token(subject_token)
        except IdpError as exc:
            raise IdpError("invalid_request", f"subject_token: {exc.description}; run `meshssh login`",
                           reason=f"subject-{exc.reason}") from exc
        identity = await self.grants.active_identity(str(claims["sub"]), "invalid_request")
        if not audiences:
            raise IdpError("invalid_request", "name at least one peer in `audience`", reason="no-audience")
        if len(audiences) > MAX_AUDIENCES:
            raise IdpError("invalid_request", f"at most {MAX_AUDIENCES} audiences per request", reason="too-many-audiences")
        state = await self.load_state()
        via_id = None
        if via is not None:
            checked = exchange.check_via(state, identity, via)
            if isinstance(checked, exchange.Refused):
                raise IdpError("invalid_request", checked.description, reason=checked.reason)
            via_id = checked.id
        decisions = [exchange.decide(state, identity, a) for a in audiences]
        duplicate = exchange.first_duplicate(decisions)
        if duplicate is not None:
            raise IdpError("invalid_request", f"audience {duplicate} repeats a peer already asked for; "
                           "name each peer once", reason="duplicate-audience")
        return identity, decisions, via_id

    def ssh_token(self, identity: tokens.Identity, allowed: exchange.Allowed, via: str | None = None) -> str:
        claims = tokens.ssh_claims(identity, self.issuer_url, allowed.peer.id, allowed.local_users,
                                   self.clock(), self.settings.ssh_ttl, via)
        return self._sign(claims)

    async def exchange_for_ssh(self, subject_token: str, audiences: list[str], via: str | None = None) -> tuple[tokens.Identity, list[dict[str, Any]]]:
        """The `tokens` list of an exchange response: a token or an error per audience."""
        identity, decisions, via = await self.exchange(subject_token, audiences, via)
        out: list[dict[str, Any]] = []
        for d in decisions:
            if isinstance(d, exchange.Allowed):
                out.append({"peer": d.peer.id, "name": d.peer.name, "audience": d.asked,
                            "access_token": self.ssh_token(identity, d, via),
                            "issued_token_type": tokens.SSH_TOKEN_TYPE_URN,
                            "expires_in": self.settings.ssh_ttl, "local_users": list(d.local_users)})
                self.metrics.granted("token_exchange")
                event(log, "idp.ssh_token", user=identity.email, peer=d.peer.name, peer_id=d.peer.id,
                      local_users=list(d.local_users), via=via, delegated=via is not None)
            else:
                out.append({"peer": d.asked, "error": d.error, "error_description": d.description})
                self.metrics.refused("token_exchange", d.reason)
                event(log, "idp.ssh_token_refused", user=identity.email, peer=d.asked, reason=d.reason)
        return identity, out
