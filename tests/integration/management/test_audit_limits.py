"""One peer credential cannot fill the disk with audit events (issue 12, item 23): uploads
are rate-limited per peer (count and size), refused events are counted in
`meshmgmt_audit_events_dropped_total` and stay the peer's to retry, and
`--audit-retention` deletes old events."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp

from .mgmtkit import Mgmt, call, mgmt_server, peer_auth, register_peer


async def a_peer(http: aiohttp.ClientSession, mgmt: Mgmt) -> dict:
    _, key = await call(http, "POST", mgmt.url + "/api/setup-keys", headers=mgmt.admin, json={"name": "k"},
                        expect=201)
    return await register_peer(http, mgmt, key["key"], "auditor")


def events(n: int, command: str = "true") -> list[dict]:
    return [{"type": "exec", "session_id": f"s{i}", "command": command} for i in range(n)]


async def metric(http: aiohttp.ClientSession, mgmt: Mgmt, name: str) -> float:
    _, text = await call(http, "GET", mgmt.url + "/metrics", expect=200)
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


async def peer_events(http: aiohttp.ClientSession, mgmt: Mgmt, peer_id: str) -> int:
    _, doc = await call(http, "GET", f"{mgmt.url}/api/events?peer_id={peer_id}&type=exec&limit=1000", headers=mgmt.admin,
                        expect=200)
    return len(doc["events"])


async def test_a_flooding_peer_is_slowed_and_what_it_is_refused_is_counted(tmp_path: Path) -> None:
    with mgmt_server(tmp_path, extra=("--audit-rate", "20", "--audit-burst", "1024")) as mgmt:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            peer = await a_peer(http, mgmt)
            auth = peer_auth(peer)
            await call(http, "POST", mgmt.url + "/api/peers/events", headers=auth, json={"events": events(500)},
                       expect=202)
            refused = 0
            for _ in range(5):  # the flood: five more full uploads at once
                status, doc = await call(http, "POST", mgmt.url + "/api/peers/events", headers=auth,
                                         json={"events": events(1000)})
                assert status == 429 and doc["error"] == "rate_limited", (status, doc)
                refused += 1000
            # Few but huge events cost by size: 200 events of ~4 KiB each cost 800, more than is left.
            status, _ = await call(http, "POST", mgmt.url + "/api/peers/events", headers=auth,
                                   json={"events": events(200, "x" * 4000)})
            assert status == 429
            refused += 200
            assert await peer_events(http, mgmt, peer["peer_id"]) == 500, "a refused upload stored something"
            assert await metric(http, mgmt, "meshmgmt_audit_events_dropped_total") == refused
            # The limit is per peer: another peer is not slowed by this one.
            other = await a_peer(http, mgmt)
            await call(http, "POST", mgmt.url + "/api/peers/events", headers=peer_auth(other),
                       json={"events": events(10)}, expect=202)
            # And the flooding peer gets through again at its rate.
            await asyncio.sleep(1.1)
            await call(http, "POST", mgmt.url + "/api/peers/events", headers=auth, json={"events": events(10)},
                       expect=202)


async def test_audit_retention_deletes_old_events(tmp_path: Path) -> None:
    with mgmt_server(tmp_path, extra=("--audit-retention", "2s")) as mgmt:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            peer = await a_peer(http, mgmt)
            await call(http, "POST", mgmt.url + "/api/peers/events", headers=peer_auth(peer),
                       json={"events": events(50)}, expect=202)
            assert await peer_events(http, mgmt, peer["peer_id"]) == 50
            deadline = time.monotonic() + 10
            while await peer_events(http, mgmt, peer["peer_id"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            assert await peer_events(http, mgmt, peer["peer_id"]) == 0, "events older than the retention remain"
            assert await metric(http, mgmt, "meshmgmt_audit_events_pruned_total") >= 50
        assert '"event":"audit.pruned"' in mgmt.proc.output()
