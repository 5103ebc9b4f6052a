"""The agent's map handling and outages, with management replaced only to inject failures.

The happy path against a real `meshmgmt serve` is in tests/integration/test_mesh_local.py.
Here: management unreachable (persisted map served), peer deleted (stops, says why),
broken maps and a failing data plane (old map stays, all-or-nothing), audit delivery
through an outage with a bounded queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.agent import EXIT_PEER_DELETED, Agent, backoff_delay
from meshsshd.audit import AuthRefused, SessionStarted
from meshsshd.audit_uplink import ManagementAuditSink
from meshsshd.dataplane._none import NoDataplane
from meshsshd.errors import ConfigError, DataplaneError
from meshsshd.mgmt_client import ManagementUnavailable, PeerDeleted, Registration
from meshsshd.netmap import FirewallRule, NetworkMap, PeerInfo, SSHSection
from meshsshd.state import Credential, PeerFlags, StateDir, UpConfig, read_json, write_json


def netmap(serial: int, ip: str = "127.77.0.2", rules: tuple[FirewallRule, ...] = ()) -> NetworkMap:
    return NetworkMap(
        serial=serial, peer=PeerInfo(id="p1", name="a", fqdn="a.mesh", mesh_ip=ip),
        network="127.77.0.0/16", firewall_rules=rules, ssh=SSHSection(enabled=True),
    )


class Outage:
    """Management that is down (or that has deleted us): every call fails."""

    def __init__(self, deleted: bool = False) -> None:
        self.deleted = deleted
        self.sync_calls = 0

    def _fail(self) -> Exception:
        if self.deleted:
            return PeerDeleted("management does not know this peer's credential any more: peer deleted")
        return ManagementUnavailable("cannot reach management: connection refused")

    async def register(self, req: Registration, wg_private: X25519PrivateKey) -> dict[str, Any]:
        raise self._fail()

    async def update_self(self, cred: Credential, body: dict[str, Any]) -> None:
        raise self._fail()

    async def sync(self, cred: Credential) -> AsyncIterator[dict[str, Any]]:
        self.sync_calls += 1
        raise self._fail()
        yield {}  # pragma: no cover - makes this an async generator

    async def post_events(self, cred: Credential, events: list[dict[str, Any]]) -> None:
        raise self._fail()

    async def close(self) -> None:
        pass


class BrokenDataplane(NoDataplane):
    """Failure injection: the data plane refuses maps whose serial is in `fail`."""

    def __init__(self, fail: set[int]) -> None:
        super().__init__()
        self.fail = fail
        self.applied: list[int] = []

    async def apply(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        if netmap.serial in self.fail:
            raise DataplaneError(f"nft refused map {netmap.serial}")
        await super().apply(netmap, serve_ssh)
        self.applied.append(netmap.serial)


def registered_state(tmp_path: Path, with_map: NetworkMap | None) -> StateDir:
    sd = StateDir(tmp_path / "state")
    sd.ensure()
    sd.save_credential(Credential(peer_id="p1", credential="c", management_url="http://127.0.0.1:9",
                                  mesh_ip="127.77.0.2"))
    if with_map is not None:
        write_json(sd.netmap_path, with_map.to_dict())
    return sd


def config() -> UpConfig:
    return UpConfig(management_url="http://127.0.0.1:9", dataplane="none")


async def run_until(agent: Agent, predicate, timeout: float = 10.0) -> int:
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                if task.done():
                    break
                await asyncio.sleep(0.02)
    finally:
        agent.stop()
    return await task


async def test_restart_while_management_is_down_serves_the_persisted_map(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, netmap(7))
    mgmt = Outage()
    agent = Agent(sd, config(), mgmt=mgmt, dataplane=NoDataplane())
    code = await run_until(agent, lambda: mgmt.sync_calls >= 2 and sd.status_path.exists()
                           and (read_json(sd.status_path) or {}).get("netmap_serial") == 7)
    assert code == 0
    assert agent.netmap is not None and agent.netmap.serial == 7
    status = read_json(sd.status_path)
    assert status["state"] == "stopped" and status["pid"] is None
    assert "connection refused" in status["management"]["last_error"]
    assert not sd.pid_path.exists()
    assert sd.load_credential() is not None  # an outage is not a deletion


async def test_deleted_credential_stops_serving_and_says_why(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, netmap(3))
    mgmt = Outage(deleted=True)
    agent = Agent(sd, config(), mgmt=mgmt, dataplane=NoDataplane())
    agent.refusal_backoff = 0.01
    code = await asyncio.wait_for(agent.run(), 10)
    assert code == EXIT_PEER_DELETED
    assert mgmt.sync_calls == agent.refusals_before_deleted  # checked again before giving up
    status = read_json(sd.status_path)
    assert status["state"] == "credential-deleted"
    assert "peer deleted" in status["reason"]
    assert status["ssh"]["running"] is False
    assert sd.load_credential() is None and not sd.netmap_path.exists()


class RefusesFirst(Outage):
    """Failure injection: the first `refusals` sync connections are refused with 401
    (a race, a replica behind); then management sends a map and holds the stream."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.served = asyncio.Event()

    async def update_self(self, cred: Credential, body: dict[str, Any]) -> None:
        pass

    async def sync(self, cred: Credential) -> AsyncIterator[dict[str, Any]]:
        self.sync_calls += 1
        if self.sync_calls <= self.refusals:
            raise PeerDeleted("management refused this peer's credential (401)")
        yield {"type": "netmap", "netmap": netmap(4).to_dict()}
        self.served.set()
        await asyncio.Event().wait()


