"""A real mesh in network namespaces: WireGuard (wireguard-go) overlay, nftables, port 22.

    hub namespace: bridge 192.0.2.1/24, `meshmgmt serve` on 192.0.2.1
    A, B, C:       eth0 192.0.2.1x/24 (veth into the bridge), `meshsshd up --dataplane
                   wireguard` with its own interface name (wireguard-go's sockets in
                   /var/run/wireguard are shared by all namespaces)

Policies: A (with the bot user) may SSH to B; C may reach B on tcp/8080 only, so C and B
are WireGuard peers and what stops C's SSH is B's nftables table. Clients run in threads
that joined a namespace (peerkit.run_in_netns): asyncssh with a token from management.
Everything is torn down by the namespace context managers, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tests.support import netns, os_user, require_root, require_tool

from .peerkit import Identity, Management, Peer, host_keys_from_map, run_in_netns

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(300)]

UNDERLAY = "192.0.2"
NETWORK = "100.64.0.0/24"


@dataclass
class NetMesh:
    mgmt: Management
    peers: dict[str, Peer]
    ns: dict[str, str]
    iface: dict[str, str]
    bot: Identity
    user: str
    c_policy: str

    def ip(self, name: str) -> str:
        return self.peers[name].status()["mesh_ip"]

    def peer_id(self, name: str) -> str:
        return self.peers[name].status()["peer_id"]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def netmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetMesh]:
    require_root()
    for tool in ("ip", "nft", "wg", "wireguard-go"):
        require_tool(tool)
    root = tmp_path_factory.mktemp("netmesh")
    tag = secrets.token_hex(2)
    peers: dict[str, Peer] = {}
    mgmt: Management | None = None
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(netns("msthub"))
        ns = {name: stack.enter_context(netns(f"mst{name}")) for name in "abc"}
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "addr", "add", f"{UNDERLAY}.1/24", "dev", "br0")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for i, (name, space) in enumerate(ns.items()):
            sh("ip", "-n", hub, "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns", space)
            sh("ip", "-n", hub, "link", "set", f"v{name}", "master", "br0", "up")
            sh("ip", "-n", space, "addr", "add", f"{UNDERLAY}.{11 + i}/24", "dev", "eth0")
            sh("ip", "-n", space, "link", "set", "eth0", "up")
        try:
            mgmt = Management(root / "mgmt", NETWORK, host=f"{UNDERLAY}.1", netns=hub)
            mgmt.init()
            mgmt.start()
            user = stack.enter_context(os_user("mmn")).pw_name
            key = mgmt.api("POST", "/api/setup-keys", {"name": "netns", "reusable": True})["key"]
            iface = {name: f"mw{name}{tag}" for name in ns}
            for i, name in enumerate(ns):
                p = Peer(f"peer-{name}", root / name / "state", mgmt.url, netns=ns[name], extra=[
                    "--dataplane", "wireguard", "--interface", iface[name], "--wireguard-port", "51820",
                    "--endpoint", f"{UNDERLAY}.{11 + i}:51820"])
                p.state_dir.parent.mkdir(parents=True)
                peers[name] = p
                p.start(key, ["--allow-server-ssh"])
            for p in peers.values():
                p.wait(lambda s: s.get("netmap_serial") is not None, what="first map")
            bot = Identity(mgmt, "bot@example.com")
            mgmt.api("POST", "/api/groups", {"name": "admins", "peers": ["peer-a"], "users": [bot.email]})
            mgmt.api("POST", "/api/groups", {"name": "web", "peers": ["peer-c"]})
            mgmt.api("POST", "/api/groups", {"name": "servers", "peers": ["peer-b"]})
            mgmt.api("POST", "/api/policies", {"name": "ssh", "enabled": True, "rules": [
                {"sources": ["admins"], "destinations": ["servers"], "protocol": "ssh", "local_users": [user]}]})
            c_policy = mgmt.api("POST", "/api/policies", {"name": "web-8080", "enabled": True, "rules": [
                {"sources": ["web"], "destinations": ["servers"], "protocol": "tcp", "ports": ["8080"]}]})["id"]
            peers["b"].wait(lambda s: s["ssh"]["running"] and len(s["peers"]) == 2, what="B serving, 2 peers")
            for name in "ac":  # B in their maps too: until then their packets to B have no peer
                peers[name].wait(lambda s: any(p["name"] == "peer-b" for p in s["peers"]),
                                 what=f"{name.upper()} with B as a WireGuard peer")
            yield NetMesh(mgmt, peers, ns, iface, bot, user, c_policy)
        except BaseException:
            for p in peers.values():
                print(f"---- {p.name}\n{p.output()[-5000:]}")
            if mgmt is not None and mgmt.proc is not None:
                print("---- mgmt\n" + mgmt.proc.output()[-3000:])
            raise
        finally:
            for p in peers.values():
                p.stop()
            if mgmt is not None:
                mgmt.stop()


def tcp_connects(space: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    def attempt() -> bool:
        try:
            with socket.create_connection((ip, port), timeout=timeout):
                return True
        except OSError:
            return False

    return bool(run_in_netns(space, attempt))


def ssh_in(m: NetMesh, src: str, dst: str, port: int, command: str) -> str:
    """Log in from namespace `src` to peer `dst` with a fresh SSH token, host key from the map."""
    token = m.bot.ssh_token(m.peer_id(dst))
    keys = [asyncssh.import_public_key(k) for k in host_keys_from_map(m.peers[src], m.peer_id(dst))]

    async def go() -> str:
        async with asyncssh.connect(m.ip(dst), port, username=m.user, password=token,
                                    known_hosts=(keys, [], []), preferred_auth="password",
                                    connect_timeout=20) as conn:
            return str((await conn.run(command, check=True, timeout=15)).stdout)

    try:
        return str(run_in_netns(m.ns[src], asyncio.run, go()))
    except (OSError, asyncssh.Error) as exc:
        raise AssertionError(f"ssh {src} → {dst}:{port} failed ({exc!r}); what each side saw:\n"
                             + mesh_report(m, src, dst)) from exc


def mesh_report(m: NetMesh, *names: str) -> str:
    """Each peer's WireGuard view, nftables and log tail: what a failed login needs to be told apart."""
    parts = []
    for name in names:
        wg = subprocess.run(["ip", "netns", "exec", m.ns[name], "wg", "show", m.iface[name]],
                            capture_output=True, text=True).stdout
        nft = subprocess.run(["ip", "netns", "exec", m.ns[name], "nft", "list", "ruleset"],
                             capture_output=True, text=True).stdout
        parts.append(f"---- {name}: wg\n{wg}\n---- {name}: nft\n{nft}\n---- {name}: log\n"
                     f"{m.peers[name].output()[-3000:]}")
    return "\n".join(parts)


