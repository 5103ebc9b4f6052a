"""The WireGuard interface: kernel module when the kernel has it, else `wireguard-go`.

Creation: `ip link add <if> type wireguard`; if the kernel says "Unknown device type",
`wireguard-go <if>` (it daemonises and answers on /var/run/wireguard/<if>.sock). Either
way the interface is then configured with `wg set` exactly alike, and removed with
`ip link del` (wireguard-go exits when its interface goes).

Peers are applied incrementally: `wg show <if> dump` gives what is configured,
`peer_changes()` (pure) computes one `wg set` argument list that adds, updates and removes
only what differs, so an unchanged peer keeps its session and handshake.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataplaneError
from ..netmap import NetworkMap
from ._exec import run

KEEPALIVE = 25
WG_RUN_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class WgPeer:
    """One peer as `wg` sees it (the subset we set, plus what we report)."""

    public_key: str
    endpoint: str = ""
    allowed_ips: tuple[str, ...] = ()
    keepalive: int = 0
    latest_handshake: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0


def parse_dump(text: str) -> dict[str, WgPeer]:
    """`wg show <if> dump` → peers by public key (the first line is the interface)."""
    peers: dict[str, WgPeer] = {}
    for line in text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 8:
            continue
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols[:8]
        peers[pub] = WgPeer(
            public_key=pub,
            endpoint="" if endpoint == "(none)" else endpoint,
            allowed_ips=() if allowed == "(none)" else tuple(sorted(allowed.split(","))),
            keepalive=0 if keepalive == "off" else int(keepalive),
            latest_handshake=int(handshake),
            rx_bytes=int(rx),
            tx_bytes=int(tx),
        )
    return peers


def desired_peers(netmap: NetworkMap) -> dict[str, WgPeer]:
    """The map's peers that have a WireGuard key, each allowed exactly its mesh IP."""
    out: dict[str, WgPeer] = {}
    for p in netmap.peers:
        if not p.wg_public_key or p.id == netmap.peer.id:
            continue
        ip = ipaddress.ip_address(p.mesh_ip)
        out[p.wg_public_key] = WgPeer(
            public_key=p.wg_public_key,
            endpoint=p.endpoints[0] if p.endpoints else "",
            allowed_ips=(f"{ip}/{ip.max_prefixlen}",),
            keepalive=KEEPALIVE,
        )
    return out


def peer_changes(current: dict[str, WgPeer], desired: dict[str, WgPeer]) -> list[str]:
    """Arguments after `wg set <if>` that turn `current` into `desired`; [] when equal.

    An endpoint is set only when the map names one, so a peer whose endpoint WireGuard
    learned by roaming is not reset to nothing.
    """
    args: list[str] = []
    for pub in sorted(set(current) - set(desired)):
        args += ["peer", pub, "remove"]
    for pub in sorted(desired):
        want = desired[pub]
        have = current.get(pub)
        if (
            have is not None
            and have.allowed_ips == want.allowed_ips
            and have.keepalive == want.keepalive
            and (not want.endpoint or have.endpoint == want.endpoint)
        ):
            continue
        args += ["peer", pub]
        if want.endpoint:
            args += ["endpoint", want.endpoint]
        args += ["allowed-ips", ",".join(want.allowed_ips), "persistent-keepalive", str(want.keepalive)]
    return args


def interface_address(netmap: NetworkMap) -> str:
    """"100.64.0.1/10": the mesh IP with the network's prefix, so the route comes with it."""
    net = ipaddress.ip_network(netmap.network, strict=False)
    return f"{netmap.peer.mesh_ip}/{net.prefixlen}"


class WireGuardInterface:
    def __init__(self, interface: str, private_key_file: Path, listen_port: int,
                 wireguard_go: str | None = None) -> None:
        self.interface = interface
        self.private_key_file = private_key_file
        self.listen_port = listen_port
        self.wireguard_go = wireguard_go or shutil.which("wireguard-go") or "/usr/bin/wireguard-go"
        self.userspace = False
        self._address: str | None = None

    async def exists(self) -> bool:
        res = await run(["ip", "link", "show", "dev", self.interface], check=False)
        return res.returncode == 0

    async def create(self) -> None:
        """Create (replacing a stale one from a crash) and bring up the bare interface."""
        if await self.exists():
            await self.delete()
        res = await run(["ip", "link", "add", self.interface, "type", "wireguard"], check=False)
        if res.returncode != 0:
            await self._start_userspace()
        await run(["wg", "set", self.interface, "private-key", str(self.private_key_file),
                   "listen-port", str(self.listen_port)])
        await run(["ip", "link", "set", "dev", self.interface, "up"])

    async def _start_userspace(self) -> None:
        if not os.path.exists(self.wireguard_go):
            raise DataplaneError(
                "the kernel has no WireGuard module and wireguard-go is not installed",
            )
        sock = WG_RUN_DIR / f"{self.interface}.sock"
        if sock.exists():  # left by a wireguard-go that was killed together with its link
            sock.unlink()
        res = await run([self.wireguard_go, self.interface], check=False)
        if res.returncode != 0:
            raise DataplaneError(f"wireguard-go {self.interface} failed: {res.stderr.strip()[:300]}")
        for _ in range(100):  # the daemonised child opens its UAPI socket a moment later
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        else:
            raise DataplaneError(f"wireguard-go did not open {sock}")
        self.userspace = True

    async def set_address(self, netmap: NetworkMap) -> None:
        address = interface_address(netmap)
        if address == self._address:
            return
        await run(["ip", "address", "flush", "dev", self.interface])
        await run(["ip", "address", "add", address, "dev", self.interface])
        self._address = address

    async def peers(self) -> dict[str, WgPeer]:
        res = await run(["wg", "show", self.interface, "dump"])
        return parse_dump(res.stdout)

    async def apply_peers(self, netmap: NetworkMap) -> list[str]:
        args = peer_changes(await self.peers(), desired_peers(netmap))
        if args:
            await run(["wg", "set", self.interface, *args])
        return args

    async def delete(self) -> None:
        await run(["ip", "link", "del", "dev", self.interface], check=False)
        sock = WG_RUN_DIR / f"{self.interface}.sock"
        for _ in range(40):  # wireguard-go notices the link is gone and removes its socket
            if not sock.exists():
                break
            await asyncio.sleep(0.05)
        self._address = None