async def test_a_refused_credential_is_checked_again_not_forgotten(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, netmap(3))
    mgmt = RefusesFirst(refusals=2)
    agent = Agent(sd, config(), mgmt=mgmt, dataplane=NoDataplane())
    agent.refusal_backoff = 0.3
    seen: list[dict[str, Any]] = []

    def refused_then_served() -> bool:
        doc = read_json(sd.status_path) if sd.status_path.exists() else None
        if doc and doc.get("state") == "credential-refused":
            seen.append(doc)
        return mgmt.served.is_set() and agent.netmap is not None and agent.netmap.serial == 4

    code = await run_until(agent, refused_then_served)
    assert code == 0
    assert seen and "401" in seen[0]["reason"] and "checking again" in seen[0]["reason"]
    assert sd.load_credential() is not None  # the identity survived the refusals
    assert agent._state_name != "credential-refused"


async def test_unregistered_peer_without_setup_key_is_told_what_to_do(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    agent = Agent(sd, config(), mgmt=Outage(), dataplane=NoDataplane())
    with pytest.raises(ConfigError, match="--setup-key"):
        await agent.run()


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        pytest.param({"serial": 9}, "missing field", id="shape"),
        pytest.param({**netmap(9).to_dict(), "peer": {**netmap(9).peer.to_dict(), "id": "p2"}}, "not for us",
                     id="someone-elses-map"),
        pytest.param(netmap(9, ip="127.78.0.1").to_dict(), "outside the network", id="ip-outside-network"),
        pytest.param(netmap(9, ip="100.64.0.9").to_dict(), "outside the network", id="not-loopback"),
    ],
)
async def test_bad_maps_are_rejected_and_the_old_one_stays(tmp_path: Path, doc: dict, match: str) -> None:
    sd = registered_state(tmp_path, None)
    agent = Agent(sd, config(), mgmt=Outage(), dataplane=NoDataplane())
    agent.cred = sd.load_credential()
    assert await agent.apply_map(netmap(8).to_dict())
    with pytest.raises(ConfigError, match=match):
        await agent.apply_map(doc)
    assert agent.netmap == netmap(8)
    assert read_json(sd.netmap_path)["serial"] == 8


async def test_dataplane_failure_keeps_old_map_and_rolls_back(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, None)
    dp = BrokenDataplane(fail={5})
    agent = Agent(sd, config(), mgmt=Outage(), dataplane=dp)
    agent.cred = sd.load_credential()
    rule = FirewallRule(sources=("127.77.0.3",), ports=("22",))
    await agent.apply_map(netmap(4).to_dict())
    with pytest.raises(DataplaneError):
        await agent.apply_map(netmap(5, rules=(rule,)).to_dict())
    assert agent.netmap is not None and agent.netmap.serial == 4
    assert dp.applied[-1] == 4  # rolled back to the map in force
    assert read_json(sd.netmap_path)["serial"] == 4
    assert await agent.apply_map(netmap(6).to_dict())
    assert not await agent.apply_map(netmap(6).to_dict())  # identical: nothing to do


