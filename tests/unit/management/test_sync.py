"""The sync hub in-process with a stand-in WebSocket: what is sent, when, in what order."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from meshmgmt.metrics import Registry
from meshmgmt.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord
from meshmgmt.sync import SyncHub


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
    await hub._send_map(stream, snapshot(4, port="70"), load=9)
    assert [m["netmap"]["serial"] for m in ws.sent] == [5]
    await hub._send_map(stream, replace(snapshot(6, port="91")), load=9)
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


class GatedSource:
    """Loads that read the snapshot when they start and return it when their gate opens,
    so a test can hold a recompute in flight while the store changes."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.gates: list[asyncio.Event] = []
        self.started = 0

    async def __call__(self) -> MeshState:
        snap = self.state
        self.started += 1
        if self.gates:
            await self.gates.pop(0).wait()
        return snap


C = PeerRecord(id="c", name="c", mesh_ip="100.64.0.4")


async def test_a_peer_attaching_during_a_recompute_gets_a_map_with_itself() -> None:
    """The loop clears `dirty` when its load starts; a stream attaching while that load
    is in flight must not be served the cached snapshot from before its registration
    (it was told "peer-deleted" and stopped for good: seen in CI with 13 peers)."""
    source = GatedSource(snapshot(1))
    hub = SyncHub(source, Registry())
    await hub._load()  # the cache: a and b
    hub.start()
    try:
        first, second = asyncio.Event(), asyncio.Event()
        source.gates = [first, second]
        hub.changed()  # some change: the loop starts loading snapshot 1 and waits
        await settle(hub)
        source.state = snapshot(2, peers=(A, B, C))
        hub.changed()  # c registers meanwhile
        first.set()  # the old load lands; the loop starts the next one and waits
        await settle(hub)
        ws = FakeWS()
        await hub.attach("c", ws)  # type: ignore[arg-type]
        assert [m.get("type") for m in ws.sent] == ["netmap"] and not ws.closed
        assert ws.sent[0]["netmap"]["serial"] == 2
        second.set()
        await settle(hub)
        assert not ws.closed
    finally:
        await hub.close()


async def test_a_load_from_before_a_stream_attached_never_tells_it_deleted() -> None:
    """The loop's load read the store before c registered and lands while c's own
    attach is still loading: it has no map for c, but that is no proof c was deleted."""
    source = GatedSource(snapshot(1))
    hub = SyncHub(source, Registry())
    await hub._load()
    hub.start()
    try:
        loop_load, attach_load, next_load = asyncio.Event(), asyncio.Event(), asyncio.Event()
        source.gates = [loop_load, attach_load, next_load]
        hub.changed()  # the loop starts loading snapshot 1 (no c) and waits
        await settle(hub)
        source.state = snapshot(2, peers=(A, B, C))
        hub.changed()  # c registers
        ws = FakeWS()
        attach = asyncio.create_task(hub.attach("c", ws))  # type: ignore[arg-type]
        await settle(hub)
        assert source.started == 3  # the cache's, the loop's and the attach's
        loop_load.set()  # the old snapshot lands first; the loop's next load waits
        await settle(hub)
        assert ws.sent == [] and not ws.closed
        attach_load.set()
        await attach
        assert [m["netmap"]["serial"] for m in ws.sent] == [2] and not ws.closed
        next_load.set()
    finally:
        await hub.close()


async def test_a_peer_missing_from_the_cache_is_looked_up_before_it_is_told_deleted() -> None:
    """A peer registered through another replica can attach here before that replica's
    NOTIFY arrives: the cache looks current but lacks it, so the hub loads afresh."""
    source = Source(snapshot(1))
    hub = SyncHub(source, Registry())
    await hub._load()
    source.state = snapshot(2, peers=(A, B, C))  # committed elsewhere; no changed() yet
    ws = FakeWS()
    await hub.attach("c", ws)  # type: ignore[arg-type]
    assert [m["netmap"]["serial"] for m in ws.sent] == [2] and not ws.closed
    source.state = snapshot(3, peers=(A, B))  # and a peer that really is gone is told so
    hub.changed()
    gone = FakeWS()
    await hub.attach("c", gone)  # type: ignore[arg-type]
    assert gone.sent[-1]["error"] == "peer-deleted" and gone.closed
    await hub.close()


async def test_a_stream_attaching_during_a_recompute_never_gets_the_stale_cache() -> None:
    """A policy change is being recomputed when a reconnects: its first map is the new
    one, not the cached map from before the change (a revoked rule, briefly back)."""
    source = GatedSource(snapshot(1, port="80"))
    hub = SyncHub(source, Registry())
    await hub._load()
    hub.start()
    try:
        gate = asyncio.Event()
        source.gates = [gate]
        source.state = snapshot(2, port="81")
        hub.changed()  # the loop starts loading snapshot 2 and waits
        await settle(hub)
        ws = FakeWS()
        await hub.attach("a", ws)  # type: ignore[arg-type]
        assert [m["netmap"]["firewall_rules"][0]["ports"] for m in ws.sent] == [["81"]]
        gate.set()
        await settle(hub)
        assert len(ws.sent) == 1
    finally:
        await hub.close()