def test_wireguard_overlay_with_handshakes(netmesh: NetMesh) -> None:
    m = netmesh
    for name in "abc":
        dump = sh("ip", "netns", "exec", m.ns[name], "wg", "show", m.iface[name], "dump")
        assert dump.split("\n")[0].split("\t")[2] == "51820"
        addr = sh("ip", "-n", m.ns[name], "-o", "addr", "show", "dev", m.iface[name])
        assert f"{m.ip(name)}/24" in addr
    b_peers = sh("ip", "netns", "exec", m.ns["b"], "wg", "show", m.iface["b"], "allowed-ips")
    assert f"{m.ip('a')}/32" in b_peers and f"{m.ip('c')}/32" in b_peers
    st = m.peers["b"].cli("status")
    assert st.returncode == 0 and "wireguard-go" in st.stdout and m.iface["b"] in st.stdout


def test_a_logs_into_b_on_22_and_22022(netmesh: NetMesh) -> None:
    m = netmesh
    for port in (22, 22022):
        out = ssh_in(m, "a", "b", port, "id -un; echo $SSH_CONNECTION")
        user, conn = out.split("\n")[:2]
        assert user == m.user
        src_ip, _, dst_ip, dst_port = conn.split()
        assert (src_ip, dst_ip, dst_port) == (m.ip("a"), m.ip("b"), "22022")
    # The handshake shows in `meshsshd status`.
    m.peers["b"].wait(lambda s: any(p["name"] == "peer-a" and p["latest_handshake"] for p in s["peers"]),
                      what="a handshake with A in status")
    assert "handshake never" not in m.peers["b"].cli("status").stdout.split("peer-a", 1)[1].split("\n")[0]


