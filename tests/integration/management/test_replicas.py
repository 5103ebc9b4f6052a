"""Two `meshmgmt serve` replicas on one PostgreSQL database: a change made through one
reaches a sync stream held by the other within 1 s (LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import prove, public_key_b64

from .mgmtkit import Mgmt, PgCluster, assert_no_server_errors, call, init_data_dir, peer_auth, register_peer, replica_data_dir, start_serve

pytestmark = pytest.mark.postgres


@pytest.fixture
def replicas(pg: PgCluster, tmp_path: Path) -> Iterator[tuple[Mgmt, Mgmt]]:
    database = pg.create_database(f"replicas_{secrets.token_hex(4)}")  # one per test
    one = tmp_path / "one"
    token = init_data_dir(one, database)
    two = replica_data_dir(one, tmp_path / "two")
    r1 = start_serve(one, token, database)
    try:
        r2 = start_serve(two, token, database)
    except Exception:
        r1.proc.stop()
        raise
    try:
        yield r1, r2
    finally:
        r1.proc.stop()
        r2.proc.stop()
    assert_no_server_errors(r1)
    assert_no_server_errors(r2)


async def test_change_via_one_replica_reaches_stream_on_the_other(replicas: tuple[Mgmt, Mgmt]) -> None:
    r1, r2 = replicas
    async with aiohttp.ClientSession() as http:
        await call(http, "POST", r1.url + "/api/groups", headers=r1.admin, json={"name": "servers"}, expect=201)
        _, key = await call(http, "POST", r1.url + "/api/setup-keys", headers=r1.admin,
                            json={"reusable": True, "auto_groups": ["servers"]}, expect=201)
        # Register through replica 2, sync through replica 2, change through replica 1.
        srv = await register_peer(http, r2, key["key"], "db")
        other = await register_peer(http, r2, key["key"], "web")
        async with http.ws_connect(r2.url + "/api/peers/sync", headers=peer_auth(srv)) as ws:
            first = (await ws.receive_json(timeout=5))["netmap"]
            assert first["peers"] == []
            for round_ in range(3):
                t0 = time.monotonic()
                ports = [str(8000 + round_)]
                if round_ == 0:
                    _, pol = await call(http, "POST", r1.url + "/api/policies", headers=r1.admin, expect=201, json={
                        "name": "web", "rules": [{"sources": ["servers"], "destinations": ["servers"],
                                                  "protocol": "tcp", "ports": ports}]})
                else:
                    await call(http, "PUT", f"{r1.url}/api/policies/{pol['id']}", headers=r1.admin, expect=200,
                               json={"rules": [{"sources": ["servers"], "destinations": ["servers"],
                                                "protocol": "tcp", "ports": ports}]})
                netmap = (await asyncio.wait_for(ws.receive_json(), 1.0))["netmap"]
                elapsed = time.monotonic() - t0
                assert elapsed < 1.0
                assert netmap["firewall_rules"] == [{"sources": [other["mesh_ip"] + "/32"], "protocol": "tcp",
                                                     "ports": ports, "action": "accept"}]
                assert netmap["serial"] > first["serial"]
                first = netmap
            # Failure injection: the database drops every LISTEN connection. The replicas
            # re-listen and catch up, so a change made meanwhile still arrives.
            import asyncpg

            base, db_name = r1.database.rsplit("/", 1)
            admin = await asyncpg.connect(base + "/postgres")
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND query LIKE 'LISTEN%'", db_name)
            finally:
                await admin.close()
            assert killed == 2
            await call(http, "PUT", f"{r1.url}/api/policies/{pol['id']}", headers=r1.admin, expect=200,
                       json={"rules": [{"sources": ["servers"], "destinations": ["servers"], "protocol": "udp"}]})
            netmap = (await asyncio.wait_for(ws.receive_json(), 5.0))["netmap"]
            assert netmap["firewall_rules"][0]["protocol"] == "udp"

            # Deleting the peer through replica 1 ends its stream on replica 2.
            await call(http, "DELETE", f"{r1.url}/api/peers/{srv['peer_id']}", headers=r1.admin, expect=204)
            err = await asyncio.wait_for(ws.receive_json(), 1.0)
            assert err["error"] == "peer-deleted"
        # Both replicas agree on the serial (it lives in the database).
        _, h1 = await call(http, "GET", r1.url + "/healthz", expect=200)
        _, h2 = await call(http, "GET", r2.url + "/healthz", expect=200)
        assert h1["serial"] == h2["serial"]


async def test_a_challenge_from_one_replica_is_answered_at_the_other(replicas: tuple[Mgmt, Mgmt]) -> None:
    """Behind a load balancer the challenge and the registration may hit different
    replicas: the challenge is in the database, the box key file is shared."""
    r1, r2 = replicas
    wg = X25519PrivateKey.generate()
    async with aiohttp.ClientSession() as http:
        _, key = await call(http, "POST", r1.url + "/api/setup-keys", headers=r1.admin, json={}, expect=201)
        body = {"setup_key": key["key"], "wg_public_key": public_key_b64(wg), "hostname": "lb"}
        _, challenge = await call(http, "POST", r1.url + "/api/peers/challenge", expect=200,
                                  json={"wg_public_key": body["wg_public_key"]})
        signed = prove(body, wg, challenge)
        await call(http, "POST", r2.url + "/api/peers/register", json=signed, expect=201)
        status, doc = await call(http, "POST", r1.url + "/api/peers/register", json=signed)  # replayed elsewhere
        assert status == 401 and doc["error"] == "invalid_challenge"
