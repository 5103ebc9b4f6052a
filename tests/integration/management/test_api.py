"""The REST API against a real `meshmgmt serve` (SQLite, and PostgreSQL when root)."""

from __future__ import annotations

import asyncio
import json
import secrets

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import prove, public_key_b64

from .mgmtkit import Mgmt, call, host_key, peer_auth, register_peer, service_token


def uniq(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def setup_key(http: aiohttp.ClientSession, mgmt: Mgmt, **body) -> dict:
    _, doc = await call(http, "POST", mgmt.url + "/api/setup-keys", headers=mgmt.admin, json=body, expect=201)
    return doc


async def group(http: aiohttp.ClientSession, mgmt: Mgmt, name: str, peers=(), users=()) -> dict:
    _, doc = await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin,
                        json={"name": name, "peers": list(peers), "users": list(users)}, expect=201)
    return doc


async def service_user(http: aiohttp.ClientSession, mgmt: Mgmt, role: str = "user") -> dict:
    _, doc = await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin,
                        json={"email": f"{uniq('svc')}@example.com", "role": role, "service": True}, expect=201)
    return doc


async def next_msg(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def test_health_metrics_openapi(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    _, doc = await call(http, "GET", mgmt.url + "/healthz", expect=200)
    assert doc["status"] == "ok"
    async with http.get(mgmt.url + "/metrics") as resp:
        text = await resp.text()
        # Prometheus's own media type, once (it was text/plain plus a made-up header)
        assert resp.headers.getall("Content-Type") == ["text/plain; version=0.0.4; charset=utf-8"]
        assert "X-Content-Type" not in resp.headers
    assert "meshmgmt_peers_connected" in text and "meshmgmt_maps_computed_total" in text
    _, spec = await call(http, "GET", mgmt.url + "/api/openapi.json", expect=200)
    assert spec["openapi"].startswith("3.")


@pytest.mark.parametrize(
    "headers",
    [pytest.param({}, id="no-header"), pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
     pytest.param({"Authorization": "Basic eDp5"}, id="wrong-scheme"),
     pytest.param({"Authorization": "Bearer a.b.c"}, id="garbage-jwt")],
)
async def test_admin_endpoints_need_credentials(http: aiohttp.ClientSession, mgmt: Mgmt, headers: dict) -> None:
    for path in ("/api/users", "/api/groups", "/api/setup-keys", "/api/policies", "/api/peers", "/api/events"):
        status, doc = await call(http, "GET", mgmt.url + path, headers=headers)
        assert status == 401 and doc["error"], (path, doc)


async def test_jwt_auth_admin_vs_user(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    user = await service_user(http, mgmt, "user")
    admin = await service_user(http, mgmt, "admin")
    utok, atok = await service_token(http, mgmt, user), await service_token(http, mgmt, admin)
    status, doc = await call(http, "GET", mgmt.url + "/api/users", headers={"Authorization": f"Bearer {utok}"})
    assert status == 403 and doc["error"] == "forbidden"
    _, doc = await call(http, "GET", mgmt.url + "/api/users", headers={"Authorization": f"Bearer {atok}"}, expect=200)
    assert user["email"] in [u["email"] for u in doc["users"]]
    # The admin token has no identity, so it cannot ask "which peers may I reach".
    status, _ = await call(http, "GET", mgmt.url + "/api/me/peers", headers=mgmt.admin)
    assert status == 403
    # A blocked user's token stops working at once.
    await call(http, "PUT", f"{mgmt.url}/api/users/{admin['id']}", headers=mgmt.admin, json={"blocked": True},
               expect=200)
    status, _ = await call(http, "GET", mgmt.url + "/api/users", headers={"Authorization": f"Bearer {atok}"})
    assert status == 401
    # The issuer's counters are part of /metrics.
    async with http.get(mgmt.url + "/metrics") as resp:
        text = await resp.text()
    assert 'meshmgmt_token_grants_total{grant="client_credentials"}' in text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "setup_key", id="empty"),
        pytest.param({"setup_key": "x", "hostname": "h"}, "wg_public_key", id="no-wg-key"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "notbase64!"}, "wg_public_key",
                     id="bad-wg-key"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "AAAA"}, "wg_public_key", id="short-wg"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "A" * 43 + "=", "ssh_host_key": "nope"},
                     "ssh_host_key", id="bad-host-key"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "A" * 43 + "=", "flags": []}, "flags",
                     id="flags-not-object"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "A" * 43 + "=",
                      "flags": {"allow_server_ssh": "yes"}}, "flags.allow_server_ssh", id="flag-not-bool"),
        pytest.param({"setup_key": "x", "hostname": "h", "wg_public_key": "A" * 43 + "=", "endpoints": ["x"]},
                     "endpoints[0]", id="bad-endpoint"),
        pytest.param({"setup_key": 5, "hostname": "h"}, "setup_key", id="key-not-string"),
    ],
)
async def test_register_validation(http: aiohttp.ClientSession, mgmt: Mgmt, body: dict, field: str) -> None:
    status, doc = await call(http, "POST", mgmt.url + "/api/peers/register", json=body)
    assert status == 400 and doc["field"] == field, doc


