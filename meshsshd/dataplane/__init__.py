"""The data plane behind one small interface: `up`, `apply`, `down`, `status`.

    Dataplane (abstract)
    ├── NoDataplane        single-machine mode: loopback mesh addresses, nothing to set up
    └── MeshDataplane      WireGuard interface (kernel or wireguard-go) + nftables table

`make_dataplane()` picks one from `--dataplane auto|wireguard|none`; `cleanup()` removes
what a record (dataplane.json) says was created, for `meshsshd down` after a crash.
"""

from __future__ import annotations

import abc
import contextlib
import ipaddress
import os
from pathlib import Path
from typing import Any

from ..netmap import NetworkMap


class Dataplane(abc.ABC):
    """serve_ssh says whether the SSH server runs (and so whether port 22 is redirected)."""

    kind: str = ""

    @abc.abstractmethod
    async def up(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        """Create everything for the first map (replacing leftovers of a crash)."""

    @abc.abstractmethod
    async def apply(self, netmap: NetworkMap, serve_ssh: bool) -> None:
        """Move to a new map, changing only what differs."""

    @abc.abstractmethod
    async def down(self) -> None:
        """Remove everything `up` created; safe to call twice."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """{"kind", "interface"?, "peers": {wg public key: {"latest_handshake", ...}}}."""

    @abc.abstractmethod
    def record(self) -> dict[str, Any]:
        """What `cleanup()` needs to undo this data plane without the daemon."""


def resolve_kind(kind: str, network: str = "", euid: int | None = None) -> str:
    """auto → none for a loopback mesh network (single-machine mode) or without root,
    wireguard otherwise."""
    if kind != "auto":
        return kind
    with contextlib.suppress(ValueError):
        if network and ipaddress.ip_network(network, strict=False).is_loopback:
            return "none"
    return "wireguard" if (os.geteuid() if euid is None else euid) == 0 else "none"


def make_dataplane(kind: str, interface: str, private_key_file: Path, listen_port: int,
                   network: str = "") -> Dataplane:
    from ._none import NoDataplane

    kind = resolve_kind(kind, network)
    if kind == "none":
        return NoDataplane()
    if kind == "wireguard":
        from ._mesh import MeshDataplane

        return MeshDataplane(interface, private_key_file, listen_port)
    raise ValueError(f"unknown data plane {kind!r} (auto, wireguard or none)")


async def cleanup(record: dict[str, Any]) -> list[str]:
    """Undo a recorded data plane; returns what was removed (for `down` to report)."""
    if record.get("kind") != "wireguard":
        return []
    from ._mesh import MeshDataplane

    return await MeshDataplane.cleanup(record)


__all__ = ["Dataplane", "cleanup", "make_dataplane", "resolve_kind"]
