"""WireGuard: dump parsing and incremental peer changes (pure), then wireguard-go for real."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from meshsshd.dataplane._wireguard import KEEPALIVE, WgPeer, desired_peers, interface_address, parse_dump, peer_changes
from meshsshd.netmap import NetworkMap, PeerInfo
from meshsshd.state import StateDir
from tests.support import netns, require_tool

A, B, C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="

DUMP = (
    "privkey=\tpubkey=\t51820\toff\n"
    f"{A}\t(none)\t192.0.2.2:51820\t100.64.0.2/32\t1700000000\t92\t180\t25\n"
    f"{B}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_parse_dump() -> None:
    peers = parse_dump(DUMP)
    assert peers[A] == WgPeer(A, "192.0.2.2:51820", ("100.64.0.2/32",), 25, 1700000000, 92, 180)
    assert peers[B] == WgPeer(B)


def want(pub: str, ip: str, endpoint: str = "") -> WgPeer:
    return WgPeer(pub, endpoint, (f"{ip}/32",), KEEPALIVE)


@pytest.mark.parametrize(
    ("current", "desired", "args"),
    [
        pytest.param({}, {}, [], id="nothing"),
        pytest.param({}, {A: want(A, "100.64.0.2", "192.0.2.2:51820")},
                     ["peer", A, "endpoint", "192.0.2.2:51820", "allowed-ips", "100.64.0.2/32",
                      "persistent-keepalive", "25"], id="add"),
        pytest.param({A: want(A, "100.64.0.2", "192.0.2.2:51820")}, {A: want(A, "100.64.0.2", "192.0.2.2:51820")},
                     [], id="unchanged-peer-untouched"),
        pytest.param({A: want(A, "100.64.0.2", "198.51.100.7:4000")}, {A: want(A, "100.64.0.2")},
                     [], id="roamed-endpoint-kept-when-map-has-none"),
        pytest.param({A: want(A, "100.64.0.2", "192.0.2.2:51820")}, {A: want(A, "100.64.0.9", "192.0.2.2:51820")},
                     ["peer", A, "endpoint", "192.0.2.2:51820", "allowed-ips", "100.64.0.9/32",
                      "persistent-keepalive", "25"], id="ip-changed"),
        pytest.param({A: want(A, "100.64.0.2"), B: want(B, "100.64.0.3")}, {B: want(B, "100.64.0.3")},
                     ["peer", A, "remove"], id="remove"),
    ],
)
def test_peer_changes(current: dict, desired: dict, args: list[str]) -> None:
    assert peer_changes(current, desired) == args


def netmap(peers: tuple[PeerInfo, ...]) -> NetworkMap:
    me = PeerInfo(id="p1", name="a", fqdn="a", mesh_ip="100.64.0.1", wg_public_key=C)
    return NetworkMap(serial=3, peer=me, network="100.64.0.0/10", peers=(me, *peers))


def test_desired_peers_skip_self_and_keyless() -> None:
    m = netmap((PeerInfo(id="p2", name="b", fqdn="b", mesh_ip="100.64.0.2", wg_public_key=A,
                         endpoints=("192.0.2.2:51820", "10.0.0.2:51820")),
                PeerInfo(id="p3", name="c", fqdn="c", mesh_ip="100.64.0.3")))
    assert desired_peers(m) == {A: want(A, "100.64.0.2", "192.0.2.2:51820")}
    assert interface_address(m) == "100.64.0.1/10"


@pytest.mark.root
@pytest.mark.netns
def test_wireguard_go_interface_in_a_namespace(tmp_path: Path) -> None:
    """Create (userspace, this kernel has no module), configure incrementally, delete."""
    require_tool("wireguard-go")
    require_tool("wg")
    import meshsshd.dataplane._exec as ex
    import meshsshd.dataplane._wireguard as wgmod

    sd = StateDir(tmp_path)
    sd.wireguard_keypair()
    (tmp_path / "b").mkdir()
    _, pub_b = StateDir(tmp_path / "b").wireguard_keypair()
    with netns("mstwg") as ns:
        iface = f"mstwg{ns[-4:]}"
        orig = wgmod.run

        async def in_ns(argv, **kw):
            if argv[0] in ("ip", "wg") or argv[0].endswith("wireguard-go"):
                argv = ["ip", "netns", "exec", ns, *argv]
            return await ex.run(argv, **kw)

        async def scenario() -> tuple[dict, dict, bool]:
            wgmod.run = in_ns
            try:
                dev = wgmod.WireGuardInterface(iface, sd.wireguard_key, 51999)
                await dev.create()
                await dev.create()  # a second start replaces the leftover interface
                peer = PeerInfo(id="p2", name="b", fqdn="b", mesh_ip="100.64.0.2", wg_public_key=pub_b,
                                endpoints=("192.0.2.2:51820",))
                await dev.set_address(netmap((peer,)))
                first = await dev.apply_peers(netmap((peer,)))
                again = await dev.apply_peers(netmap((peer,)))
                assert again == []
                after_add = await dev.peers()
                await dev.apply_peers(netmap(()))
                after_remove = await dev.peers()
                assert first[:2] == ["peer", pub_b]
                await dev.delete()
                return after_add, after_remove, await dev.exists()
            finally:
                wgmod.run = orig

        after_add, after_remove, exists = asyncio.run(scenario())
        assert after_add[pub_b].allowed_ips == ("100.64.0.2/32",)
        assert after_add[pub_b].endpoint == "192.0.2.2:51820"
        assert after_remove == {}
        assert not exists
        addr = subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
        assert iface not in addr
        assert not Path(f"/var/run/wireguard/{iface}.sock").exists()