async def test_register_bad_json(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    for data in (b"{", b"[]", b"", b"\xff"):
        status, doc = await call(http, "POST", mgmt.url + "/api/peers/register", data=data)
        assert status == 400 and doc["error"] == "invalid_json" and doc["field"] == "body"


async def test_setup_key_rules(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    one_off = await setup_key(http, mgmt, name="one")
    await register_peer(http, mgmt, one_off["key"], uniq("h"))
    doc = await register_peer(http, mgmt, one_off["key"], uniq("h"), expect=401)
    assert doc["error"] == "invalid_setup_key" and "used up" in doc["message"]

    limited = await setup_key(http, mgmt, reusable=True, usage_limit=2)
    for _ in range(2):
        await register_peer(http, mgmt, limited["key"], uniq("h"))
    await register_peer(http, mgmt, limited["key"], uniq("h"), expect=401)

    revoked = await setup_key(http, mgmt, reusable=True)
    await call(http, "DELETE", f"{mgmt.url}/api/setup-keys/{revoked['id']}", headers=mgmt.admin, expect=204)
    doc = await register_peer(http, mgmt, revoked["key"], uniq("h"), expect=401)
    assert "revoked" in doc["message"]

    expiring = await setup_key(http, mgmt, reusable=True, expires_in=1)
    await asyncio.sleep(1.2)
    doc = await register_peer(http, mgmt, expiring["key"], uniq("h"), expect=401)
    assert "expired" in doc["message"]

    await register_peer(http, mgmt, "mk_nonsense", uniq("h"), expect=401)
    _, keys = await call(http, "GET", mgmt.url + "/api/setup-keys", headers=mgmt.admin, expect=200)
    states = {k["id"]: k for k in keys["setup_keys"]}
    assert states[one_off["id"]]["used_count"] == 1 and not states[one_off["id"]]["valid"]
    assert states[revoked["id"]]["revoked"]
    assert all("key" not in k and "key_hash" not in k for k in keys["setup_keys"])  # never shown again


async def test_register_allocates_and_reregisters(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    key = await setup_key(http, mgmt, reusable=True)
    host = uniq("box")
    a = await register_peer(http, mgmt, key["key"], host + ".example.com")
    b = await register_peer(http, mgmt, key["key"], host)
    assert a["name"] == host and b["name"] == f"{host}-2"
    assert a["fqdn"] == f"{host}.mesh.internal" and a["network"] == "127.77.0.0/16"
    assert a["mesh_ip"] != b["mesh_ip"] and a["mesh_ip"].startswith("127.77.")
    assert a["mesh_ip"] not in ("127.77.0.0", "127.77.0.1")
    # Same WireGuard key again, with the peer's current credential: same peer, new
    # credential, old credential dead.
    again = await register_peer(http, mgmt, key["key"], host, wg=a["_wg"], headers=peer_auth(a))
    assert (again["peer_id"], again["mesh_ip"], again["name"]) == (a["peer_id"], a["mesh_ip"], a["name"])
    assert again["credential"] != a["credential"]
    status, _ = await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(a), json={})
    assert status == 401
    await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(again), json={"version": "2"},
               expect=200)


async def test_reregistering_a_key_needs_its_credential_or_an_admins_approval(
        http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    key = await setup_key(http, mgmt, reusable=True)
    a = await register_peer(http, mgmt, key["key"], uniq("lost"))
    other = await register_peer(http, mgmt, key["key"], uniq("other"))
    # The key's own proof is not enough, nor another peer's credential.
    for headers in (None, peer_auth(other)):
        doc = await register_peer(http, mgmt, key["key"], "lost", wg=a["_wg"], headers=headers, expect=409)
        assert doc["error"] == "peer_exists" and "approve-rekey" in doc["message"]
    await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(a), json={}, expect=200)
    # An admin's approval lets it register once, keeping id, name and address.
    _, ok = await call(http, "POST", f"{mgmt.url}/api/peers/{a['name']}/approve-rekey", headers=mgmt.admin,
                       json={"expires_in": 600}, expect=200)
    assert ok["id"] == a["peer_id"] and ok["rekey_approved_until"]
    again = await register_peer(http, mgmt, key["key"], "lost", wg=a["_wg"])
    assert (again["peer_id"], again["name"], again["mesh_ip"]) == (a["peer_id"], a["name"], a["mesh_ip"])
    await register_peer(http, mgmt, key["key"], "lost", wg=a["_wg"], expect=409)  # single use
    _, events = await call(http, "GET", mgmt.url + "/api/events?limit=1000", headers=mgmt.admin, expect=200)
    assert any(e["type"] == "peer.reregistered" and e.get("allowed_by") == "approval"
               and e["peer_id"] == a["peer_id"] for e in events["events"])


async def test_registration_proves_the_wireguard_private_key(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    """The WireGuard public key is in every map: holding it must not be enough."""
    key = await setup_key(http, mgmt, reusable=True)
    victim = await register_peer(http, mgmt, key["key"], uniq("victim"))
    victim_pub = public_key_b64(victim["_wg"])
    mine = X25519PrivateKey.generate()
    body = {"setup_key": key["key"], "wg_public_key": victim_pub, "ssh_host_key": host_key(),
            "hostname": "evil", "flags": {"allow_server_ssh": True}, "version": "x", "endpoints": []}

    async def challenge(wg: str) -> dict:
        return (await call(http, "POST", mgmt.url + "/api/peers/challenge", json={"wg_public_key": wg},
                           expect=200))[1]

    url = mgmt.url + "/api/peers/register"
    # No proof (a peer of the old protocol): told why.
    status, doc = await call(http, "POST", url, json=body)
    assert status == 400 and doc["error"] == "proof_required"
    # A proof made with another key for the victim's public key does not verify.
    forged = prove(body, mine, await challenge(victim_pub))
    status, doc = await call(http, "POST", url, json=forged)
    assert status == 401 and doc["error"] == "invalid_proof", doc
    # A challenge asked for one key cannot be used for another.
    mine_body = {**body, "wg_public_key": public_key_b64(mine), "hostname": uniq("mine")}
    stolen = prove(mine_body, mine, await challenge(victim_pub))
    status, doc = await call(http, "POST", url, json=stolen)
    assert status == 401 and doc["error"] == "invalid_challenge"
    # A changed body (another setup key, host key...) breaks the proof.
    good = prove(mine_body, mine, await challenge(mine_body["wg_public_key"]))
    status, doc = await call(http, "POST", url, json={**good, "ssh_host_key": host_key()})
    assert status == 401 and doc["error"] == "invalid_proof"
    # The right answer works once; replayed, it is refused.
    await call(http, "POST", url, json=good, expect=201)
    status, doc = await call(http, "POST", url, json=good)
    assert status == 401 and doc["error"] == "invalid_challenge"
    # The victim was never touched.
    _, row = await call(http, "GET", f"{mgmt.url}/api/peers/{victim['peer_id']}", headers=mgmt.admin, expect=200)
    assert row["hostname"] != "evil" and row["wg_public_key"] == victim_pub
    await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(victim), json={}, expect=200)


async def test_peer_auth_required(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    for headers in ({}, {"Authorization": "Peer nope"}, {"Authorization": "Peer a:b"}, mgmt.admin):
        status, doc = await call(http, "POST", mgmt.url + "/api/peers/events", headers=headers, json={"events": []})
        assert status == 401, doc
        status, _ = await call(http, "GET", mgmt.url + "/api/peers/sync", headers=headers)
        assert status == 401


async def test_sync_stream_follows_changes(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    """Full map on connect; a new map (higher serial) after a relevant change; none after
    an irrelevant one; `peer-deleted` and close when the peer is deleted."""
    servers, admins = uniq("servers"), uniq("admins")
    await group(http, mgmt, servers)
    key = await setup_key(http, mgmt, reusable=True, auto_groups=[servers])
    srv = await register_peer(http, mgmt, key["key"], uniq("db"))
    laptop = await register_peer(http, mgmt, key["key"], uniq("laptop"), allow_server_ssh=False)
    user = await service_user(http, mgmt)
    adm = await group(http, mgmt, admins, peers=[laptop["peer_id"]], users=[user["email"]])
    # The laptop should not be a server; take it out again (auto-group put it there).
    _, groups = await call(http, "GET", mgmt.url + "/api/groups", headers=mgmt.admin, expect=200)
    sg = next(g for g in groups["groups"] if g["name"] == servers)
    await call(http, "PUT", f"{mgmt.url}/api/groups/{sg['id']}", headers=mgmt.admin,
               json={"peers": [srv["peer_id"]]}, expect=200)

    async with http.ws_connect(mgmt.url + "/api/peers/sync", headers=peer_auth(srv)) as ws:
        first = await next_msg(ws)
        assert first["type"] == "netmap"
        m0 = first["netmap"]
        assert m0["peer"]["id"] == srv["peer_id"] and m0["peers"] == [] and not m0["ssh"]["enabled"]

        _, pol = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, expect=201, json={
            "name": uniq("ssh"), "rules": [{"sources": [admins], "destinations": [servers], "protocol": "ssh",
                                            "local_users": ["deploy", "localpart"]}]})
        m1 = (await next_msg(ws))["netmap"]
        assert m1["serial"] > m0["serial"]
        assert [p["id"] for p in m1["peers"]] == [laptop["peer_id"]]
        assert m1["ssh"]["enabled"] and m1["ssh"]["jwks"]["keys"]
        assert m1["ssh"]["audience"] == [srv["peer_id"]]
        assert m1["ssh"]["access"] == [{"sources": [laptop["mesh_ip"] + "/32"], "identities": [user["email"]],
                                        "local_users": ["deploy", "localpart"]}]
        assert {(r["protocol"], tuple(r["ports"])) for r in m1["firewall_rules"]} == {("tcp", ("22",)),
                                                                                     ("tcp", ("22022",))}
        # An irrelevant change (a user in no group) sends nothing.
        await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin,
                   json={"email": f"{uniq('x')}@example.com"}, expect=201)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.receive(), 0.7)
        await ws.send_json({"type": "ping"})
        assert (await next_msg(ws))["type"] == "pong"

        # Disabling the policy takes SSH away again.
        await call(http, "PUT", f"{mgmt.url}/api/policies/{pol['id']}", headers=mgmt.admin,
                   json={"enabled": False}, expect=200)
        m2 = (await next_msg(ws))["netmap"]
        assert m2["serial"] > m1["serial"] and not m2["ssh"]["enabled"] and m2["firewall_rules"] == []

        # What the user may reach follows the policy too.
        tok = await service_token(http, mgmt, user)
        _, mine = await call(http, "GET", mgmt.url + "/api/me/peers", headers={"Authorization": f"Bearer {tok}"},
                             expect=200)
        assert mine["peers"] == []
        await call(http, "PUT", f"{mgmt.url}/api/policies/{pol['id']}", headers=mgmt.admin,
                   json={"enabled": True}, expect=200)
        m3 = (await next_msg(ws))["netmap"]
        assert m3["ssh"]["enabled"]
        _, mine = await call(http, "GET", mgmt.url + "/api/me/peers", headers={"Authorization": f"Bearer {tok}"},
                             expect=200)
        # `localpart` is resolved to the caller's own login name in this list.
        own = user["email"].split("@")[0]
        assert [(p["id"], p["local_users"]) for p in mine["peers"]] == [(srv["peer_id"], ["deploy", own])]
        assert mine["peers"][0]["ssh_host_keys"][0].startswith("ssh-ed25519 ")

        # The peer stops advertising SSH → its SSH section turns off.
        await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(srv),
                   json={"flags": {"allow_server_ssh": False}}, expect=200)
        m4 = (await next_msg(ws))["netmap"]
        assert not m4["ssh"]["enabled"] and m4["serial"] > m3["serial"]

        await call(http, "DELETE", f"{mgmt.url}/api/peers/{srv['peer_id']}", headers=mgmt.admin, expect=204)
        err = await next_msg(ws)
        assert err["type"] == "error" and err["error"] == "peer-deleted"
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    status, _ = await call(http, "GET", mgmt.url + "/api/peers/sync", headers=peer_auth(srv))
    assert status == 401
    _ = adm
    async with http.get(mgmt.url + "/metrics") as resp:
        text = await resp.text()
    sent = next(line for line in text.splitlines() if line.startswith("meshmgmt_maps_sent_total"))
    assert float(sent.split()[-1]) >= 5
    assert "meshmgmt_map_compute_seconds_count" in text


