"""MeshDataplane as a whole, in a throwaway namespace: up → apply → down, and a failed up
leaves nothing behind."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshsshd.dataplane._exec as ex
from meshsshd.dataplane import cleanup
from meshsshd.dataplane._mesh import MeshDataplane
from meshsshd.errors import DataplaneError
from meshsshd.netmap import FirewallRule, NetworkMap, PeerInfo
from meshsshd.state import StateDir
from tests.support import netns, require_tool

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture
def ns(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A namespace, with every data plane command of this process run inside it."""
    for tool in ("ip", "nft", "wg", "wireguard-go"):
        require_tool(tool)
    with netns("mstdp") as name:
        real = ex.run

        async def in_ns(argv, **kw):
            return await real(["ip", "netns", "exec", name, *argv], **kw)

        for mod in ("_nftables", "_wireguard", "_mesh"):
            monkeypatch.setattr(f"meshsshd.dataplane.{mod}.run", in_ns)
        yield name


OTHER_KEY = "hdoCKB1bbyr3x7i6sxIi3Ojp8GJYcPAOwL2ydRRYiRs="


def netmap(serial: int, rules: tuple[FirewallRule, ...] = ()) -> NetworkMap:
    me = PeerInfo(id="p1", name="a", fqdn="a", mesh_ip="100.64.0.1")
    other = PeerInfo(id="p2", name="b", fqdn="b", mesh_ip="100.64.0.2", wg_public_key=OTHER_KEY,
                     endpoints=("192.0.2.2:51820",))
    return NetworkMap(serial=serial, peer=me, network="100.64.0.0/24", peers=(me, other), firewall_rules=rules)


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True).stdout


def test_up_apply_down(ns: str, tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.wireguard_keypair()
    iface = f"mdp{ns[-6:]}"
    dp = MeshDataplane(iface, sd.wireguard_key, 51821)

    async def scenario() -> dict:
        await dp.up(netmap(1), True)
        await dp.apply(netmap(2, (FirewallRule(sources=("100.64.0.2",), ports=("22",)),)), True)
        st = await dp.status()
        return st

    st = asyncio.run(scenario())
    assert st["interface"] == iface and st["userspace"] is True and list(st["peers"]) == [OTHER_KEY]
    table = sh(ns, "nft", "list", "table", "inet", f"meshsshd_{iface}")
    assert "ip saddr 100.64.0.2 tcp dport { 22, 22022 } accept" in table
    assert "100.64.0.1/24" in sh(ns, "ip", "-o", "addr", "show", "dev", iface)
    removed = asyncio.run(cleanup(dp.record()))  # what `meshsshd down` does after a crash
    assert removed == [f"interface {iface}", f"nftables table inet meshsshd_{iface}"]
    assert iface not in sh(ns, "ip", "-o", "link")
    assert "meshsshd" not in sh(ns, "nft", "list", "ruleset")
    asyncio.run(dp.down())  # and down after that is harmless


def test_failed_up_leaves_no_table(ns: str, tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.wireguard_keypair()
    dp = MeshDataplane(f"mdq{ns[-6:]}", sd.wireguard_key, 51822)
    dp.wg.wireguard_go = str(tmp_path / "no-such-wireguard-go")  # failure injection
    with pytest.raises(DataplaneError, match="wireguard-go is not installed"):
        asyncio.run(dp.up(netmap(1), True))
    assert "meshsshd" not in sh(ns, "nft", "list", "ruleset")