async def test_ssh_not_allowed_locally_means_not_serving(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, None)
    agent = Agent(sd, config(), mgmt=Outage(), dataplane=NoDataplane())
    agent.cred = sd.load_credential()
    await agent.apply_map(netmap(1).to_dict())
    assert agent.server is None and not agent.serving
    doc = await agent.status_doc()
    assert doc["state"] == "ssh-off" and "--allow-server-ssh" in doc["reason"]


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    first = [backoff_delay(0) for _ in range(50)]
    late = [backoff_delay(20) for _ in range(50)]
    assert all(0.25 <= d <= 0.5 for d in first)
    assert all(5.0 <= d <= 10.0 for d in late)
    assert len(set(late)) > 1


async def test_audit_events_survive_an_outage_in_a_bounded_queue(tmp_path: Path) -> None:
    delivered: list[dict[str, Any]] = []
    down = True

    async def post(batch: list[dict[str, Any]]) -> None:
        if down:
            raise ManagementUnavailable("connection refused")
        delivered.extend(batch)

    sink = ManagementAuditSink(post, max_queue=5, batch_size=2, interval=0.01, max_backoff=0.05)
    sink.start()
    for i in range(7):
        sink.emit(SessionStarted(session_id=f"s{i}", identity="alice@example.com"))
    await asyncio.sleep(0.1)
    assert sink.dropped == 2 and len(sink.queue) == 5 and delivered == []
    down = False
    async with asyncio.timeout(5):
        while len(delivered) < 5:
            await asyncio.sleep(0.01)
    assert [d["session_id"] for d in delivered] == ["s2", "s3", "s4", "s5", "s6"]
    assert delivered[0]["type"] == "session.started"
    # What is still queued at shutdown is kept on disk for the next run.
    down = True
    path = tmp_path / "events.jsonl"
    await sink.open(path)
    sink.emit(AuthRefused(reason="expired", source_ip="127.77.0.3"))
    await sink.stop(flush_timeout=0.1)
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["reason"] for e in saved] == ["expired"]
    again = ManagementAuditSink(post)
    assert await again.open(path) == 1 and again.queue[0]["type"] == "auth.refused"
    await again.stop(flush_timeout=0.1)


def test_endpoints_from_ip_output_skip_the_mesh_interface() -> None:
    from meshsshd.endpoints import endpoints_from_ip_output

    text = (
        "2: eth0    inet 192.0.2.5/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n"
        "3: mesh0    inet 100.64.0.2/10 scope global mesh0\\       valid_lft forever\n"
        "4: eth1    inet 198.51.100.7/24 scope global dynamic eth1\\       valid_lft 86000sec\n"
    )
    assert endpoints_from_ip_output(text, "mesh0", 51820) == ("192.0.2.5:51820", "198.51.100.7:51820")


async def test_a_map_that_failed_to_apply_is_retried_until_it_works(tmp_path: Path) -> None:
    sd = registered_state(tmp_path, None)
    dp = BrokenDataplane(fail={5})
    agent = Agent(sd, config(), mgmt=Outage(), dataplane=dp)
    agent.cred = sd.load_credential()
    await agent.apply_map(netmap(4).to_dict())
    await agent._on_netmap(netmap(5).to_dict())  # noqa: SLF001 - the sync stream's entry point
    assert agent.netmap is not None and agent.netmap.serial == 4
    assert "nft refused" in (await agent.status_doc())["netmap_error"]
    dp.fail.clear()  # the transient problem goes away
    agent.map_retry_every = 1
    task = asyncio.create_task(agent._status_loop())  # noqa: SLF001
    try:
        async with asyncio.timeout(10):
            while agent.netmap.serial != 5:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert (await agent.status_doc())["netmap_error"] == ""
    # A retry never rolls back a newer map that arrived meanwhile.
    await agent.apply_map(netmap(7).to_dict())
    assert not await agent.apply_map(netmap(6).to_dict(), only_if_newer=True)
    assert agent.netmap.serial == 7


