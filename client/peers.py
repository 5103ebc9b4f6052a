"""Which peer does `host` mean, and which host keys may it present?

The peer list is what management shows this identity (`GET /api/me/peers`): only the
peers it may reach by SSH, each with its SSH host keys. It is cached for a short while
(`PEERS_TTL`) so that `ssh` through the drop-in does not ask management twice per
connection; an unknown host or a host-key mismatch refetches once before failing, so a
new peer or a rotated key is seen at once. There is no trust-on-first-use anywhere:
a key that is not in the list is refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meshsshd.netmap import NetmapError, PeerInfo

from . import state
from .errors import ManagementError, PeerNotFound

if TYPE_CHECKING:
    from .auth import Session

PEERS_TTL = 30.0


def parse_peer_list(doc: Any) -> list[PeerInfo]:
    if not isinstance(doc, dict) or not isinstance(doc.get("peers"), list):
        raise ManagementError("management sent a malformed peer list")
    out = []
    for item in doc["peers"]:
        try:
            out.append(PeerInfo.from_dict(item))
        except (NetmapError, TypeError, AttributeError):
            continue  # one bad entry must not hide the others
    return out


def _norm(host: str) -> str:
    return host.strip().rstrip(".").lower()


def match_peer(peers: Sequence[PeerInfo], host: str) -> PeerInfo | None:
    """Peer id, name, FQDN, the FQDN's first label or mesh IP — exact matches only. An id
    wins over a name: a peer named like another's id must not stand in for it."""
    h = _norm(host)
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    for p in peers:
        if p.id.lower() == h:
            return p
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        ip = None
    for p in peers:
        if ip is not None:
            try:
                if ipaddress.ip_address(p.mesh_ip) == ip:
                    return p
            except ValueError:
                continue
        elif h in (_norm(p.name), _norm(p.fqdn)):
            return p
    if ip is None:
        for p in peers:
            if p.fqdn and _norm(p.fqdn).split(".")[0] == h:
                return p
    return None


class PeerDirectory:
    """The user's peer list with a short-lived on-disk cache."""

    def __init__(self, session: Session, clock=time.time) -> None:
        self.session = session
        self.clock = clock
        self._fresh: list[PeerInfo] | None = None

    def peers(self, refresh: bool = False) -> list[PeerInfo]:
        if refresh and self._fresh is not None:
            return self._fresh
        url = self.session.login.management_url
        if not refresh:
            doc = state.read_json(state.PEERS_FILE)
            if (isinstance(doc, dict) and doc.get("management_url") == url
                    and doc.get("identity") == self.session.login.identity
                    and 0 <= self.clock() - float(doc.get("fetched", 0)) < PEERS_TTL):
                try:
                    return parse_peer_list(doc)
                except ManagementError:
                    pass
        doc = self.session.get_api("/api/me/peers")
        peers = parse_peer_list(doc)
        state.write_json(state.PEERS_FILE, {
            "management_url": url, "identity": self.session.login.identity,
            "fetched": self.clock(), "peers": [p.to_dict() for p in peers]})
        self._fresh = peers
        return peers

    def resolve(self, host: str) -> PeerInfo:
        peer = match_peer(self.peers(), host)
        if peer is None:
            peer = match_peer(self.peers(refresh=True), host)
        if peer is None:
            raise PeerNotFound(
                f"{host}: not a peer you may reach (no such peer, or no policy lets "
                f"{self.session.identity} reach {host}); `meshssh peers` lists yours")
        return peer


def host_keys(peer: PeerInfo) -> list[Any]:
    """The peer's published host keys as asyncssh keys; unparsable lines are skipped."""
    import asyncssh

    keys = []
    for line in peer.ssh_host_keys:
        try:
            keys.append(asyncssh.import_public_key(line.strip()))
        except (asyncssh.KeyImportError, ValueError):
            continue
    return keys
