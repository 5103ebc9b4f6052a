"""Logging in, and turning a login into per-peer SSH tokens.

Three layers, outside in:
- `login_device` / `login_service` / `logout`: the OAuth device authorization grant
  (RFC 8628) or the client-credentials grant against management's issuer; the result
  (refresh token or client secret, endpoints, management URL) is stored 0600 in the
  config dir (`client/state.py`).
- `Session.access_token()`: the login JWT, cached until shortly before `exp`; refreshed
  under a lock because management rotates refresh tokens (the old one stops working, so
  two processes refreshing at once would log each other out).
- `Session.ssh_token(peer)`: RFC 8693 token exchange for an SSH token whose audience is
  that peer. Cached until shortly before its `exp`, bounded by `--ssh-jwt-cache-ttl`
  (0 = never cache). Peers refuse a token whose `jti` they have seen, so a token that
  was accepted is dropped from the cache (`consume`); the cache therefore holds tokens
  fetched ahead of use (prefetch, fan-out) and never replays one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from . import http, state
from .errors import AccessDenied, ClientError, ManagementError, NotLoggedIn

CLIENT_ID = "meshssh"
SCOPE = "openid email profile offline_access"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SSH_TOKEN_TYPE = "urn:meshsshd:token-type:ssh"
ACCESS_MARGIN = 60.0  # refresh the login JWT this long before it expires
SSH_MARGIN = 15.0  # never hand out a cached SSH token with less life than this


# ---------------------------------------------------------------- pure helpers

def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: only for display and cache lifetimes.

    The client never trusts these claims for a security decision; peers verify.
    """
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        doc = json.loads(base64.urlsafe_b64decode(payload))
        return doc if isinstance(doc, dict) else {}
    except (IndexError, ValueError):
        return {}


def token_expiry(token: str, expires_in: Any, now: float) -> float:
    exp = jwt_claims(token).get("exp")
    if isinstance(exp, (int, float)):
        return float(exp)
    try:
        return now + float(expires_in)
    except (TypeError, ValueError):
        return now + 60.0


