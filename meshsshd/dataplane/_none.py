"""Single-machine mode: no WireGuard, no nftables.

Every peer has a loopback mesh address (management `--network 127.77.0.0/16`); Linux
routes all of 127/8 to `lo`, so the SSH server can listen on it with no setup and the
client reaches it by binding its own peer's address as the source. The checks here keep
a map with a routable address from being served in a mode that cannot route it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..errors import DataplaneError
from ..netmap import NetworkMap
from . import Dataplane


class NoDataplane(Dataplane):
    kind = "none"

    def __init__(self) -> None:
        self._netmap: NetworkMap | None = None

    def _check(self, netmap: NetworkMap) -> None:
        if not ipaddress.ip_address(netmap.peer.mesh_ip).is_loopback:
            raise DataplaneError(
                f"--dataplane none needs a loopback mesh network, but this peer got "
                f"{netmap.peer.mesh_ip}; start management with --network 127.77.0.0/16"
            )

    async def up(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        self._check(netmap)
        self._netmap = netmap

    async def apply(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        self._check(netmap)
        self._netmap = netmap

    async def down(self) -> None:
        self._netmap = None

    async def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "peers": {}}

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind}