async def test_events_ingest_list_follow(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    key = await setup_key(http, mgmt)
    peer = await register_peer(http, mgmt, key["key"], uniq("ev"))
    _, before = await call(http, "GET", mgmt.url + "/api/events?limit=1000", headers=mgmt.admin, expect=200)
    async with http.ws_connect(mgmt.url + "/api/events/stream", headers=mgmt.admin) as ws:
        await call(http, "POST", mgmt.url + "/api/peers/events", headers=peer_auth(peer), expect=202, json={
            "events": [{"type": "session.started", "time": "2026-11-23T10:00:00Z", "session_id": "s1",
                        "identity": "alice@example.com", "source_ip": "127.77.0.9", "local_user": "alice"},
                       {"type": "session.ended", "session_id": "s1", "bytes_in": 10, "bytes_out": 20,
                        "exit_status": 0, "unknown_field": "dropped"}]})
        got = [(await next_msg(ws))["event"] for _ in range(2)]
    assert [e["type"] for e in got] == ["session.started", "session.ended"]
    assert got[0]["peer_id"] == peer["peer_id"] and got[0]["identity"] == "alice@example.com"
    assert got[1]["bytes_out"] == 20 and "unknown_field" not in got[1] and "received_at" in got[1]
    _, after = await call(http, "GET", f"{mgmt.url}/api/events?since={before['next']}&limit=1000",
                          headers=mgmt.admin, expect=200)
    assert [e["id"] for e in after["events"]] == sorted(e["id"] for e in after["events"])
    assert {e["type"] for e in after["events"]} >= {"session.started", "session.ended"}

    for bad, field in (({"events": {}}, "events"), ({"events": [{"type": "nope"}]}, "events[0].type"),
                       ({"events": [{"type": "exec", "bytes_in": "x"}]}, "events[0].bytes_in"),
                       ({"events": [{"type": "exec", "time": "yesterday"}]}, "events[0].time")):
        status, doc = await call(http, "POST", mgmt.url + "/api/peers/events", headers=peer_auth(peer), json=bad)
        assert status == 400 and doc["field"] == field


async def test_admin_crud_conflicts_and_validation(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    g = uniq("grp")
    made = await group(http, mgmt, g)
    status, doc = await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin, json={"name": g})
    assert status == 409
    status, doc = await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin,
                             json={"name": uniq("g"), "peers": ["no-such-peer"]})
    assert (status, doc["error"], doc["field"]) == (422, "unprocessable", "peers[0]")
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin,
                             json={"name": uniq("p"), "rules": [{"sources": ["nope"], "destinations": [g]}]})
    assert (status, doc["error"], doc["field"]) == (422, "unprocessable", "rules[0].sources[0]")
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, json={
        "name": uniq("p"), "rules": [{"sources": [g], "destinations": [g], "ports": ["99999"]}]})
    assert status == 400 and doc["field"] == "rules[0].ports[0]"
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, json={
        "name": uniq("p"), "rules": [{"sources": [g], "destinations": [g], "protocol": "gre"}]})
    assert status == 400 and doc["field"] == "rules[0].protocol"
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, json={
        "name": uniq("p"), "rules": [{"sources": [g], "destinations": [g], "local_users": ["bad user"]}]})
    assert status == 400 and doc["field"] == "rules[0].local_users[0]"
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, json={
        "name": uniq("p"), "rules": [{"sources": [g], "destinations": [g], "accept_env": ["LC_*", "A=B"]}]})
    assert status == 400 and doc["field"] == "rules[0].accept_env[1]" and "variable name pattern" in doc["message"]
    # A range ending below its start is well formed (the document's pattern admits it) but says nothing: 422.
    status, doc = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, json={
        "name": uniq("p"), "rules": [{"sources": [g], "destinations": [g], "ports": ["22", "8080-8000"]}]})
    assert (status, doc["field"]) == (422, "rules[0].ports[1]")
    _, pol = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, expect=201, json={
        "name": uniq("p"), "rules": [{"sources": [g, "user:Bob@Example.com"], "destinations": [g],
                                      "protocol": "tcp", "ports": [80, "8000-8080"]}]})
    assert pol["rules"][0]["sources"] == [g, "user:bob@example.com"]
    assert pol["rules"][0]["ports"] == ["80", "8000-8080"]
    assert "accept_env" not in pol["rules"][0]   # absent stays absent: the peer's default applies
    # A group in use cannot be deleted; a rename follows into the policy.
    status, doc = await call(http, "DELETE", f"{mgmt.url}/api/groups/{made['id']}", headers=mgmt.admin)
    assert status == 409 and pol["name"] in doc["message"]
    renamed = uniq("renamed")
    await call(http, "PUT", f"{mgmt.url}/api/groups/{made['id']}", headers=mgmt.admin, json={"name": renamed},
               expect=200)
    _, pols = await call(http, "GET", mgmt.url + "/api/policies", headers=mgmt.admin, expect=200)
    rule = next(p for p in pols["policies"] if p["id"] == pol["id"])["rules"][0]
    assert rule["sources"][0] == renamed and rule["destinations"] == [renamed]
    await call(http, "DELETE", f"{mgmt.url}/api/policies/{pol['id']}", headers=mgmt.admin, expect=204)
    await call(http, "DELETE", f"{mgmt.url}/api/groups/{made['id']}", headers=mgmt.admin, expect=204)
    for path, what in (("/api/groups/", "group"), ("/api/policies/", "policy"), ("/api/users/", "user"),
                       ("/api/peers/", "peer"), ("/api/setup-keys/", "setup key")):
        status, doc = await call(http, "DELETE", mgmt.url + path + "missing", headers=mgmt.admin)
        assert status == 404 and doc["error"] == "not_found" and doc["message"] == f"no such {what}"
    _, events = await call(http, "GET", mgmt.url + "/api/events?type=policy.deleted&limit=1000", headers=mgmt.admin,
                           expect=200)
    assert any(e.get("name") == pol["name"] for e in events["events"])
    # Users: duplicate email, bad role, short password; service users get a one-time secret.
    email = f"{uniq('u')}@example.com"
    await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, json={"email": email}, expect=201)
    status, _ = await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, json={"email": email.upper()})
    assert status == 409
    for body, field in (({"email": "not-an-email"}, "email"), ({"email": f"{uniq('a')}@x.io", "role": "god"}, "role"),
                        ({"email": f"{uniq('a')}@x.io", "password": "short"}, "password"),
                        ({"email": f"{uniq('a')}@x.io", "bogus": 1}, "bogus")):
        status, doc = await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, json=body)
        assert status == 400 and doc["field"] == field
    svc = await service_user(http, mgmt)
    assert svc["client_id"].startswith("svc-") and len(svc["client_secret"]) > 20
    # An update checks the password like a create; a deleted user is named in the audit log.
    status, doc = await call(http, "PUT", f"{mgmt.url}/api/users/{svc['id']}", headers=mgmt.admin,
                             json={"password": "short"})
    assert status == 400 and doc["field"] == "password" and "at least 8" in doc["message"]
    gone = await service_user(http, mgmt)
    await call(http, "DELETE", f"{mgmt.url}/api/users/{gone['id']}", headers=mgmt.admin, expect=204)
    _, events = await call(http, "GET", mgmt.url + "/api/events?type=user.deleted&limit=1000", headers=mgmt.admin,
                           expect=200)
    assert any(e.get("email") == gone["email"] for e in events["events"])
    _, users = await call(http, "GET", mgmt.url + "/api/users", headers=mgmt.admin, expect=200)
    listed = next(u for u in users["users"] if u["id"] == svc["id"])
    assert "client_secret" not in listed and "password_hash" not in listed


