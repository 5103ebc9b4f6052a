"""The embedded issuer inside a real `meshmgmt serve` process (SQLite and PostgreSQL).

An admin builds the mesh over the REST API (users, a service user, a setup key, three
registered peers, groups, policies); then a "browser" approves a device login on the
HTML verification page, the client polls for tokens, trades them for per-peer SSH
tokens and a service user logs in with client credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tests.support import Proc

from meshsshd.peerproof import prove, public_key_b64

from .mgmtkit import Mgmt, host_key

DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"
SSH = "urn:meshsshd:token-type:ssh"
PASSWORD = "alice-has-a-long-password"


@dataclass
class Server:
    url: str
    admin_token: str
    proc: Proc
    data: dict[str, Any]


@pytest.fixture(scope="module")
def server(mgmt: Mgmt) -> Server:
    """M1's `meshmgmt serve` (SQLite and PostgreSQL) with our mesh built over the admin API."""
    srv = Server(mgmt.url, mgmt.token, mgmt.proc, {})
    srv.data = asyncio.run(_build_mesh(srv))
    return srv


async def _build_mesh(server: Server) -> dict[str, Any]:
    """Everything through the admin API, as an operator would."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        async def post(path: str, doc: dict[str, Any], auth: bool = True) -> dict[str, Any]:
            async with http.post(path, json=doc, headers=None if auth else {"Authorization": ""}) as r:
                body = await r.json()
                assert r.status in (200, 201), (path, r.status, body)
                return body

        for email in ("alice@example.com", "carol@example.com"):
            await post("/api/users", {"email": email, "name": email.split("@")[0].title(), "password": PASSWORD})
        svc = await post("/api/users", {"email": "ci@example.com", "name": "CI", "service": True})
        out["svc"] = (svc["client_id"], svc["client_secret"])
        key = (await post("/api/setup-keys", {"name": "test", "reusable": True}))["key"]
        for name, ssh in (("laptop-1", False), ("web-1", True), ("db-1", True)):
            wg = X25519PrivateKey.generate()
            body = {"setup_key": key, "wg_public_key": public_key_b64(wg), "ssh_host_key": host_key(),
                    "hostname": name, "flags": {"allow_server_ssh": ssh}, "version": "test", "endpoints": []}
            challenge = await post("/api/peers/challenge", {"wg_public_key": body["wg_public_key"]}, auth=False)
            reg = await post("/api/peers/register", prove(body, wg, challenge), auth=False)
            out[name] = reg
        await post("/api/groups", {"name": "devs", "peers": ["laptop-1"], "users": ["alice@example.com", "ci@example.com"]})
        await post("/api/groups", {"name": "servers", "peers": ["web-1"]})
        await post("/api/groups", {"name": "dbs", "peers": ["db-1"]})
        await post("/api/policies", {"name": "ssh", "enabled": True, "rules": [
            {"sources": ["devs"], "destinations": ["servers"], "protocol": "ssh", "local_users": ["localpart"]}]})
        await post("/api/policies", {"name": "postgres", "enabled": True, "rules": [
            {"sources": ["devs"], "destinations": ["dbs"], "protocol": "tcp", "ports": ["5432"]}]})
    return out


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = a.get("action", "")
        elif tag == "input" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")


@pytest.fixture
async def browser(server: Server) -> AsyncIterator[aiohttp.ClientSession]:
    # A browser keeps cookies for an IP-address host; aiohttp needs unsafe=True for that.
    async with aiohttp.ClientSession(server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield s


@pytest.fixture
async def cli(server: Server) -> AsyncIterator[aiohttp.ClientSession]:
    """The command-line client: no cookies, form posts to the OAuth endpoints."""
    async with aiohttp.ClientSession(server.url) as s:
        yield s


async def _form_post(http: aiohttp.ClientSession, path: str, data: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(path, data=data, **kw) as r:
        return r.status, await r.json()


async def _approve_in_browser(browser: aiohttp.ClientSession, verification_uri_complete: str, email: str,
                              password: str = PASSWORD) -> tuple[int, str]:
    async with browser.get(verification_uri_complete) as page:
        assert page.status == 200
        assert page.headers["Content-Type"].startswith("text/html")
        form = _Form()
        form.feed(await page.text())
    assert form.action == "device" and form.fields["csrf_token"]
    fields = dict(form.fields, email=email, password=password, action="approve")
    async with browser.post(f"/{form.action}", data=fields) as done:
        return done.status, await done.text()


async def _login(cli: aiohttp.ClientSession, browser: aiohttp.ClientSession, email: str) -> dict[str, Any]:
    status, start = await _form_post(cli, "/oauth/device/code", {"client_id": "meshssh", "scope": "openid offline_access"})
    assert status == 200, start
    status, page = await _approve_in_browser(browser, start["verification_uri_complete"], email)
    assert status == 200 and "Device approved" in page, page
    status, tokens = await _form_post(cli, "/oauth/token", {"grant_type": DEVICE, "client_id": "meshssh",
                                                            "device_code": start["device_code"]})
    assert status == 200, tokens
    return tokens


async def _exchange(cli: aiohttp.ClientSession, access: str, *audiences: str) -> tuple[int, dict[str, Any]]:
    data = [("grant_type", EXCHANGE), ("subject_token", access), ("subject_token_type", AT),
            ("requested_token_type", SSH)] + [("audience", a) for a in audiences]
    return await _form_post(cli, "/oauth/token", data)


async def test_discovery_points_at_this_server(server: Server, cli: aiohttp.ClientSession) -> None:
    async with cli.get("/.well-known/openid-configuration") as r:
        doc = await r.json()
    assert doc["issuer"] == server.url
    async with cli.get(doc["jwks_uri"].removeprefix(server.url)) as r:
        jwks = await r.json()
    assert jwks["keys"] and all("d" not in k for k in jwks["keys"])


async def test_device_flow_end_to_end(server: Server, cli: aiohttp.ClientSession, browser: aiohttp.ClientSession) -> None:
    status, start = await _form_post(cli, "/oauth/device/code", {"client_id": "meshssh", "scope": "openid"})
    assert status == 200
    poll = {"grant_type": DEVICE, "client_id": "meshssh", "device_code": start["device_code"]}
    status, body = await _form_post(cli, "/oauth/token", poll)
    assert (status, body["error"]) == (400, "authorization_pending")
    status, body = await _form_post(cli, "/oauth/token", poll)
    assert (status, body["error"]) == (400, "slow_down")

    status, page = await _approve_in_browser(browser, start["verification_uri_complete"], "alice@example.com", "wrong")
    assert status == 401 and "Wrong email or password (next try in 1 s)" in page
    await asyncio.sleep(1.1)  # a failure makes this client wait before the next try for this email
    status, page = await _approve_in_browser(browser, start["verification_uri_complete"], "alice@example.com")
    assert status == 200 and "Device approved" in page

    # Approved: the next poll gets the tokens (an approved code is issued without waiting).
    status, tokens = await _form_post(cli, "/oauth/token", poll)
    assert status == 200, tokens
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert (claims["aud"], claims["email"], claims["iss"]) == ("meshmgmt", "alice@example.com", server.url)
    assert tokens["refresh_token"]

    # The access token works on the management API (M1's user endpoints).
    async with cli.get("/api/me/peers", headers={"Authorization": f"Bearer {tokens['access_token']}"}) as r:
        assert r.status == 200
        names = [p["name"] for p in (await r.json())["peers"]]
    assert names == ["web-1"]

    # Refresh rotates; the old refresh token is then dead.
    refresh = {"grant_type": "refresh_token", "client_id": "meshssh", "refresh_token": tokens["refresh_token"]}
    status, again = await _form_post(cli, "/oauth/token", refresh)
    assert status == 200 and again["refresh_token"] != tokens["refresh_token"]
    status, body = await _form_post(cli, "/oauth/token", refresh)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_token_exchange_allowed_and_refused(server: Server, cli: aiohttp.ClientSession,
                                                  browser: aiohttp.ClientSession) -> None:
    alice = (await _login(cli, browser, "alice@example.com"))["access_token"]
    status, body = await _exchange(cli, alice, "web-1")
    assert status == 200, body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == server.data["web-1"]["peer_id"]
    assert claims["local_users"] == ["alice"] and claims["exp"] - claims["iat"] == 60

    status, body = await _exchange(cli, alice, "db-1")
    assert status == 403 and body["error_description"].startswith("db-1 is not SSH-enabled: no policy grants SSH to db-1")
    status, body = await _exchange(cli, alice, "db-9")
    assert (status, body["error_description"]) == (400, "unknown peer db-9")
    carol = (await _login(cli, browser, "carol@example.com"))["access_token"]
    status, body = await _exchange(cli, carol, "web-1")
    assert (status, body["error_description"]) == (403, "no policy lets carol@example.com reach web-1")

    # Fan-out by FQDN and mesh IP, with failures in the middle and at the end.
    status, body = await _exchange(cli, alice, "web-1.mesh.internal", "db-9", server.data["laptop-1"]["mesh_ip"])
    assert status == 200
    assert [t.get("error") for t in body["tokens"]] == [None, "invalid_target", "access_denied"]

    # The admin turns SSH on for db-1 (the toggle needs a rule admitting TCP 22: there is none).
    async with cli.put(f"/api/peers/{server.data['db-1']['peer_id']}", json={"ssh_enabled": True},
                       headers={"Authorization": f"Bearer {server.admin_token}"}) as r:
        assert r.status == 200, await r.text()
    status, body = await _exchange(cli, alice, "db-1")
    assert status == 403 and body["error"] == "access_denied"


async def test_token_exchange_refuses_a_peer_named_twice(server: Server, cli: aiohttp.ClientSession,
                                                         browser: aiohttp.ClientSession) -> None:
    """One request, one token per peer: naming web-1 again (by any of its names) refuses
    the whole request, so no request mints several live tokens for one target."""
    alice = (await _login(cli, browser, "alice@example.com"))["access_token"]
    web = server.data["web-1"]
    for again in ("web-1", "WEB-1.mesh.internal.", web["mesh_ip"], web["peer_id"]):
        status, body = await _exchange(cli, alice, "web-1", "db-9", again)
        assert (status, body.get("error")) == (400, "invalid_request"), (again, body)
        assert body["error_description"] == f"audience {again} repeats a peer already asked for; name each peer once"
        assert "tokens" not in body and "access_token" not in body
    status, body = await _exchange(cli, alice, "db-9", "db-9")  # an unknown name twice, too
    assert (status, body.get("error")) == (400, "invalid_request"), body


async def test_client_credentials_for_a_service_user(server: Server, cli: aiohttp.ClientSession) -> None:
    client_id, secret = server.data["svc"]
    status, body = await _form_post(cli, "/oauth/token", {"grant_type": "client_credentials",
                                                          "client_id": client_id, "client_secret": secret})
    assert status == 200, body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["email"] == "ci@example.com" and claims["service"] is True
    status, ex = await _exchange(cli, body["access_token"], "web-1")
    assert status == 200 and jwt.decode(ex["access_token"], options={"verify_signature": False})["local_users"] == ["ci"]
    status, body = await _form_post(cli, "/oauth/token", {"grant_type": "client_credentials",
                                                          "client_id": client_id, "client_secret": "wrong"})
    assert (status, body["error"]) == (401, "invalid_client")


async def test_metrics_and_logs(server: Server, cli: aiohttp.ClientSession) -> None:
    async with cli.get("/metrics") as r:
        text = await r.text()
    assert "meshmgmt_token_grants_total" in text and "meshmgmt_token_refusals_total" in text
    log = server.proc.output()
    assert '"event":"idp.login"' in log
    assert PASSWORD not in log and server.data["svc"][1] not in log
    assert "eyJ" not in log  # no JWT (header or payload) in any log line