@dataclass
class TokenCache:
    """Per-peer SSH tokens with their expiry; a plain value so it can be unit-tested.

    ttl None: keep until SSH_MARGIN before exp. ttl 0: cache nothing. ttl N: also drop
    N seconds after the token was fetched (NetBird's --ssh-jwt-cache-ttl).
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, key: str, now: float, ttl: float | None) -> str | None:
        e = self.entries.get(key)
        if e is None or ttl == 0:
            return None
        if e["exp"] - now <= SSH_MARGIN:
            return None
        if ttl is not None and now - e["stored"] >= ttl:
            return None
        return e["token"]

    def put(self, key: str, token: str, exp: float, now: float, ttl: float | None) -> None:
        if ttl == 0:
            return
        self.entries[key] = {"token": token, "exp": exp, "stored": now}

    def pop(self, key: str) -> None:
        self.entries.pop(key, None)

    def prune(self, now: float) -> None:
        for k in [k for k, e in self.entries.items() if e["exp"] - now <= SSH_MARGIN]:
            del self.entries[k]


def parse_ttl(value: str | float | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        ttl = float(value)
    except ValueError as exc:
        raise ClientError(f"--ssh-jwt-cache-ttl: {value!r} is not a number of seconds") from exc
    if ttl < 0:
        raise ClientError("--ssh-jwt-cache-ttl must be 0 or more seconds")
    return ttl


@dataclass
class PollStep:
    """What to do after one device-code poll: done (tokens), wait (new interval), or fail."""

    tokens: dict[str, Any] | None = None
    interval: float | None = None
    error: str | None = None


def device_poll_step(status: int, doc: Any, interval: float) -> PollStep:
    """RFC 8628 §3.5: pending keeps the interval, slow_down adds 5 s, others end."""
    if status == 200 and isinstance(doc, dict) and doc.get("access_token"):
        return PollStep(tokens=doc)
    code, msg = http.error_text(doc, f"HTTP {status}")
    if code == "authorization_pending":
        return PollStep(interval=interval)
    if code == "slow_down":
        return PollStep(interval=interval + 5.0)
    if code == "expired_token":
        return PollStep(error="the code expired before it was approved — run `meshssh login` again")
    if code == "access_denied":
        return PollStep(error="the login was denied in the browser")
    return PollStep(error=f"login failed: {msg}")


# ---------------------------------------------------------------- stored login

@dataclass
class Login:
    management_url: str
    token_endpoint: str
    client_id: str = CLIENT_ID
    refresh_token: str = ""
    client_secret: str = ""  # service users (client-credentials grant)
    identity: str = ""

    @classmethod
    def load(cls) -> Login:
        doc = state.read_json(state.LOGIN_FILE)
        if not isinstance(doc, dict) or not doc.get("management_url") or not doc.get("token_endpoint"):
            raise NotLoggedIn()
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self) -> None:
        state.ensure_dir()
        state.write_json(state.LOGIN_FILE, asdict(self))


def discover(management_url: str) -> dict[str, Any]:
    url = http.check_url(management_url)
    status, doc = http.get_json(f"{url}/.well-known/openid-configuration")
    if status != 200 or not isinstance(doc, dict) or "token_endpoint" not in doc:
        raise ManagementError(f"{url} does not look like a meshmgmt server (no OIDC discovery document)")
    return doc


def _browser_available() -> bool:
    if os.environ.get("MESHSSH_NO_BROWSER"):
        return False
    if sys.platform == "darwin" or os.name == "nt":
        return True
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return any(shutil.which(b) for b in ("xdg-open", "sensible-browser", "x-www-browser", "firefox"))


def login_device(
    management_url: str,
    no_browser: bool = False,
    out: TextIO = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> Login:
    """Run the device authorization grant; print the URL and code; poll until done."""
    url = http.check_url(management_url)
    conf = discover(url)
    device_ep = conf.get("device_authorization_endpoint")
    if not device_ep:
        raise ManagementError(f"{url} offers no device authorization endpoint")
    status, doc = http.post_form(device_ep, [("client_id", CLIENT_ID), ("scope", SCOPE)])
    if status != 200 or not isinstance(doc, dict) or "device_code" not in doc:
        code, msg = http.error_text(doc, f"HTTP {status}")
        raise ManagementError(f"could not start the login: {msg}", code, status)
    verify = doc.get("verification_uri_complete") or doc.get("verification_uri")
    print(f"To log in, open {doc.get('verification_uri', verify)}\n"
          f"and enter the code {doc.get('user_code')}", file=out)
    if doc.get("verification_uri_complete"):
        print(f"(or open {doc['verification_uri_complete']} directly)", file=out)
    out.flush()
    if not no_browser and _browser_available():
        import webbrowser

        try:
            webbrowser.open(verify)
        except Exception:  # noqa: BLE001 — a browser that fails to start is not an error
            pass
    interval = float(doc.get("interval", 5) or 5)
    deadline = time.monotonic() + float(doc.get("expires_in", 600) or 600)
    while True:
        sleep(interval)
        if time.monotonic() > deadline:
            raise ClientError("the code expired before it was approved — run `meshssh login` again")
        status, resp = http.post_form(
            conf["token_endpoint"],
            [("grant_type", DEVICE_GRANT), ("device_code", doc["device_code"]), ("client_id", CLIENT_ID)],
        )
        step = device_poll_step(status, resp, interval)
        if step.error:
            raise ClientError(step.error)
        if step.tokens is not None:
            break
        interval = step.interval or interval
    tokens = step.tokens
    if not tokens.get("refresh_token"):
        raise ManagementError("management returned no refresh token; cannot stay logged in")
    login = Login(
        management_url=url, token_endpoint=conf["token_endpoint"], client_id=CLIENT_ID,
        refresh_token=tokens["refresh_token"], identity=_identity(tokens["access_token"]),
    )
    _store_new_login(login, tokens)
    return login


def login_service(management_url: str, client_id: str, client_secret: str) -> Login:
    url = http.check_url(management_url)
    conf = discover(url)
    login = Login(management_url=url, token_endpoint=conf["token_endpoint"],
                  client_id=client_id, client_secret=client_secret)
    tokens = _grant(login, [("grant_type", "client_credentials"), ("client_id", client_id),
                            ("client_secret", client_secret)])
    login.identity = _identity(tokens["access_token"])
    _store_new_login(login, tokens)
    return login


def logout() -> bool:
    had = False
    for name in (state.LOGIN_FILE, state.ACCESS_FILE, state.SSH_TOKENS_FILE, state.PEERS_FILE):
        had = state.remove(name) or had
    return had


def _identity(access_token: str) -> str:
    c = jwt_claims(access_token)
    return str(c.get("email") or c.get("preferred_username") or c.get("sub") or "")


def _store_new_login(login: Login, tokens: dict[str, Any]) -> None:
    state.ensure_dir()
    for name in (state.ACCESS_FILE, state.SSH_TOKENS_FILE, state.PEERS_FILE):
        state.remove(name)
    login.save()
    now = time.time()
    state.write_json(state.ACCESS_FILE, {
        "management_url": login.management_url,
        "token": tokens["access_token"],
        "exp": token_expiry(tokens["access_token"], tokens.get("expires_in"), now),
    })


def _grant(login: Login, fields: list[tuple[str, str]]) -> dict[str, Any]:
    status, doc = http.post_form(login.token_endpoint, fields)
    if status == 200 and isinstance(doc, dict) and doc.get("access_token"):
        return doc
    code, msg = http.error_text(doc, f"HTTP {status}")
    if code in ("invalid_grant", "invalid_client", "unauthorized_client"):
        # meshmgmt's refusal of a refresh token says what to do (docs/idp.md); others do not
        described = code == "invalid_grant" and isinstance(doc, dict) and bool(doc.get("error_description"))
        raise NotLoggedIn(f"your login is no longer valid: {msg}", names_fix=described)
    raise ManagementError(f"management refused the token request: {msg}", code, status)


# ---------------------------------------------------------------- the session

@dataclass
class ExchangeResult:
    token: str = ""
    exp: float = 0.0
    error: str = ""
    error_code: str = ""
    cached: bool = False


class Session:
    """One logged-in user talking to management; cheap to build (reads two small files)."""

    def __init__(self, ttl: float | None = None, no_cache: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.login = Login.load()
        self.ttl = ttl
        self.no_cache = no_cache
        self.clock = clock

    @property
    def identity(self) -> str:
        return self.login.identity or "you"

    # -- access token (login JWT)
    def access_token(self, force: bool = False) -> str:
        if not force:
            cached = state.read_json(state.ACCESS_FILE)
            if self._access_ok(cached):
                return cached["token"]
        with state.locked():
            # Another meshssh may have refreshed (and rotated) while we waited.
            self.login = Login.load()
            cached = state.read_json(state.ACCESS_FILE)
            if not force and self._access_ok(cached):
                return cached["token"]
            if self.login.client_secret:
                tokens = _grant(self.login, [
                    ("grant_type", "client_credentials"), ("client_id", self.login.client_id),
                    ("client_secret", self.login.client_secret)])
            elif self.login.refresh_token:
                tokens = _grant(self.login, [
                    ("grant_type", "refresh_token"), ("refresh_token", self.login.refresh_token),
                    ("client_id", self.login.client_id)])
                if tokens.get("refresh_token"):
                    self.login.refresh_token = tokens["refresh_token"]
                    self.login.save()
            else:
                raise NotLoggedIn()
            now = self.clock()
            state.write_json(state.ACCESS_FILE, {
                "management_url": self.login.management_url,
                "token": tokens["access_token"],
                "exp": token_expiry(tokens["access_token"], tokens.get("expires_in"), now),
            })
            return tokens["access_token"]

    def _access_ok(self, cached: Any) -> bool:
        return (isinstance(cached, dict) and cached.get("management_url") == self.login.management_url
                and isinstance(cached.get("token"), str)
                and float(cached.get("exp", 0)) - self.clock() > ACCESS_MARGIN)

    def get_api(self, path: str) -> Any:
        """GET a user endpoint; one forced refresh if the access token was refused."""
        return self.call_api(path)

    def call_api(self, path: str, body: Any = None) -> Any:
        """GET a user endpoint, or POST `body` to it as JSON; one forced refresh if the
        access token was refused."""
        url = f"{self.login.management_url}{path}"

        def send(token: str) -> tuple[int, Any]:
            return http.get_json(url, token) if body is None else http.post_json(url, body, token)

        status, doc = send(self.access_token())
        if status == 401:
            status, doc = send(self.access_token(force=True))
        if status == 401:
            raise NotLoggedIn("your login is no longer valid")
        if status != 200:
            code, msg = http.error_text(doc, f"HTTP {status}")
            raise ManagementError(f"management: {msg}", code, status)
        return doc

    # -- SSH tokens
    def _cache(self) -> TokenCache:
        doc = state.read_json(state.SSH_TOKENS_FILE)
        entries = doc.get("entries") if isinstance(doc, dict) and doc.get(
            "management_url") == self.login.management_url else None
        return TokenCache(entries if isinstance(entries, dict) else {})

    def _save_cache(self, cache: TokenCache) -> None:
        cache.prune(self.clock())
        state.write_json(state.SSH_TOKENS_FILE, {
            "management_url": self.login.management_url, "entries": cache.entries})

    def ssh_tokens(self, peers: Iterable[tuple[str, str]],
                   no_cache: bool = False) -> dict[str, ExchangeResult]:
        """Tokens for (peer_id, display name) pairs, from the cache or one exchange."""
        peers = list(peers)
        no_cache = no_cache or self.no_cache
        now = self.clock()
        results: dict[str, ExchangeResult] = {}
        cache = self._cache()
        missing: list[tuple[str, str]] = []
        for pid, name in peers:
            tok = None if no_cache else cache.get(pid, now, self.ttl)
            if tok:
                results[pid] = ExchangeResult(token=tok, exp=cache.entries[pid]["exp"], cached=True)
            else:
                missing.append((pid, name))
        if not missing:
            return results
        fetched = self._exchange(missing)
        now = self.clock()
        with state.locked():
            cache = self._cache()
            for pid, res in fetched.items():
                if res.token:
                    cache.put(pid, res.token, res.exp, now, self.ttl)
            self._save_cache(cache)
        results.update(fetched)
        return results

    def ssh_token(self, peer_id: str, name: str, no_cache: bool = False) -> ExchangeResult:
        res = self.ssh_tokens([(peer_id, name)], no_cache=no_cache)[peer_id]
        if res.error:
            raise AccessDenied(res.error)
        return res

    def consume(self, peer_id: str, token: str) -> None:
        """A peer accepted `token`, or checked it and refused the login: it will refuse
        it from now on (jti), so forget it."""
        with state.locked():
            cache = self._cache()
            if cache.entries.get(peer_id, {}).get("token") == token:
                cache.pop(peer_id)
                self._save_cache(cache)

    def _exchange(self, peers: list[tuple[str, str]]) -> dict[str, ExchangeResult]:
        fields = [
            ("grant_type", EXCHANGE_GRANT),
            ("subject_token", self.access_token()),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", SSH_TOKEN_TYPE),
            ("client_id", self.login.client_id),
        ] + [("audience", pid) for pid, _ in peers]
        status, doc = http.post_form(self.login.token_endpoint, fields)
        if status == 401 or (isinstance(doc, dict) and doc.get("error") == "invalid_token"):
            fields[1] = ("subject_token", self.access_token(force=True))
            status, doc = http.post_form(self.login.token_endpoint, fields)
        return parse_exchange(status, doc, peers, self.identity, self.clock())


def parse_exchange(status: int, doc: Any, peers: list[tuple[str, str]], identity: str,
                   now: float) -> dict[str, ExchangeResult]:
    """Map a token-exchange response to one result per asked peer id."""
    names = dict(peers)
    out: dict[str, ExchangeResult] = {}
    if isinstance(doc, dict) and isinstance(doc.get("tokens"), list):
        for item in doc["tokens"]:
            if not isinstance(item, dict):
                continue
            pid = str(item.get("peer", ""))
            if pid not in names:
                # Management may answer with the name we asked for or the id.
                pid = next((p for p, n in peers if n == item.get("name") or p == item.get("name")), pid)
            if pid not in names:
                continue
            if item.get("access_token"):
                tok = item["access_token"]
                out[pid] = ExchangeResult(token=tok, exp=token_expiry(tok, item.get("expires_in"), now))
            else:
                out[pid] = _refusal(item, names[pid], identity)
    if status == 200 and len(peers) == 1 and peers[0][0] not in out and isinstance(doc, dict) \
            and doc.get("access_token"):
        tok = doc["access_token"]
        out[peers[0][0]] = ExchangeResult(token=tok, exp=token_expiry(tok, doc.get("expires_in"), now))
    for pid, name in peers:
        if pid in out:
            continue
        if status == 200:
            out[pid] = ExchangeResult(error=f"management returned no SSH token for {name}")
        else:
            out[pid] = _refusal(doc if isinstance(doc, dict) else {}, name, identity, status)
    return out


def _refusal(doc: dict[str, Any], name: str, identity: str, status: int = 400) -> ExchangeResult:
    code = str(doc.get("error", "") or "")
    desc = str(doc.get("error_description") or doc.get("message") or "")
    if not desc:
        if code in ("access_denied", "invalid_target", ""):
            desc = f"no policy lets {identity} reach {name}"
        else:
            desc = f"management refused an SSH token for {name}: {code or f'HTTP {status}'}"
    return ExchangeResult(error=desc, error_code=code)