async def test_peer_admin_rename_toggle_delete(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    key = await setup_key(http, mgmt, reusable=True)
    a = await register_peer(http, mgmt, key["key"], uniq("pa"))
    b = await register_peer(http, mgmt, key["key"], uniq("pb"))
    new = uniq("renamed")
    _, doc = await call(http, "PUT", f"{mgmt.url}/api/peers/{a['peer_id']}", headers=mgmt.admin,
                        json={"name": new, "ssh_enabled": True}, expect=200)
    assert doc["name"] == new and doc["ssh_enabled"] and doc["fqdn"] == f"{new}.mesh.internal"
    status, doc = await call(http, "PUT", f"{mgmt.url}/api/peers/{b['peer_id']}", headers=mgmt.admin,
                             json={"name": new})
    assert status == 409
    status, doc = await call(http, "PUT", f"{mgmt.url}/api/peers/{b['peer_id']}", headers=mgmt.admin,
                             json={"name": "Not A Label"})
    assert status == 400 and doc["field"] == "name"
    status, doc = await call(http, "PUT", f"{mgmt.url}/api/peers/{b['peer_id']}", headers=mgmt.admin,
                             json={"ssh_enabled": "on"})
    assert status == 400 and doc["field"] == "ssh_enabled"
    _, listed = await call(http, "GET", mgmt.url + "/api/peers", headers=mgmt.admin, expect=200)
    row = next(p for p in listed["peers"] if p["id"] == a["peer_id"])
    assert row["flags"] == {"allow_server_ssh": True} and row["ssh_host_key"].startswith("ssh-ed25519")
    await call(http, "DELETE", f"{mgmt.url}/api/peers/{new}", headers=mgmt.admin, expect=204)
    status, _ = await call(http, "POST", mgmt.url + "/api/peers/self", headers=peer_auth(a), json={})
    assert status == 401


async def test_concurrent_registrations_get_distinct_addresses(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    key = await setup_key(http, mgmt, reusable=True)
    base = uniq("par")
    peers = await asyncio.gather(*(register_peer(http, mgmt, key["key"], base) for _ in range(8)))
    assert len({p["mesh_ip"] for p in peers}) == 8
    assert len({p["name"] for p in peers}) == 8


async def test_unknown_route_and_method_are_json(http: aiohttp.ClientSession, mgmt: Mgmt) -> None:
    status, doc = await call(http, "GET", mgmt.url + "/api/nothing-here")
    assert status == 404 and doc["error"] == "not_found"
    status, doc = await call(http, "PATCH", mgmt.url + "/api/users", headers=mgmt.admin)
    assert status == 405 and doc["error"] == "method_not_allowed"
    _ = host_key


async def test_shutdown_tells_streams_to_go_away(http: aiohttp.ClientSession, sqlite_mgmt: Mgmt) -> None:
    """SIGTERM: every sync stream is closed with 1001 (going away), so peers reconnect."""
    mgmt = sqlite_mgmt
    key = await setup_key(http, mgmt)
    peer = await register_peer(http, mgmt, key["key"], uniq("bye"))
    async with http.ws_connect(mgmt.url + "/api/peers/sync", headers=peer_auth(peer)) as ws:
        assert (await next_msg(ws))["type"] == "netmap"
        await asyncio.get_running_loop().run_in_executor(None, mgmt.proc.stop)
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
    assert mgmt.proc.popen.returncode == 0
