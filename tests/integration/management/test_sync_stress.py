"""Fifty peers register and open their sync streams at once while an admin keeps changing
the policy they are all in, against a real `meshmgmt serve` (SQLite and PostgreSQL).

Every peer must end on the latest serial with the latest rule, and none may be told
`peer-deleted` (a new peer served a snapshot from before its own registration was, and
stopped for good). On PostgreSQL two replicas serve one database, and each peer
registers through one and syncs through the other, so its stream may attach before the
other replica has heard of the registration (NOTIFY). The peers are registration + sync clients over HTTP/WebSocket in this
process, speaking the same protocol as `meshsshd up`: fifty daemons would spend the two
CPUs of a test machine on their own start-up, not on the races at management.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .mgmtkit import (Mgmt, PgCluster, assert_no_server_errors, call, init_data_dir, peer_auth, register_peer,
                      replica_data_dir, start_serve)

pytestmark = pytest.mark.timeout(240)

PEERS = 50
CHANGERS = 4  # admins changing the policy at once: the hub is always recomputing
CONVERGE_TIMEOUT = 60.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Mgmt]]:
    """One `meshmgmt serve` on SQLite; two replicas on one PostgreSQL database."""
    database = None
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg")
        database = cluster.create_database("stress")
    token = init_data_dir(tmp_path / "one", database)
    started: list[Mgmt] = []
    try:
        started.append(start_serve(tmp_path / "one", token, database))
        if database:
            replica_data_dir(tmp_path / "one", tmp_path / "two")
            started.append(start_serve(tmp_path / "two", token, database))
        yield started
    finally:
        for server in started:
            server.proc.stop()
    for server in started:
        assert_no_server_errors(server)


class SyncClient:
    """One peer: registers through one server, then holds its sync stream on another
    (or the same) and keeps every message."""

    def __init__(self, http: aiohttp.ClientSession, register: Mgmt, sync: Mgmt, key: str, name: str) -> None:
        self.http, self.register, self.sync, self.key, self.name = http, register, sync, key, name
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self.changed = asyncio.Event()

    @property
    def last_map(self) -> dict[str, Any] | None:
        maps = [m["netmap"] for m in self.messages if m.get("type") == "netmap"]
        return maps[-1] if maps else None

    async def run(self, go: asyncio.Event) -> None:
        await go.wait()
        peer = await register_peer(self.http, self.register, self.key, self.name)
        async with self.http.ws_connect(self.sync.url + "/api/peers/sync", headers=peer_auth(peer)) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(msg.json())
                    self.changed.set()
        self.closed = True
        self.changed.set()


def rule(port: int) -> dict[str, Any]:
    return {"rules": [{"sources": ["stress"], "destinations": ["stress"], "protocol": "tcp", "ports": [str(port)]}]}


async def test_fifty_peers_registering_during_policy_changes_end_on_the_latest_serial(servers: list[Mgmt]) -> None:
    mgmt = servers[0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin, json={"name": "stress"}, expect=201)
        _, key = await call(http, "POST", mgmt.url + "/api/setup-keys", headers=mgmt.admin, expect=201,
                            json={"name": "stress", "reusable": True, "auto_groups": ["stress"]})
        _, pol = await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, expect=201,
                            json={"name": "stress", **rule(1000)})
        go = asyncio.Event()
        peers = [SyncClient(http, servers[i % len(servers)], servers[(i + 1) % len(servers)], key["key"],
                            f"stress-{i}") for i in range(PEERS)]
        tasks = [asyncio.create_task(p.run(go)) for p in peers]
        changes = 0

        async def change_policy() -> None:
            nonlocal changes
            while not all(p.messages for p in peers) and not any(t.done() for t in tasks):
                changes += 1
                await call(http, "PUT", f"{mgmt.url}/api/policies/{pol['id']}", headers=mgmt.admin,
                           json=rule(1000 + changes), expect=200)

        async def change_policies() -> None:
            await asyncio.gather(*(change_policy() for _ in range(CHANGERS)))

        t0 = time.monotonic()
        go.set()
        try:
            await asyncio.wait_for(change_policies(), CONVERGE_TIMEOUT)
            registered = time.monotonic() - t0
            final_port = 9999
            await call(http, "PUT", f"{mgmt.url}/api/policies/{pol['id']}", headers=mgmt.admin,
                       json=rule(final_port), expect=200)
            _, health = await call(http, "GET", mgmt.url + "/healthz", expect=200)
            latest = health["serial"]

            def converged(p: SyncClient) -> bool:
                m = p.last_map
                return m is not None and m["serial"] == latest

            deadline = time.monotonic() + CONVERGE_TIMEOUT
            while not all(converged(p) or p.closed for p in peers) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            converged_after = time.monotonic() - t0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    errors = {p.name: m for p in peers for m in p.messages if m.get("type") != "netmap"}
    assert errors == {}, f"peers told something other than a map: {errors}"
    assert [p.name for p in peers if p.closed] == []
    lagging = {p.name: (p.last_map or {}).get("serial") for p in peers if not converged(p)}
    assert lagging == {}, f"peers not on serial {latest}: {lagging}"
    for p in peers:
        m = p.last_map
        assert m is not None
        assert m["firewall_rules"][0]["ports"] == [str(final_port)]
        assert len(m["peers"]) == PEERS - 1
        serials = [x["netmap"]["serial"] for x in p.messages]
        assert serials == sorted(serials)
    print(f"{PEERS} peers, {changes} policy changes during registration: all registered and synced "
          f"after {registered:.1f} s, all on serial {latest} after {converged_after:.1f} s")
