"""The issuer's HTTP flows on a real SQLite store, in-process (aiohttp TestServer).

The device flow is driven the way a browser does it: GET /device, parse the form, POST
the fields back with the cookie. The clock is injected, so expiry and slow_down are
tested without sleeping. Subprocess tests against `meshmgmt serve` are in
tests/integration/test_idp_serve.py.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshmgmt.idp import IssuerSettings, setup_idp
from meshmgmt.store import Group, Peer, Policy, Store, User, hash_password, hash_secret, sqlite_url
from tests.support import free_port

DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"
SSH = "urn:meshsshd:token-type:ssh"
PASSWORD = "correct horse battery staple"
SECRET = bytes(range(32))  # the issuer's key-encryption secret in these tests


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class FormParser(HTMLParser):
    """Collects a page's <form> inputs as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method: str | None = None
        self.fields: dict[str, str] = {}
        self.buttons: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action, self.method = a.get("action"), a.get("method")
        elif tag == "input" and "name" in a:
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "button" and "name" in a:
            self.buttons.append((a["name"], a.get("value", "")))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_form(html: str) -> FormParser:
    p = FormParser()
    p.feed(html)
    return p


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


@dataclass
class Mesh:
    client: TestClient
    issuer: Any
    clock: Clock
    store: Store
    url: str
    ids: dict[str, str] = field(default_factory=dict)
    service_secret: str = "svc-secret-" + "x" * 30
    changed: list[int] = field(default_factory=list)

    async def form(self, path: str, data: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(path, data=data, **kw)
        return resp.status, await resp.json()

    async def device_login(self, email: str = "alice@example.com", password: str = PASSWORD,
                           action: str = "approve", scope: str = "openid offline_access") -> tuple[str, str]:
        """Start the flow and approve it in the 'browser'; returns (device_code, user_code)."""
        status, start = await self.form("/oauth/device/code", {"client_id": "meshssh", "scope": scope})
        assert status == 200, start
        page = await self.client.get("/device", params={"user_code": start["user_code"]})
        assert page.status == 200
        form = parse_form(await page.text())
        assert form.method == "post" and form.fields["user_code"] == start["user_code"]
        fields = dict(form.fields, email=email, password=password, action=action)
        result = await self.client.post("/" + form.action if not form.action.startswith("/") else form.action,
                                        data=fields)
        assert result.status == 200, await result.text()
        return start["device_code"], start["user_code"]

    async def login(self, email: str = "alice@example.com") -> dict[str, Any]:
        device_code, _ = await self.device_login(email)
        status, body = await self.form("/oauth/token", {"grant_type": DEVICE, "device_code": device_code,
                                                         "client_id": "meshssh"})
        assert status == 200, body
        return body

    async def exchange(self, access_token: str, *audiences: str, **extra: str) -> tuple[int, dict[str, Any]]:
        base = {"grant_type": EXCHANGE, "subject_token": access_token, "subject_token_type": AT,
                "requested_token_type": SSH, **extra}
        data = list(base.items()) + [("audience", a) for a in audiences]
        return await self.form("/oauth/token", data)


async def populate(store: Store, secret: str) -> dict[str, str]:
    """alice and dave in group devs (with alice's laptop); web-1 in servers (ssh rule);
    db-1 in dbs (only a tcp/5432 rule); carol in no group; bob blocked; a service user."""
    pw = hash_password(PASSWORD)
    async with store.session() as s:
        alice = User(email="alice@example.com", name="Alice", password_hash=pw)
        carol = User(email="carol@example.com", name="Carol", password_hash=pw)
        bob = User(email="bob@example.com", name="Bob", password_hash=pw, blocked=True)
        svc = User(email="ci@service.local", name="CI", is_service=True, client_id="svc-ci",
                   client_secret_hash=hash_secret(secret))
        def peer(name: str, ip: str, ssh: bool) -> Peer:
            return Peer(name=name, mesh_ip=ip, wg_public_key=f"wg-{name}", credential_hash=hash_secret(name),
                        flags={"allow_server_ssh": ssh}, ssh_host_key="ssh-ed25519 AAAA" + name)
        laptop, web1, db1, nossh = (peer("laptop-1", "100.64.0.10", False), peer("web-1", "100.64.0.20", True),
                                    peer("db-1", "100.64.0.30", True), peer("plain-1", "100.64.0.40", False))
        devs = Group(name="devs", peers=[laptop], users=[alice, bob, svc])
        servers = Group(name="servers", peers=[web1, nossh])
        dbs = Group(name="dbs", peers=[db1])
        s.add_all([alice, carol, bob, svc, laptop, web1, db1, nossh, devs, servers, dbs])
        s.add(Policy(name="ssh", rules=[{"sources": ["devs"], "destinations": ["servers"], "protocol": "ssh",
                                         "local_users": ["localpart", "deploy"]}]))
        s.add(Policy(name="db", rules=[{"sources": ["devs"], "destinations": ["dbs"], "protocol": "tcp",
                                        "ports": ["5432"]}]))
        await s.commit()
        return {"alice": alice.id, "carol": carol.id, "bob": bob.id, "svc": svc.id, "web-1": web1.id,
                "db-1": db1.id, "laptop-1": laptop.id}


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    clock = Clock()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = web.Application()
    issuer = setup_idp(app, store, url, IssuerSettings(key_secret=SECRET, clock=clock, login_limit=(1.0, 30)))
    server = TestServer(app, host="127.0.0.1", port=port)
    client = TestClient(server)
    await client.start_server()
    m = Mesh(client=client, issuer=issuer, clock=clock, store=store, url=url)
    m.ids = await populate(store, m.service_secret)
    issuer.on_keys_changed(lambda: m.changed.append(1))
    try:
        yield m
    finally:
        await client.close()
        await store.close()


# --- discovery and keys -----------------------------------------------------------------


async def test_discovery_and_jwks(mesh: Mesh) -> None:
    resp = await mesh.client.get("/.well-known/openid-configuration")
    doc = await resp.json()
    assert doc["issuer"] == mesh.url
    assert doc["jwks_uri"] == f"{mesh.url}/oauth/jwks"
    assert doc["token_endpoint"] == f"{mesh.url}/oauth/token"
    assert doc["device_authorization_endpoint"] == f"{mesh.url}/oauth/device/code"
    assert DEVICE in doc["grant_types_supported"] and EXCHANGE in doc["grant_types_supported"]
    jwks = await (await mesh.client.get("/oauth/jwks")).json()
    assert len(jwks["keys"]) == 1
    key = jwks["keys"][0]
    assert key["kty"] == "OKP" and key["alg"] == "EdDSA" and "d" not in key


async def test_private_keys_are_sealed_at_rest(tmp_path: Path) -> None:
    from sqlalchemy import select

    from meshmgmt.idp import KeySecretError
    from meshmgmt.idp.issuer import Issuer
    from meshmgmt.idp.models import SigningKeyRow

    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    try:
        issuer = Issuer(store, "http://x", IssuerSettings(key_secret=SECRET))
        await issuer.start()
        async with store.session() as s:
            row = (await s.execute(select(SigningKeyRow))).scalar_one()
        assert row.encrypted and row.private_key_pem.startswith("mgk1:") and "PRIVATE" not in row.private_key_pem
        # Another replica with the same secret signs and verifies with the same key.
        twin = Issuer(store, "http://x", IssuerSettings(key_secret=SECRET))
        await twin.start()
        assert twin.jwks() == issuer.jwks()
        with pytest.raises(KeySecretError, match="does not open signing key"):
            await Issuer(store, "http://x", IssuerSettings(key_secret=bytes(32))).start()
        with pytest.raises(KeySecretError, match="needs a key-encryption secret"):
            await Issuer(store, "http://x", IssuerSettings()).start()
    finally:
        await store.close()


# --- device flow ---------------------------------------------------------------------------


async def test_device_flow_end_to_end_through_the_form(mesh: Mesh) -> None:
    status, start = await mesh.form("/oauth/device/code", {"client_id": "meshssh", "scope": "openid offline_access"})
    assert status == 200
    assert re.fullmatch(r"[B-Z]{4}-[B-Z]{4}", start["user_code"])
    assert start["verification_uri"] == f"{mesh.url}/device"
    assert start["verification_uri_complete"] == f"{mesh.url}/device?user_code={start['user_code']}"
    assert start["interval"] == 5 and start["expires_in"] == 600
    poll = {"grant_type": DEVICE, "device_code": start["device_code"], "client_id": "meshssh"}

    status, body = await mesh.form("/oauth/token", poll)
    assert (status, body["error"]) == (400, "authorization_pending")
    status, body = await mesh.form("/oauth/token", poll)  # same instant: too fast
    assert (status, body["error"]) == (400, "slow_down")

    page = await mesh.client.get(start["verification_uri_complete"].removeprefix(mesh.url))
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    form = parse_form(await page.text())
    assert form.fields["user_code"] == start["user_code"]
    assert ("action", "approve") in form.buttons and ("action", "deny") in form.buttons
    fields = dict(form.fields, email="Alice@Example.com", password=PASSWORD, action="approve")
    done = await mesh.client.post("/device", data=fields)
    assert done.status == 200
    assert "Device approved" in await done.text()

    mesh.clock.now += 10
    status, tokens = await mesh.form("/oauth/token", poll)
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 900
    assert tokens["refresh_token"].startswith("mrt_")
    access = claims_of(tokens["access_token"])
    assert access["aud"] == "meshmgmt" and access["iss"] == mesh.url
    assert (access["sub"], access["email"], access["name"], access["role"]) == (
        mesh.ids["alice"], "alice@example.com", "Alice", "user")
    assert access["exp"] - access["iat"] == 900
    id_token = claims_of(tokens["id_token"])
    assert id_token["aud"] == "meshssh" and id_token["email"] == "alice@example.com"
    assert (await mesh.issuer.verify_access_token(tokens["access_token"]))["sub"] == mesh.ids["alice"]

    status, body = await mesh.form("/oauth/token", poll)  # a device code redeems once
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_device_flow_denied(mesh: Mesh) -> None:
    device_code, _ = await mesh.device_login(action="deny")
    status, body = await mesh.form("/oauth/token", {"grant_type": DEVICE, "device_code": device_code,
                                                     "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "access_denied")


async def test_device_flow_expires(mesh: Mesh) -> None:
    status, start = await mesh.form("/oauth/device/code", {"client_id": "meshssh"})
    mesh.clock.now += 601
    status, body = await mesh.form("/oauth/token", {"grant_type": DEVICE, "device_code": start["device_code"],
                                                     "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "expired_token")
    page = parse_form(await (await mesh.client.get("/device")).text())
    resp = await mesh.client.post("/device", data=dict(page.fields, user_code=start["user_code"],
                                                       email="alice@example.com", password=PASSWORD,
                                                       action="approve"))
    assert resp.status == 400
    assert "unknown, expired or already used" in await resp.text()


async def test_device_code_unknown_client_and_unknown_code(mesh: Mesh) -> None:
    status, body = await mesh.form("/oauth/device/code", {"client_id": "evil"})
    assert (status, body["error"]) == (401, "invalid_client")
    status, body = await mesh.form("/oauth/token", {"grant_type": DEVICE, "device_code": "nope",
                                                     "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    ("email", "password", "status", "message"),
    [
        pytest.param("alice@example.com", "wrong", 401, "Wrong email or password", id="wrong-password"),
        pytest.param("nobody@example.com", PASSWORD, 401, "Wrong email or password", id="unknown-user"),
        pytest.param("bob@example.com", PASSWORD, 401, "Wrong email or password", id="blocked-user"),
        pytest.param("ci@service.local", PASSWORD, 401, "Wrong email or password", id="service-user"),
    ],
)
async def test_verification_page_refuses_bad_sign_in(mesh: Mesh, email: str, password: str, status: int,
                                                     message: str) -> None:
    _, start = await mesh.form("/oauth/device/code", {"client_id": "meshssh"})
    form = parse_form(await (await mesh.client.get("/device", params={"user_code": start["user_code"]})).text())
    resp = await mesh.client.post("/device", data=dict(form.fields, email=email, password=password, action="approve"))
    assert resp.status == status
    text = await resp.text()
    assert message in text
    assert password not in text  # the password is never echoed back
    poll = {"grant_type": DEVICE, "device_code": start["device_code"], "client_id": "meshssh"}
    assert (await mesh.form("/oauth/token", poll))[1]["error"] == "authorization_pending"


async def test_verification_page_csrf(mesh: Mesh) -> None:
    _, start = await mesh.form("/oauth/device/code", {"client_id": "meshssh"})
    form = parse_form(await (await mesh.client.get("/device")).text())
    good = dict(form.fields, user_code=start["user_code"], email="alice@example.com", password=PASSWORD,
                action="approve")
    # No token in the form.
    resp = await mesh.client.post("/device", data={k: v for k, v in good.items() if k != "csrf_token"})
    assert resp.status == 403
    # Token without the cookie (another browser, or a cross-site form post).
    mesh.client.session.cookie_jar.clear()
    resp = await mesh.client.post("/device", data=good)
    assert resp.status == 403
    # Cookie and field, but posted from another origin.
    form = parse_form(await (await mesh.client.get("/device")).text())
    good.update(csrf_token=form.fields["csrf_token"])
    resp = await mesh.client.post("/device", data=good, headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    # Same origin passes.
    resp = await mesh.client.post("/device", data=good, headers={"Origin": mesh.url})
    assert resp.status == 200


async def test_verification_page_escapes_everything(mesh: Mesh) -> None:
    evil = '"><script>alert(1)</script>'
    page = await mesh.client.get("/device", params={"user_code": evil[:16]})
    html = await page.text()
    assert "<script>" not in html
    assert "&quot;&gt;&lt;script&gt;" in html
    form = parse_form(html)
    resp = await mesh.client.post("/device", data=dict(form.fields, user_code="BCDF-GHJK",
                                                       email=evil + "@x", password="x", action="approve"))
    text = await resp.text()
    assert "<script>" not in text and "&lt;script&gt;" in text


async def test_verification_page_rate_limits_sign_in(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    app = web.Application()
    setup_idp(app, store, "http://127.0.0.1", IssuerSettings(key_secret=SECRET, login_limit=(0.001, 3)))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        form = parse_form(await (await client.get("/device")).text())
        statuses = []
        for i in range(5):  # a new email each time: the per-address bucket, not the per-email backoff
            resp = await client.post("/device", data=dict(form.fields, user_code="BCDF-GHJK",
                                                           email=f"x{i}@example.com", password="guess",
                                                           action="approve"))
            statuses.append(resp.status)
        assert 429 not in statuses[:3] and statuses[3:] == [429, 429]
        assert int(resp.headers["Retry-After"]) >= 1
        assert "Too many sign-in attempts" in await resp.text()
    finally:
        await client.close()
        await store.close()


# --- refresh tokens -------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(mesh: Mesh) -> None:
    first = await mesh.login()
    r1 = first["refresh_token"]
    status, second = await mesh.form("/oauth/token", {"grant_type": "refresh_token", "refresh_token": r1,
                                                       "client_id": "meshssh"})
    assert status == 200, second
    r2 = second["refresh_token"]
    assert r2 != r1 and claims_of(second["access_token"])["sub"] == mesh.ids["alice"]
    status, third = await mesh.form("/oauth/token", {"grant_type": "refresh_token", "refresh_token": r2,
                                                      "client_id": "meshssh"})
    assert status == 200
    r3 = third["refresh_token"]
    # r1 again: someone kept a copy. Refused, and the whole family (r3 too) is revoked.
    status, body = await mesh.form("/oauth/token", {"grant_type": "refresh_token", "refresh_token": r1,
                                                     "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "already used" in body["error_description"]
    status, body = await mesh.form("/oauth/token", {"grant_type": "refresh_token", "refresh_token": r3,
                                                     "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "invalid_grant")
    # Another login (another family) is untouched.
    other = await mesh.login()
    status, _ = await mesh.form("/oauth/token", {"grant_type": "refresh_token",
                                                 "refresh_token": other["refresh_token"], "client_id": "meshssh"})
    assert status == 200


async def test_refresh_expiry_and_blocked_user(mesh: Mesh) -> None:
    tokens = await mesh.login()
    mesh.clock.now += 30 * 24 * 3600 + 1  # idle and absolute lifetime are both 30 days by default
    status, body = await mesh.form("/oauth/token", {"grant_type": "refresh_token",
                                                     "refresh_token": tokens["refresh_token"], "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "invalid_grant") and "maximum age" in body["error_description"]

    tokens = await mesh.login()
    async with mesh.store.session() as s:
        (await s.get(User, mesh.ids["alice"])).blocked = True
        await s.commit()
    status, body = await mesh.form("/oauth/token", {"grant_type": "refresh_token",
                                                     "refresh_token": tokens["refresh_token"], "client_id": "meshssh"})
    assert (status, body["error"]) == (400, "invalid_grant")


# --- client credentials ------------------------------------------------------------------------


async def test_client_credentials_for_a_service_user(mesh: Mesh) -> None:
    status, body = await mesh.form("/oauth/token", {"grant_type": "client_credentials", "client_id": "svc-ci",
                                                     "client_secret": mesh.service_secret})
    assert status == 200, body
    assert "refresh_token" not in body
    claims = claims_of(body["access_token"])
    assert claims["sub"] == mesh.ids["svc"] and claims["service"] is True and claims["aud"] == "meshmgmt"
    basic = base64.b64encode(f"svc-ci:{mesh.service_secret}".encode()).decode()
    status, body = await mesh.form("/oauth/token", {"grant_type": "client_credentials"},
                                   headers={"Authorization": f"Basic {basic}"})
    assert status == 200
    # The service user is in devs, so it may get SSH tokens for web-1 like a person.
    status, ex = await mesh.exchange(body["access_token"], "web-1")
    assert status == 200 and claims_of(ex["access_token"])["local_users"] == ["ci", "deploy"]


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [pytest.param("svc-ci", "wrong", id="wrong-secret"), pytest.param("nope", "x", id="unknown-client")],
)
async def test_client_credentials_refused(mesh: Mesh, client_id: str, secret: str) -> None:
    resp = await mesh.client.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                                        "client_secret": secret})
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    assert resp.headers["WWW-Authenticate"].startswith("Basic")


# --- token exchange ----------------------------------------------------------------------------------


async def test_exchange_one_peer(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, "web-1")
    assert status == 200, body
    assert body["issued_token_type"] == SSH and body["token_type"] == "N_A" and body["expires_in"] == 60
    claims = claims_of(body["access_token"])
    assert claims["aud"] == mesh.ids["web-1"] and claims["iss"] == mesh.url
    assert claims["sub"] == mesh.ids["alice"] and claims["email"] == "alice@example.com"
    assert claims["local_users"] == ["alice", "deploy"]
    assert claims["exp"] - claims["iat"] == 60 and claims["jti"]
    assert "via" not in claims
    assert body["tokens"][0]["peer"] == mesh.ids["web-1"] and body["tokens"][0]["name"] == "web-1"


@pytest.mark.parametrize("ref", ["web-1", "WEB-1", "web-1.mesh.internal", "web-1.mesh.internal.", "100.64.0.20", "ID"])
async def test_exchange_audience_forms(mesh: Mesh, ref: str) -> None:
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, mesh.ids["web-1"] if ref == "ID" else ref)
    assert status == 200, body
    assert claims_of(body["access_token"])["aud"] == mesh.ids["web-1"]


@pytest.mark.parametrize(
    ("who", "target", "status", "error", "message"),
    [
        pytest.param("alice@example.com", "db-1", 403, "access_denied",
                     "db-1 is not SSH-enabled: no policy grants SSH to db-1 (an admin adds one: meshmgmt policies create "
                     "NAME --source GROUP --destination <a group of db-1> --protocol ssh)", id="not-ssh-enabled"),
        pytest.param("carol@example.com", "web-1", 403, "access_denied",
                     "no policy lets carol@example.com reach web-1", id="no-policy"),
        pytest.param("alice@example.com", "db-9", 400, "invalid_target", "unknown peer db-9", id="unknown-peer"),
        pytest.param("alice@example.com", "plain-1", 403, "access_denied",
                     "plain-1 does not serve SSH (start meshsshd there with --allow-server-ssh)", id="no-ssh-server"),
    ],
)
async def test_exchange_refused_with_a_clear_reason(mesh: Mesh, who: str, target: str, status: int, error: str,
                                                    message: str) -> None:
    access = (await mesh.login(who))["access_token"]
    got, body = await mesh.exchange(access, target)
    assert (got, body["error"], body["error_description"]) == (status, error, message)


async def test_exchange_huge_audience_is_not_echoed(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, "x" * 100_000)
    assert (status, body["error"]) == (400, "invalid_target")
    assert len(body["error_description"]) < 100


async def test_exchange_fan_out(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, "web-1", "db-1", "db-9", "100.64.0.40")
    assert status == 200
    assert "access_token" not in body
    got = body["tokens"]
    assert [t.get("error") for t in got] == [None, "access_denied", "invalid_target", "access_denied"]
    assert got[1]["peer"] == "db-1" and got[1]["error_description"].startswith("db-1 is not SSH-enabled")
    assert got[2]["error_description"] == "unknown peer db-9"
    assert claims_of(got[0]["access_token"])["aud"] == mesh.ids["web-1"]
    # The same peer again, here by its mesh IP: the whole request is refused, nothing minted.
    status, body = await mesh.exchange(access, "web-1", "db-9", "100.64.0.20")
    assert (status, body["error"]) == (400, "invalid_request") and "tokens" not in body


async def test_exchange_fan_out_of_hundreds_in_one_request(mesh: Mesh) -> None:
    """`meshssh exec` over 500 peers asks once; the limit is MAX_AUDIENCES."""
    from meshmgmt.idp.issuer import MAX_AUDIENCES

    async with mesh.store.session() as s:
        fleet = [Peer(name=f"fleet-{i}", mesh_ip=f"100.64.{2 + i // 250}.{1 + i % 250}", wg_public_key=f"wg-f{i}",
                      credential_hash=hash_secret(f"f{i}"), flags={"allow_server_ssh": True},
                      ssh_host_key=f"ssh-ed25519 AAAAf{i}") for i in range(500)]
        s.add_all([*fleet, Group(name="fleet", peers=fleet)])
        s.add(Policy(name="fleet-ssh", rules=[{"sources": ["devs"], "destinations": ["fleet"], "protocol": "ssh",
                                               "local_users": ["deploy"]}]))
        await s.commit()
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, *(f"fleet-{i}" for i in range(500)))
    assert status == 200 and len(body["tokens"]) == 500
    assert all(t.get("access_token") for t in body["tokens"])
    status, body = await mesh.exchange(access, *(f"fleet-{i}" for i in range(MAX_AUDIENCES + 1)))
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        pytest.param({"subject_token_type": "urn:x"}, "subject_token_type", id="bad-subject-type"),
        pytest.param({"requested_token_type": "urn:x"}, "requested_token_type", id="bad-requested-type"),
        pytest.param({"via": "peer-x"}, "via: unknown peer peer-x", id="via-unknown-peer"),
        pytest.param({"via": ""}, "via: unknown peer", id="via-empty"),
        pytest.param({"via": "db-1"}, "via: alice@example.com may not reach db-1 by SSH", id="via-not-reachable"),
    ],
)
async def test_exchange_bad_requests(mesh: Mesh, extra: dict[str, str], reason: str) -> None:
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, "web-1", **extra)
    assert (status, body["error"]) == (400, "invalid_request") and reason in body["error_description"]


async def test_exchange_via_names_the_delegating_peer(mesh: Mesh) -> None:
    """Delegation: the token for the target carries the id of the peer it was asked through."""
    access = (await mesh.login())["access_token"]
    status, body = await mesh.exchange(access, "web-1", via="web-1.mesh.internal")
    assert status == 200, body
    claims = claims_of(body["access_token"])
    assert claims["via"] == mesh.ids["web-1"] and claims["aud"] == mesh.ids["web-1"]
    # A delegated request for a target the user may not reach is still refused per target.
    status, body = await mesh.exchange(access, "db-1", via="web-1")
    assert (status, body["error"]) == (403, "access_denied")
    # One hop is named, never a list.
    status, body = await mesh.form("/oauth/token", [
        ("grant_type", EXCHANGE), ("subject_token", access), ("subject_token_type", AT),
        ("audience", "web-1"), ("via", "web-1"), ("via", "laptop-1")])
    assert (status, body["error"]) == (400, "invalid_request") and "via" in body["error_description"]


async def test_exchange_refuses_bad_subject_tokens(mesh: Mesh) -> None:
    tokens = await mesh.login()
    ssh = (await mesh.exchange(tokens["access_token"], "web-1"))[1]["access_token"]
    for subject in (ssh, tokens["id_token"], "garbage", tokens["refresh_token"]):
        status, body = await mesh.exchange(subject, "web-1")
        assert (status, body["error"]) == (400, "invalid_request"), subject[:10]
    mesh.clock.now += 900 + 31
    status, body = await mesh.exchange(tokens["access_token"], "web-1")
    assert (status, body["error"]) == (400, "invalid_request") and "expired" in body["error_description"]


async def test_exchange_refused_once_the_user_is_blocked(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    async with mesh.store.session() as s:
        (await s.get(User, mesh.ids["alice"])).blocked = True
        await s.commit()
    status, body = await mesh.exchange(access, "web-1")
    assert (status, body["error"]) == (400, "invalid_request") and "blocked" in body["error_description"]


# --- rotation, metrics -----------------------------------------------------------------------------------


async def test_rotation_overlap_end_to_end(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    old_kid = jwt.get_unverified_header(access)["kid"]
    await mesh.issuer.rotate_keys()
    assert mesh.changed == [1]
    jwks = await (await mesh.client.get("/oauth/jwks")).json()
    kids = [k["kid"] for k in jwks["keys"]]
    assert len(kids) == 2 and kids[1] == old_kid
    # The old access token still works during the overlap; new tokens use the new key.
    status, body = await mesh.exchange(access, "web-1")
    assert status == 200
    assert jwt.get_unverified_header(body["access_token"])["kid"] == kids[0]
    # After the overlap, maintenance prunes the old key and tells the listeners.
    mesh.clock.now += 3600 + 1
    await mesh.issuer.maintain()
    assert [k["kid"] for k in mesh.issuer.jwks()["keys"]] == [kids[0]]
    assert mesh.changed == [1, 1]


async def test_metrics_count_grants_and_refusals(mesh: Mesh) -> None:
    access = (await mesh.login())["access_token"]
    await mesh.exchange(access, "web-1", "db-9")
    await mesh.form("/oauth/token", {"grant_type": "client_credentials", "client_id": "svc-ci", "client_secret": "no"})
    text = mesh.issuer.metrics.render()
    assert 'meshmgmt_token_grants_total{grant="device_code"} 1' in text
    assert 'meshmgmt_token_grants_total{grant="token_exchange"} 1' in text
    assert 'meshmgmt_token_refusals_total{grant="token_exchange",reason="unknown-peer"} 1' in text
    assert 'meshmgmt_token_refusals_total{grant="client_credentials",reason="bad-client-secret"} 1' in text


async def test_logs_never_contain_tokens_or_passwords(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    tokens = await mesh.login()
    _, ex = await mesh.exchange(tokens["access_token"], "web-1")
    await mesh.form("/oauth/token", {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                                     "client_id": "meshssh"})
    from meshsshd.logs import JSONFormatter

    fmt = JSONFormatter()
    text = "\n".join(fmt.format(r) for r in caplog.records)
    assert "idp.ssh_token" in text and "idp.login" in text
    for secret in (PASSWORD, tokens["access_token"], tokens["refresh_token"], ex["access_token"],
                   tokens["access_token"].split(".")[2]):
        assert secret not in text


async def test_two_replicas_share_keys_and_follow_a_rotation(tmp_path: Path) -> None:
    """Replica B learns A's new key from the store: at once for a token with an unknown
    kid, and through reload_keys (the store change feed) for its JWKS."""
    from meshmgmt.idp.issuer import Issuer
    from meshmgmt.idp.tokens import ACCESS_TOKEN_TYPE, Identity, access_claims, sign

    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    clock = Clock()
    try:
        a = Issuer(store, "http://mgmt", IssuerSettings(key_secret=SECRET, clock=clock))
        b = Issuer(store, "http://mgmt", IssuerSettings(key_secret=SECRET, clock=clock))
        await a.start()
        await b.start()
        assert a.jwks() == b.jwks()
        changed: list[str] = []
        b.on_keys_changed(lambda: changed.append("b"))
        await a.rotate_keys()
        token = sign(access_claims(Identity("u1", "a@example.com"), "http://mgmt", "meshssh", clock.now),
                     a._ring.current(), ACCESS_TOKEN_TYPE)
        assert (await b.verify_access_token(token))["sub"] == "u1"  # unknown kid → reload
        assert b.jwks() == a.jwks() and len(b.jwks()["keys"]) == 2
        assert changed == ["b"]
        assert await b.reload_keys() is False  # nothing new
    finally:
        await store.close()


async def test_automatic_rotation_and_pruning(tmp_path: Path) -> None:
    from meshmgmt.idp.issuer import Issuer

    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    clock = Clock()
    try:
        issuer = Issuer(store, "http://mgmt", IssuerSettings(key_secret=SECRET, clock=clock, key_rotation_interval=86400))
        await issuer.start()
        first = issuer.jwks()["keys"][0]["kid"]
        await issuer.maintain()
        assert [k["kid"] for k in issuer.jwks()["keys"]] == [first]  # not due yet
        clock.now += 86400
        await issuer.maintain()
        kids = [k["kid"] for k in issuer.jwks()["keys"]]
        assert len(kids) == 2 and kids[1] == first
        assert issuer.metrics.key_rotations == 1
        clock.now += 3600
        await issuer.maintain()
        assert [k["kid"] for k in issuer.jwks()["keys"]] == [kids[0]]
        assert len((await issuer.keystore.load()).keys) == 1  # the retired key was deleted
    finally:
        await store.close()


async def test_rotation_dropping_a_leaked_key(mesh: Mesh) -> None:
    tokens = await mesh.login()
    await mesh.issuer.rotate_keys(drop_previous=True)
    assert len(mesh.issuer.jwks()["keys"]) == 1
    assert mesh.changed == [1]
    status, body = await mesh.exchange(tokens["access_token"], "web-1")
    assert (status, body["error"]) == (400, "invalid_request")
    assert "unknown or retired key" in body["error_description"]
    # The refresh token is not a JWT: it still works and yields tokens under the new key.
    status, fresh = await mesh.form("/oauth/token", {"grant_type": "refresh_token", "client_id": "meshssh",
                                                      "refresh_token": tokens["refresh_token"]})
    assert status == 200
    assert (await mesh.exchange(fresh["access_token"], "web-1"))[0] == 200


async def test_a_refresh_family_ends_at_its_absolute_lifetime_however_often_used(tmp_path: Path) -> None:
    """Idle 7 days, absolute 30: refreshing every 6 days keeps a login alive until day 30,
    not forever."""
    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    clock = Clock()
    app = web.Application()
    issuer = setup_idp(app, store, "http://127.0.0.1", IssuerSettings(
        key_secret=SECRET, clock=clock, refresh_ttl=7 * 86400, refresh_family_ttl=30 * 86400))
    client = TestClient(TestServer(app))
    await client.start_server()
    m = Mesh(client=client, issuer=issuer, clock=clock, store=store, url="http://127.0.0.1")
    try:
        await populate(store, m.service_secret)
        refresh = (await m.login())["refresh_token"]
        for _ in range(4):  # days 6, 12, 18, 24
            clock.now += 6 * 86400
            status, body = await m.form("/oauth/token", {"grant_type": "refresh_token", "client_id": "meshssh",
                                                         "refresh_token": refresh})
            assert status == 200, body
            refresh = body["refresh_token"]
        clock.now += 6 * 86400  # day 30: used six days ago, but the login is 30 days old
        status, body = await m.form("/oauth/token", {"grant_type": "refresh_token", "client_id": "meshssh",
                                                     "refresh_token": refresh})
        assert (status, body["error"]) == (400, "invalid_grant")
        assert body["error_description"] == "this login has reached its maximum age (30 days); run `meshssh login`"
        assert issuer.metrics.render().count('reason="refresh-family-expired"') == 1
        # Idle expiry still applies on its own: a new login left unused for 7 days.
        idle = (await m.login())["refresh_token"]
        clock.now += 7 * 86400
        status, body = await m.form("/oauth/token", {"grant_type": "refresh_token", "client_id": "meshssh",
                                                     "refresh_token": idle})
        assert status == 400 and body["error_description"] == "the refresh token has expired; run `meshssh login`"
    finally:
        await client.close()
        await store.close()
