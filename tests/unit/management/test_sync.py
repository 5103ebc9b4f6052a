"""The sync hub in-process with a stand-in WebSocket: what is sent, when, in what order."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from management.metrics import Registry
from management.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord
from management.sync import SyncHub


class FakeWS:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def send_str(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def send_json(self, doc: dict[str, Any]) -> None:
        self.sent.append(doc)

    async def close(self, **_: Any) -> None:
        self.closed = True


A = PeerRecord(id="a", name="a", mesh_ip="100.64.0.2")
B = PeerRecord(id="b", name="b", mesh_ip="100.64.0.3")


def snapshot(serial: int, port: str = "80", peers: tuple[PeerRecord, ...] = (A, B)) -> MeshState:
    return MeshState(serial=serial, network="100.64.0.0/10", peers=peers,
                     groups=(GroupRecord(id="g", name="g", peer_ids=frozenset({"a", "b"})),),
                     policies=(PolicyRecord(id="p", name="p", rules=(RuleRecord(("g",), ("g",), "tcp", (port,)),)),))


class Source:
    """What the store would return: the test sets the next snapshot."""

    def __init__(self, state: MeshState) -> None:
        self.state = state

    async def __call__(self) -> MeshState:
        return self.state


async def settle(_hub: SyncHub) -> None:
    """Let the hub loop run (it reacts to `changed()` asynchronously)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_full_map_then_only_changes_then_deleted() -> None:
    source = Source(snapshot(1))
    hub = SyncHub(source, Registry())
    hub.start()
    try:
        ws = FakeWS()
        await hub.attach("a", ws)  # type: ignore[arg-type]
        assert [m["netmap"]["serial"] for m in ws.sent] == [1]

        source.state = snapshot(2)  # same content, newer serial: nothing to send
        hub.changed()
        await settle(hub)
        assert len(ws.sent) == 1

        source.state = snapshot(3, port="81")
        hub.changed()
        await settle(hub)
        assert [m["netmap"]["serial"] for m in ws.sent] == [1, 3]
        assert ws.sent[-1]["netmap"]["firewall_rules"][0]["ports"] == ["81"]

        source.state = snapshot(4, port="82", peers=(B,))  # "a" was deleted
        hub.changed()
        await settle(hub)
        assert ws.sent[-1] == {"type": "error", "error": "peer-deleted",
                               "message": "this peer was deleted from the mesh; register again"}
        assert ws.closed
    finally:
        await hub.close()


async def test_an_older_snapshot_never_overtakes_a_newer_one() -> None:
    source = Source(snapshot(5, port="90"))
    hub = SyncHub(source, Registry())
    ws = FakeWS()
    stream = await hub.attach("a", ws)  # type: ignore[arg-type]
    # A slow recompute from an older snapshot finishing late must not go out.
    await hub._send_map(stream, snapshot(4, port="70"))
    assert [m["netmap"]["serial"] for m in ws.sent] == [5]
    await hub._send_map(stream, replace(snapshot(6, port="91")))
    assert [m["netmap"]["serial"] for m in ws.sent] == [5, 6]
    hub.detach(stream)
    assert hub.connected_peers == set()
    await hub.close()


async def test_lost_notification_is_caught_by_the_serial_poll() -> None:
    source = Source(snapshot(1))
    serial = {"value": 1}

    async def current() -> int:
        return serial["value"]

    hub = SyncHub(source, Registry(), current_serial=current, poll_interval=0.05)
    hub.start()
    try:
        ws = FakeWS()
        await hub.attach("a", ws)  # type: ignore[arg-type]
        source.state = snapshot(2, port="99")
        serial["value"] = 2  # changed in the store, but nobody called hub.changed()
        for _ in range(100):
            if len(ws.sent) == 2:
                break
            await asyncio.sleep(0.02)
        assert ws.sent[-1]["netmap"]["serial"] == 2
    finally:
        await hub.close()
