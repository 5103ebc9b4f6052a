"""WireGuard + nftables: the real mesh data plane (needs CAP_NET_ADMIN)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import DataplaneError
from ..netmap import NetworkMap
from . import Dataplane
from ._nftables import NftTable, check_interface_name, render_delete, table_name
from ._exec import run
from ._wireguard import WireGuardInterface


class MeshDataplane(Dataplane):
    kind = "wireguard"

    def __init__(self, interface: str, private_key_file: Path, listen_port: int) -> None:
        self.interface = check_interface_name(interface)
        self.wg = WireGuardInterface(interface, private_key_file, listen_port)
        self.nft = NftTable(interface)

    async def up(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        # Firewall first: the interface never exists without its default-deny table.
        try:
            await self.nft.apply(netmap, serve_ssh)
            await self.wg.create()
            await self.wg.set_address(netmap)
            await self.wg.apply_peers(netmap)
        except DataplaneError:
            with contextlib.suppress(DataplaneError):  # leave nothing half made
                await self.down()
            raise

    async def apply(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        await self.wg.set_address(netmap)
        await self.wg.apply_peers(netmap)
        await self.nft.apply(netmap, serve_ssh)

    async def down(self) -> None:
        await self.wg.delete()
        await self.nft.remove()

    async def status(self) -> dict[str, Any]:
        peers = await self.wg.peers() if await self.wg.exists() else {}
        return {
            "kind": self.kind,
            "interface": self.interface,
            "userspace": self.wg.userspace,
            "table": f"inet {self.nft.table}",
            "peers": {
                pub: {
                    "endpoint": p.endpoint,
                    "latest_handshake": p.latest_handshake,
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                }
                for pub, p in peers.items()
            },
        }

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "interface": self.interface, "table": self.nft.table}

    @staticmethod
    async def cleanup(record: dict[str, Any]) -> list[str]:
        removed: list[str] = []
        interface = check_interface_name(str(record.get("interface", "mesh0")))
        table = str(record.get("table") or table_name(interface))
        if (await run(["ip", "link", "show", "dev", interface], check=False)).returncode == 0:
            await WireGuardInterface(interface, Path("/dev/null"), 0).delete()
            removed.append(f"interface {interface}")
        if (await run(["nft", "list", "table", "inet", table], check=False)).returncode == 0:
            await run(["nft", "-f", "-"], stdin=render_delete(table))
            removed.append(f"nftables table inet {table}")
        return removed