def test_c_is_dropped_by_nftables_until_a_policy_opens_it(netmesh: NetMesh) -> None:
    m = netmesh
    b_ip = m.ip("b")
    # C reaches B through WireGuard (port 8080 is allowed; nothing listens: refused, not dropped)...
    assert not tcp_connects(m.ns["c"], b_ip, 8080, timeout=3)
    t0 = time.monotonic()
    tcp_connects(m.ns["c"], b_ip, 8080, timeout=3)
    assert time.monotonic() - t0 < 2.5  # an RST came back: the overlay works
    # ...but SSH is dropped by B's table: the connection attempt times out.
    t0 = time.monotonic()
    assert not tcp_connects(m.ns["c"], b_ip, 22022, timeout=1.5)
    assert not tcp_connects(m.ns["c"], b_ip, 22, timeout=1.5)
    assert time.monotonic() - t0 >= 2.9
    table = sh("ip", "netns", "exec", m.ns["b"], "nft", "list", "table", "inet", f"meshsshd_{m.iface['b']}")
    assert "dnat ip to" in table and f'iifname "{m.iface["b"]}"' in table
    # Opening: a policy change reaches B's firewall within 2 s.
    rules = [{"sources": ["web"], "destinations": ["servers"], "protocol": "tcp", "ports": ["8080", "22"]}]
    m.mgmt.api("PUT", f"/api/policies/{m.c_policy}", {"name": "web-8080", "rules": rules})
    opened = _time_until(lambda: tcp_connects(m.ns["c"], b_ip, 22, timeout=0.3))
    print(f"opened after {opened:.2f}s")
    assert opened < 2.0
    # Closing again, also within 2 s.
    rules[0]["ports"] = ["8080"]
    m.mgmt.api("PUT", f"/api/policies/{m.c_policy}", {"name": "web-8080", "rules": rules})
    closed = _time_until(lambda: not tcp_connects(m.ns["c"], b_ip, 22, timeout=0.3))
    print(f"closed after {closed:.2f}s")
    assert closed < 2.0


def _time_until(cond, limit: float = 10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


def test_down_leaves_no_interface_table_or_rule(netmesh: NetMesh) -> None:
    m = netmesh
    for name in "abc":
        res = m.peers[name].cli("down")
        assert res.returncode == 0, res.stderr
        assert "stopped meshsshd" in res.stdout
        links = sh("ip", "-n", m.ns[name], "-o", "link")
        assert m.iface[name] not in links
        assert "meshsshd" not in sh("ip", "netns", "exec", m.ns[name], "nft", "list", "ruleset")
        assert not Path(f"/var/run/wireguard/{m.iface[name]}.sock").exists()
        assert m.peers[name].status()["state"] == "stopped"
    # Nothing of ours is left running in the peer namespaces (wireguard-go ended with its link).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        sh("ip", "netns", "pids", m.ns[n]).strip() for n in "abc"
    ):
        time.sleep(0.1)
    assert not any(sh("ip", "netns", "pids", m.ns[n]).strip() for n in "abc")


def test_down_after_a_crash_removes_what_the_daemon_left(netmesh: NetMesh) -> None:
    m = netmesh
    p = m.peers["a"]
    p.start()  # flags persisted: no setup key, no options
    p.wait(lambda s: s.get("pid") and s.get("state") in ("ssh-off", "serving"), what="running again")
    assert m.iface["a"] in sh("ip", "-n", m.ns["a"], "-o", "link")
    assert p.proc is not None
    os.kill(p.proc.pid, signal.SIGKILL)  # a crash of the daemon alone: nothing cleaned up
    p.proc.popen.wait(10)
    assert m.iface["a"] in sh("ip", "-n", m.ns["a"], "-o", "link")
    res = p.cli("down")
    assert res.returncode == 0, res.stderr
    assert "removed interface" in res.stdout and "removed nftables table" in res.stdout
    assert m.iface["a"] not in sh("ip", "-n", m.ns["a"], "-o", "link")
    assert "meshsshd" not in sh("ip", "netns", "exec", m.ns["a"], "nft", "list", "ruleset")
    assert p.cli("status").returncode == 3


def test_restart_with_another_interface_removes_the_crashed_runs_leftovers(netmesh: NetMesh) -> None:
    m = netmesh
    p = m.peers["a"]
    p.start()
    p.wait(lambda s: s.get("pid") and s.get("state") in ("ssh-off", "serving"), what="running")
    assert p.proc is not None
    os.kill(p.proc.pid, signal.SIGKILL)
    p.proc.popen.wait(10)
    old, new = m.iface["a"], m.iface["a"].replace("mwa", "mwz")
    p.start(flags=["--interface", new])
    p.wait(lambda s: s.get("pid") and s.get("dataplane", {}).get("interface") == new, what="on the new interface")
    links = sh("ip", "-n", m.ns["a"], "-o", "link")
    assert new in links and old not in links
    tables = sh("ip", "netns", "exec", m.ns["a"], "nft", "list", "tables")
    assert f"meshsshd_{new}" in tables and f"meshsshd_{old}" not in tables
    assert p.cli("down").returncode == 0
    assert new not in sh("ip", "-n", m.ns["a"], "-o", "link")
    assert "meshsshd" not in sh("ip", "netns", "exec", m.ns["a"], "nft", "list", "ruleset")
