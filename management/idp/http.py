"""HTTP edge of the issuer: parse the request, call the Issuer, shape the answer.

Routes (docs/protocol.md, docs/idp.md):
    GET  /.well-known/openid-configuration   discovery
    GET  /oauth/jwks                          public keys
    POST /oauth/device/code                   RFC 8628 device authorization
    POST /oauth/token                         device_code, refresh_token, client_credentials,
                                              token-exchange (RFC 8693)
    GET  /device, POST /device                verification page (HTML)

OAuth errors are RFC 6749 JSON (`error`, `error_description`) with no-store caching.
Every refusal is counted by grant type and reason; nothing secret is logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from aiohttp import web

from meshmgmt.ratelimit import RateLimiter
from meshsshd.logs import event

from . import page
from .device import normalize_user_code
from .errors import IdpError
from .issuer import BAD_PASSWORD, Issuer
from .signin import BACKOFF, CEILING
from .tokens import SSH_TOKEN_TYPE_URN

log = logging.getLogger("meshmgmt.idp")

GRANT_DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_REFRESH = "refresh_token"
GRANT_CLIENT = "client_credentials"
GRANT_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE_URN = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE_URN = "urn:ietf:params:oauth:token-type:jwt"

_METRIC_GRANT = {GRANT_DEVICE: "device_code", GRANT_REFRESH: "refresh_token",
                 GRANT_CLIENT: "client_credentials", GRANT_EXCHANGE: "token_exchange"}
# Normal steps of the device flow, not refusals.
_NOT_REFUSALS = {"authorization_pending"}
# A single-audience exchange refusal was already counted (and logged) per peer.
_COUNTED = "counted"

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(exc: IdpError, extra_headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(exc.to_oauth(), status=exc.status, headers={**NO_STORE, **(extra_headers or {})})


def _limited(retry_after: str, what: str) -> web.Response:
    return web.json_response(
        {"error": "rate_limited", "error_description": f"too many {what}; retry in {retry_after} s"},
        status=429, headers={**NO_STORE, "Retry-After": retry_after},
    )


# What the page says when a throttle refuses (by Decision.reason); {} is the wait in seconds.
_SIGN_IN_WAIT = {
    "": "Too many sign-in attempts. Try again in {} s.",
    BACKOFF: "Too many failed sign-ins for this email from here. Try again in {} s.",
    CEILING: "Too many failed sign-ins for this account. Try again in {} s, "
             "or sign in from a device that signed in here before.",
}


def _client_ip(request: web.Request) -> str:
    return request.remote or "?"


class IdpRoutes:
    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        s = issuer.settings
        self.login_ip = RateLimiter(*s.login_limit)
        self.sign_in = issuer.sign_in
        self.device_code = RateLimiter(*s.device_code_limit)
        self.token = RateLimiter(*s.token_limit)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/oauth/jwks", self.jwks)
        app.router.add_post("/oauth/device/code", self.device_authorization)
        app.router.add_post("/oauth/token", self.token_endpoint)
        app.router.add_get("/device", self.device_page)
        app.router.add_post("/device", self.device_submit)

    # --- metadata -------------------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        iss = self.issuer.issuer_url
        alg = self.issuer.settings.algorithm
        doc = {
            "issuer": iss,
            "jwks_uri": f"{iss}/oauth/jwks",
            "token_endpoint": f"{iss}/oauth/token",
            "device_authorization_endpoint": f"{iss}/oauth/device/code",
            "grant_types_supported": [GRANT_DEVICE, GRANT_REFRESH, GRANT_CLIENT, GRANT_EXCHANGE],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [alg],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "email", "name", "role",
                                 "local_users", "via"],
            "requested_token_types_supported": [SSH_TOKEN_TYPE_URN],
        }
        return web.json_response(doc, headers={"Cache-Control": "public, max-age=300"})

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.issuer.jwks(), headers={"Cache-Control": "public, max-age=60"})

    # --- device authorization -------------------------------------------------------------

    async def device_authorization(self, request: web.Request) -> web.Response:
        decision = self.device_code.hit(_client_ip(request))
        if not decision.allowed:
            self.issuer.metrics.refused("device_authorization", "rate-limited")
            return _limited(decision.retry_after_header, "login attempts")
        form = await request.post()
        try:
            body = await self.issuer.device_authorization(str(form.get("client_id", "")), str(form.get("scope", "")))
        except IdpError as exc:
            self.issuer.metrics.refused("device_authorization", exc.reason)
            return _oauth_error(exc)
        return web.json_response(body, headers=NO_STORE)

    # --- token endpoint -------------------------------------------------------------------

    async def token_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        metric = _METRIC_GRANT.get(grant_type, "unknown")
        decision = self.token.hit(_client_ip(request))
        if not decision.allowed:
            self.issuer.metrics.refused(metric, "rate-limited")
            return _limited(decision.retry_after_header, "token requests")
        try:
            body, status = await self._grant(request, grant_type, form)
        except IdpError as exc:
            if exc.error not in _NOT_REFUSALS and exc.reason != _COUNTED:
                self.issuer.metrics.refused(metric, exc.reason)
            if exc.error not in ("authorization_pending", "slow_down") and exc.reason != _COUNTED:
                event(log, "idp.token_refused", grant=metric, reason=exc.reason, ip=_client_ip(request))
            headers = {"WWW-Authenticate": 'Basic realm="meshmgmt"'} if exc.status == 401 else None
            return _oauth_error(exc, headers)
        if metric != "token_exchange":  # exchange counts per issued token
            self.issuer.metrics.granted(metric)
        return web.json_response(body, status=status, headers=NO_STORE)

    async def _grant(self, request: web.Request, grant_type: str, form: Any) -> tuple[dict[str, Any], int]:
        field = lambda name: str(form.get(name, "") or "")  # noqa: E731
        if grant_type == GRANT_DEVICE:
            _require(field("device_code"), "device_code")
            return await self.issuer.device_token(field("device_code"), field("client_id")), 200
        if grant_type == GRANT_REFRESH:
            _require(field("refresh_token"), "refresh_token")
            return await self.issuer.refresh(field("refresh_token"), field("client_id")), 200
        if grant_type == GRANT_CLIENT:
            client_id, secret = _client_auth(request, field("client_id"), field("client_secret"))
            return await self.issuer.client_credentials(client_id, secret, field("scope")), 200
        if grant_type == GRANT_EXCHANGE:
            return await self._exchange(form, field)
        if not grant_type:
            raise IdpError("invalid_request", "missing grant_type", reason="missing-grant-type")
        raise IdpError("unsupported_grant_type", f"grant type {grant_type[:80]} is not supported",
                       reason="unsupported-grant-type")

    async def _exchange(self, form: Any, field: Any) -> tuple[dict[str, Any], int]:
        _require(field("subject_token"), "subject_token")
        if field("subject_token_type") not in (ACCESS_TOKEN_TYPE_URN, JWT_TOKEN_TYPE_URN):
            raise IdpError("invalid_request", f"subject_token_type must be {ACCESS_TOKEN_TYPE_URN}",
                           reason="bad-subject-token-type")
        if field("requested_token_type") not in ("", SSH_TOKEN_TYPE_URN):
            raise IdpError("invalid_request", f"requested_token_type must be {SSH_TOKEN_TYPE_URN}",
                           reason="bad-requested-token-type")
        if field("actor_token"):
            raise IdpError("invalid_request", "actor tokens are not supported", reason="actor-token")
        # `via`: delegation (docs/delegation.md) — the user's client mints a token for a
        # session on another peer; checked and recorded in the SSH token's `via` claim.
        via = field("via") if "via" in form else None
        if len(form.getall("via", [])) > 1:
            raise IdpError("invalid_request", "via: name one peer", reason="via-repeated")
        audiences = [str(a) for a in form.getall("audience", [])]
        _, tokens_out = await self.issuer.exchange_for_ssh(field("subject_token"), audiences, via)
        if len(tokens_out) == 1:
            only = tokens_out[0]
            if "error" in only:
                status = 400 if only["error"] == "invalid_target" else 403
                raise IdpError(only["error"], only["error_description"], status=status,
                               reason=_COUNTED)
            return {"access_token": only["access_token"], "issued_token_type": SSH_TOKEN_TYPE_URN,
                    "token_type": "N_A", "expires_in": only["expires_in"], "tokens": tokens_out}, 200
        return {"tokens": tokens_out}, 200

    # --- verification page ----------------------------------------------------------------

    def _csrf_cookie_name(self) -> str:
        return page.CSRF_COOKIE_SECURE if self.issuer.issuer_url.startswith("https://") else page.CSRF_COOKIE

    def _html(self, text: str, status: int = 200, csrf: str | None = None) -> web.Response:
        resp = web.Response(text=text, status=status, content_type="text/html", headers=page.SECURITY_HEADERS)
        if csrf is not None:
            resp.set_cookie(self._csrf_cookie_name(), csrf, path="/", httponly=True, samesite="Strict",
                            secure=self.issuer.issuer_url.startswith("https://"), max_age=3600)
        return resp

    def _csrf_for(self, request: web.Request) -> str:
        existing = request.cookies.get(self._csrf_cookie_name(), "")
        return existing if 20 <= len(existing) <= 64 else page.new_csrf_token()

    async def device_page(self, request: web.Request) -> web.Response:
        csrf = self._csrf_for(request)
        code = request.query.get("user_code", "")[:16]
        return self._html(page.render_form(csrf=csrf, user_code=code), csrf=csrf)

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # old browsers and non-browser clients; the CSRF token still applies
        allowed = {_origin(self.issuer.issuer_url), f"{request.scheme}://{request.host}".lower()}
        return origin.lower() in allowed

    async def device_submit(self, request: web.Request) -> web.Response:
        form = await request.post()
        field = lambda name: str(form.get(name, "") or "")  # noqa: E731
        email, raw_code = field("email").strip()[:320], field("user_code")[:32]
        csrf = self._csrf_for(request)

        def again(error: str, status: int) -> web.Response:
            return self._html(page.render_form(csrf=csrf, user_code=raw_code, email=email, error=error),
                              status=status, csrf=csrf)

        if not self._same_origin(request) or not page.csrf_matches(
            request.cookies.get(self._csrf_cookie_name()), field(page.CSRF_FIELD)
        ):
            self.issuer.metrics.refused("device_verification", "csrf")
            event(log, "idp.device_page_refused", reason="csrf", ip=_client_ip(request))
            return again("This form expired or came from another site. Please try again.", 403)
        client = _client_ip(request)
        decision = self.login_ip.hit(client)
        if decision.allowed:
            decision = self.sign_in.begin(email, client)
        if not decision.allowed:
            reason = decision.reason or "rate-limited"
            self.issuer.metrics.refused("device_verification", reason)
            event(log, "idp.device_page_refused", reason=reason, ip=client)
            resp = again(_SIGN_IN_WAIT.get(reason, _SIGN_IN_WAIT[""]).format(decision.retry_after_header), 429)
            resp.headers["Retry-After"] = decision.retry_after_header
            return resp
        try:
            return await self._sign_in_and_decide(field, email, raw_code, client, again)
        finally:
            self.sign_in.release(email, client)

    async def _sign_in_and_decide(self, field: Any, email: str, raw_code: str, client: str,
                                  again: Callable[[str, int], web.Response]) -> web.Response:
        action = field("action")
        if action not in ("approve", "deny"):
            return again("Choose Approve or Deny.", 400)
        code = normalize_user_code(raw_code)
        if code is None:
            self.issuer.metrics.refused("device_verification", "bad-user-code")
            return again("That code does not look right: it has 8 letters, like BCDF-GHJK.", 400)
        try:
            identity = await self.issuer.approve_device(code, email, field("password"), action == "approve")
        except IdpError as exc:
            self.issuer.metrics.refused("device_verification", exc.reason)
            event(log, "idp.device_page_refused", reason=exc.reason, ip=client)
            if exc.reason != BAD_PASSWORD:  # approve_device checks the password first: it was right
                self.sign_in.succeeded(email, client)
                return again(exc.description[:1].upper() + exc.description[1:] + ".", exc.status)
            wait = self.sign_in.failed(email, client)
            resp = again(f"Wrong email or password (next try in {wait.retry_after_header} s).", exc.status)
            resp.headers["Retry-After"] = wait.retry_after_header
            return resp
        self.sign_in.succeeded(email, client)
        return self._html(page.render_result(approved=action == "approve", email=identity.email))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _require(value: str, name: str) -> None:
    if not value:
        raise IdpError("invalid_request", f"missing {name}", reason=f"missing-{name.replace('_', '-')}")


def _client_auth(request: web.Request, form_id: str, form_secret: str) -> tuple[str, str]:
    """client_secret_basic (RFC 6749 §2.3.1, form-urlencoded parts) or client_secret_post."""
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise IdpError("invalid_client", "malformed Basic credentials", status=401,
                           reason="bad-client-auth") from exc
        cid, sep, secret = decoded.partition(":")
        if not sep:
            raise IdpError("invalid_client", "malformed Basic credentials", status=401, reason="bad-client-auth")
        return unquote_plus(cid), unquote_plus(secret)
    if not form_id or not form_secret:
        raise IdpError("invalid_client", "client_id and client_secret are required", status=401,
                       reason="bad-client-auth")
    return form_id, form_secret
