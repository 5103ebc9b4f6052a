"""SSH subsystems set from management: map computation, admin API, migration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshmgmt.app import create_app
from meshmgmt.bootstrap import initialise
from meshmgmt.netmap import compute_map, subsystems_for
from meshmgmt.settings import MgmtSettings
from meshmgmt.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord, SubsystemRecord, UserRecord
from meshmgmt.store import Group, Peer, Store, sqlite_url

from .migrations import HEAD, upgraded_from

ALICE = UserRecord(id="u-a", email="alice@example.com")
LAPTOP = PeerRecord(id="lap", name="laptop", mesh_ip="100.64.0.2", ssh_host_key="ssh-ed25519 K1")
WIN = PeerRecord(id="win", name="win-1", mesh_ip="100.64.0.3", ssh_host_key="ssh-ed25519 K2", allow_server_ssh=True)
OFF = PeerRecord(id="off", name="off-1", mesh_ip="100.64.0.4", ssh_host_key="ssh-ed25519 K3", allow_server_ssh=False)
BASE = MeshState(
    serial=3, network="100.64.0.0/10", peers=(LAPTOP, WIN, OFF), users=(ALICE,),
    groups=(GroupRecord(id="g-adm", name="admins", peer_ids=frozenset({"lap"}), user_ids=frozenset({"u-a"})),
            GroupRecord(id="g-win", name="windows", peer_ids=frozenset({"win", "off"})),
            GroupRecord(id="g-z", name="zzz", peer_ids=frozenset({"win"}))),
    policies=(PolicyRecord(id="p", name="p", rules=(RuleRecord(sources=("admins",), destinations=("windows",),
                                                                protocol="ssh", local_users=("*",)),)),),
    issuer="https://mgmt", jwks={"keys": []})


@pytest.mark.parametrize(("records", "peer", "expected"), [
    pytest.param((), "win", {}, id="none"),
    pytest.param((SubsystemRecord("powershell", "pwsh -sshs", group_id="g-win"),), "win",
                 {"powershell": "pwsh -sshs"}, id="from-group"),
    pytest.param((SubsystemRecord("powershell", "pwsh -sshs", group_id="g-win"),
                  SubsystemRecord("powershell", "/opt/pwsh -sshs", peer_id="win")), "win",
                 {"powershell": "/opt/pwsh -sshs"}, id="peer-overrides-group"),
    pytest.param((SubsystemRecord("x", "from-windows", group_id="g-win"),
                  SubsystemRecord("x", "from-zzz", group_id="g-z")), "win",
                 {"x": "from-zzz"}, id="later-group-name-wins"),
    pytest.param((SubsystemRecord("echo", "cat", peer_id="lap"),), "win", {}, id="other-peer"),
    pytest.param((SubsystemRecord("echo", "cat", group_id="g-adm"),), "win", {}, id="other-group"),
])
def test_subsystems_for(records, peer, expected) -> None:
    assert subsystems_for(replace(BASE, subsystems=records), peer) == expected


def test_map_carries_subsystems_only_with_ssh_on() -> None:
    st = replace(BASE, subsystems=(SubsystemRecord("powershell", "pwsh -sshs", group_id="g-win"),))
    on = compute_map(st, "win")
    off = compute_map(st, "off")
    assert on is not None and off is not None
    assert on.ssh.enabled and on.ssh.subsystems == {"powershell": "pwsh -sshs"}
    assert not off.ssh.enabled and off.ssh.subsystems == {}
    assert compute_map(BASE, "win").ssh.subsystems == {}


@pytest.fixture
async def admin(tmp_path: Path):
    info = await initialise(tmp_path, "admin@example.com", None, None)
    token = Path(info["token_file"]).read_text().strip()
    app = create_app(MgmtSettings(data_dir=tmp_path))
    async with TestClient(TestServer(app)) as client:
        client.session.headers["Authorization"] = f"Bearer {token}"
        store = Store(sqlite_url(tmp_path))
        try:
            async with store.change() as s:
                win = Peer(name="win-1", mesh_ip="100.64.0.3", wg_public_key="k1", credential_hash="x")
                s.add_all([win, Group(name="windows", peers=[win])])
            yield client, store
        finally:
            await store.close()


async def test_admin_api_set_list_unset(admin) -> None:
    client, store = admin
    resp = await client.put("/api/groups/windows/subsystems/powershell", json={"command": "pwsh -sshs -NoLogo"})
    assert resp.status == 200, await resp.text()
    resp = await client.put("/api/peers/win-1/subsystems/powershell", json={"command": "/opt/pwsh -sshs"})
    assert resp.status == 200
    resp = await client.put("/api/peers/win-1/subsystems/powershell", json={"command": "/opt/pwsh -sshs -NoProfile"})
    doc = await resp.json()
    assert doc["command"] == "/opt/pwsh -sshs -NoProfile" and doc["peer_name"] == "win-1"
    listed = (await (await client.get("/api/subsystems")).json())["subsystems"]
    assert sorted((x["peer_name"] or "", x["group_name"] or "", x["command"]) for x in listed) == [
        ("", "windows", "pwsh -sshs -NoLogo"), ("win-1", "", "/opt/pwsh -sshs -NoProfile")]
    from meshmgmt.store.snapshot import load_state

    async with store.session() as s:
        st = await load_state(s)
    win_id = next(p.id for p in st.peers if p.name == "win-1")
    assert subsystems_for(st, win_id) == {"powershell": "/opt/pwsh -sshs -NoProfile"}
    assert (await client.delete("/api/peers/win-1/subsystems/powershell")).status == 204
    async with store.session() as s:
        st = await load_state(s)
    assert subsystems_for(st, win_id) == {"powershell": "pwsh -sshs -NoLogo"}
    assert (await client.delete("/api/peers/win-1/subsystems/powershell")).status == 404
    events = (await (await client.get("/api/events")).json())["events"]
    assert [e["type"] for e in events if e["type"].startswith("subsystem.")] == [
        "subsystem.set", "subsystem.set", "subsystem.set", "subsystem.unset"]


@pytest.mark.parametrize(("path", "body", "status", "field"), [
    pytest.param("/api/peers/win-1/subsystems/sftp", {"command": "x"}, 400, "name", id="sftp-reserved"),
    pytest.param("/api/peers/win-1/subsystems/a%20b", {"command": "x"}, 400, "name", id="bad-name"),
    pytest.param("/api/peers/win-1/subsystems/ps", {"command": "a\nb"}, 400, "command", id="two-lines"),
    pytest.param("/api/peers/win-1/subsystems/ps", {"command": "  "}, 400, "command", id="blank"),
    pytest.param("/api/peers/win-1/subsystems/ps", {}, 400, "command", id="missing"),
    pytest.param("/api/peers/win-1/subsystems/ps", {"command": "x", "extra": 1}, 400, "extra", id="unknown-field"),
    pytest.param("/api/peers/nope/subsystems/ps", {"command": "x"}, 404, None, id="no-peer"),
    pytest.param("/api/groups/nope/subsystems/ps", {"command": "x"}, 404, None, id="no-group"),
])
async def test_admin_api_refusals(admin, path, body, status, field) -> None:
    client, _ = admin
    resp = await client.put(path, json=body)
    assert resp.status == status
    if field:
        assert (await resp.json()).get("field") == field


async def test_needs_admin(admin) -> None:
    client, _ = admin
    resp = await client.put("/api/peers/win-1/subsystems/ps", json={"command": "x"},
                            headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_migration_adds_the_table_to_an_older_database(tmp_path: Path) -> None:
    schema = await upgraded_from(tmp_path, "0001", "DROP TABLE subsystems")
    assert "subsystems" in schema.tables and schema.version == HEAD
