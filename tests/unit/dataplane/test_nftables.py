"""nftables: the rendered script (pure, table-driven) and the real thing in a namespace."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from meshsshd.dataplane._nftables import NftTable, render_delete, render_ruleset, table_name
from meshsshd.netmap import FirewallRule, NetworkMap, PeerInfo
from tests.support import netns, require_tool


def nm(*rules: FirewallRule, mesh_ip: str = "100.64.0.1") -> NetworkMap:
    return NetworkMap(
        serial=1, peer=PeerInfo(id="p1", name="a", fqdn="a.mesh", mesh_ip=mesh_ip),
        network="100.64.0.0/10", firewall_rules=rules,
    )


def mesh_in_rules(script: str) -> list[str]:
    lines = [l.strip() for l in script.splitlines()]
    start = lines.index("chain mesh_in {") + 3  # after established / invalid
    end = lines.index("drop", start)
    return lines[start:end]


@pytest.mark.parametrize(
    ("rule", "serve", "expect"),
    [
        pytest.param(FirewallRule(sources=("100.64.0.2",), ports=("22",)), True,
                     ["ip saddr { 100.64.0.2/32 } tcp dport { 22, 22022 } accept"], id="ssh-22-also-opens-22022"),
        pytest.param(FirewallRule(sources=("100.64.0.2",), ports=("22",)), False,
                     ["ip saddr { 100.64.0.2/32 } tcp dport { 22 } accept"], id="no-redirect-no-22022"),
        pytest.param(FirewallRule(sources=("100.64.0.2",), ports=("1-100",)), True,
                     ["ip saddr { 100.64.0.2/32 } tcp dport { 1-100, 22022 } accept"], id="range-covering-22"),
        pytest.param(FirewallRule(sources=("100.64.0.2",), ports=("22000-23000",)), True,
                     ["ip saddr { 100.64.0.2/32 } tcp dport { 22000-23000 } accept"], id="range-already-has-22022"),
        pytest.param(FirewallRule(sources=("100.64.0.0/24", "fd7a::5"), protocol="all"), True,
                     ["ip saddr { 100.64.0.0/24 } accept", "ip6 saddr { fd7a::5/128 } accept"], id="all-two-families"),
        pytest.param(FirewallRule(sources=(), protocol="icmp"), True,
                     ["meta l4proto { icmp, ipv6-icmp } accept"], id="icmp-any-source"),
        pytest.param(FirewallRule(sources=("100.64.0.3",), protocol="udp"), True,
                     ["ip saddr { 100.64.0.3/32 } meta l4proto udp accept"], id="udp-every-port"),
    ],
)
def test_rule_rendering(rule: FirewallRule, serve: bool, expect: list[str]) -> None:
    assert mesh_in_rules(render_ruleset("meshsshd", "mesh0", nm(rule), serve)) == expect


def test_no_rules_is_default_deny_and_redirect_only_while_serving() -> None:
    script = render_ruleset("meshsshd", "mesh0", nm(), True)
    assert mesh_in_rules(script) == []
    assert 'iifname "mesh0" jump mesh_in' in script
    assert 'iifname "mesh0" ip daddr 100.64.0.1 tcp dport 22 dnat ip to 100.64.0.1:22022' in script
    assert "dnat" not in render_ruleset("meshsshd", "mesh0", nm(), False)


def test_script_replaces_table_in_one_transaction() -> None:
    lines = render_ruleset("meshsshd_wg1", "wg1", nm(), True).splitlines()
    assert lines[:3] == ["table inet meshsshd_wg1 {}", "delete table inet meshsshd_wg1", "table inet meshsshd_wg1 {"]
    assert render_delete("t") == "table inet t {}\ndelete table inet t\n"


@pytest.mark.parametrize(("iface", "table"), [("mesh0", "meshsshd"), ("wg-a.1", "meshsshd_wg_a_1")])
def test_table_names(iface: str, table: str) -> None:
    assert table_name(iface) == table


@pytest.mark.parametrize("bad", ["", "x" * 16, 'a"b', "a b", "a;b"])
def test_interface_names_that_could_inject_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        render_ruleset("meshsshd", bad, nm(), True)


@pytest.mark.root
def test_apply_in_a_namespace_replaces_stale_table_and_removes_cleanly() -> None:
    nft = require_tool("nft")
    with netns("mstnft") as ns:
        def sh(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)

        # A stale table from a "crash" with a rule we must not keep.
        stale = "table inet meshsshd_wgt { chain x { type filter hook input priority 0; drop; }\n}\n"
        assert subprocess.run(["ip", "netns", "exec", ns, nft, "-f", "-"], input=stale, text=True).returncode == 0

        async def scenario() -> list[str]:
            import meshsshd.dataplane._nftables as mod

            table = NftTable("wgt", nft=nft)
            outs = []
            orig_run = mod.run

            async def in_ns(argv, **kw):  # run inside the namespace
                return await orig_run(["ip", "netns", "exec", ns, *argv], **kw)

            mod.run = in_ns
            try:
                rule = FirewallRule(sources=("100.64.0.2",), ports=("22",))
                assert await table.apply(nm(rule), True)
                outs.append(sh(nft, "list", "table", "inet", "meshsshd_wgt").stdout)
                assert not await table.apply(nm(rule), True)  # same map: nothing to do
                assert await table.apply(nm(), False)
                outs.append(sh(nft, "list", "table", "inet", "meshsshd_wgt").stdout)
                await table.remove()
                outs.append(sh(nft, "list", "ruleset").stdout)
            finally:
                mod.run = orig_run
            return outs

        first, second, final = asyncio.run(scenario())
        assert "chain x" not in first and "dnat ip to 100.64.0.1:22022" in first
        assert "tcp dport { 22, 22022 } accept" in first
        assert "dnat" not in second and "22022" not in second
        assert "meshsshd" not in final


@pytest.mark.parametrize(
    ("kind", "network", "euid", "expect"),
    [
        pytest.param("auto", "127.77.0.0/16", 0, "none", id="loopback-network-means-single-machine"),
        pytest.param("auto", "100.64.0.0/10", 0, "wireguard", id="root-real-network"),
        pytest.param("auto", "100.64.0.0/10", 1000, "none", id="no-root"),
        pytest.param("auto", "", 0, "wireguard", id="unknown-network-root"),
        pytest.param("wireguard", "127.77.0.0/16", 0, "wireguard", id="explicit-wins"),
    ],
)
def test_auto_dataplane_choice(kind: str, network: str, euid: int, expect: str) -> None:
    from meshsshd.dataplane import resolve_kind

    assert resolve_kind(kind, network, euid) == expect