async def test_audit_batch_management_refuses_is_split_and_the_rest_delivered() -> None:
    """An event type management does not know must not block the queue forever."""
    from meshsshd.audit import AuthRefused, SessionStarted
    from meshsshd.mgmt_client import ManagementRejected

    delivered: list[dict] = []

    async def post(batch: list[dict]) -> None:
        if any(d["type"] == "auth.refused" for d in batch):
            raise ManagementRejected(400, "bad-request", "unknown event type")
        delivered.extend(batch)

    sink = ManagementAuditSink(post, batch_size=10, interval=0.01, max_backoff=0.05)
    sink.emit(SessionStarted(session_id="s1", identity="alice@example.com"))
    sink.emit(AuthRefused(reason="expired", local_user="alice"))
    sink.emit(SessionStarted(session_id="s2", identity="alice@example.com"))
    assert await sink.flush_once() == 3
    assert [d["session_id"] for d in delivered] == ["s1", "s2"]
    assert sink.rejected == 1 and not sink.queue


@pytest.mark.parametrize(("flags", "expected"), [
    pytest.param({}, True, id="default-on-as-openssh"),
    pytest.param({"disable_ssh_agent_forwarding": True}, False, id="disable-flag"),
])
def test_agent_forwarding_follows_the_up_flag(tmp_path: Path, flags: dict, expected: bool) -> None:
    from meshsshd.agent_map import base_settings
    from meshsshd.state import PeerFlags

    config = UpConfig(flags=PeerFlags.from_dict(flags))
    assert base_settings(StateDir(tmp_path), config, netmap(1)).agent_forwarding is expected


@pytest.mark.parametrize(("local", "in_map", "expected"), [
    pytest.param(True, True, True, id="both-on"),
    pytest.param(True, False, False, id="management-turns-it-off"),
    pytest.param(False, True, False, id="the-map-cannot-widen-the-peer-flag"),
])
def test_agent_forwarding_in_the_map_only_narrows(tmp_path: Path, local: bool, in_map: bool, expected: bool) -> None:
    from meshsshd.agent_map import base_settings
    from meshsshd.config import settings_from_netmap
    from meshsshd.state import PeerFlags

    doc = netmap(1).to_dict()
    assert "agent_forwarding" not in doc["ssh"]   # the default leaves the wire shape as it was
    if not in_map:
        doc["ssh"]["agent_forwarding"] = False
    parsed = NetworkMap.from_dict(doc)
    assert parsed.to_dict() == doc
    base = base_settings(StateDir(tmp_path), UpConfig(flags=PeerFlags(disable_ssh_agent_forwarding=not local)), parsed)
    assert settings_from_netmap(base, parsed).agent_forwarding is expected


def test_agent_forwarding_in_the_map_must_be_a_bool() -> None:
    doc = netmap(1).to_dict()
    doc["ssh"]["agent_forwarding"] = "no"
    with pytest.raises(ValueError, match="agent_forwarding"):
        NetworkMap.from_dict(doc)


class RecordingServer:
    """Stands in for MeshSSHServer: keeps the settings it was given."""

    served: list[Any] = []

    def __init__(self, settings: Any, audit: Any = None) -> None:
        self.settings = settings
        self.served.append(settings)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def apply(self, settings: Any) -> None:
        self.settings = settings


async def test_served_settings_fence_forwards_off_management(tmp_path: Path) -> None:
    """The management server's address is refused to -L/-D unless the map's permit_open
    names it; the map's permit_open reaches the server."""
    fenced = NetworkMap(serial=4, peer=PeerInfo(id="p1", name="a", fqdn="a.mesh", mesh_ip="127.77.0.2"),
                        network="127.77.0.0/16", ssh=SSHSection(enabled=True, permit_open=("*:5432",)))
    sd = registered_state(tmp_path, fenced)
    up = UpConfig(management_url="http://127.0.0.1:9", dataplane="none", flags=PeerFlags(allow_server_ssh=True))
    agent = Agent(sd, up, mgmt=Outage(), dataplane=NoDataplane(), server_factory=RecordingServer)
    RecordingServer.served.clear()
    assert await run_until(agent, lambda: bool(RecordingServer.served)) == 0
    settings = RecordingServer.served[0]
    assert settings.forward_protected == ("127.0.0.1:9",)
    assert settings.permit_open == ("*:5432",)


