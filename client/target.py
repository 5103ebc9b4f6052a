"""What `meshssh` dials: a peer from the user's peer list, the port and login name, and
the source address that shows the peer which mesh peer the connection comes from.

Shared by every way in (`meshssh host`, the proxy, `cp`, fan-out, detached sessions, the
broker), so none of them imports the interactive client to learn where to connect.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshsshd.local_peers import LocalPeer, read_peer, running_peers
from meshsshd.netmap import SSH_PORT, PeerInfo

from . import userconfig
from .errors import AccessDenied, PeerNotFound

if TYPE_CHECKING:
    from .auth import Session

STATUS_FILE_ENV = "MESHSSHD_STATUS_FILE"


@dataclass
class Target:
    peer: PeerInfo
    port: int
    username: str
    address: str = ""

    def __post_init__(self) -> None:
        self.address = self.address or self.peer.mesh_ip

    @property
    def name(self) -> str:
        return self.peer.name or self.peer.fqdn or self.peer.mesh_ip


def local_username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root" if os.geteuid() == 0 else str(os.geteuid())


def own_peers(management_url: str = "", environ: Mapping[str, str] | None = None) -> list[LocalPeer]:
    """Our own mesh peers: the one whose status file MESHSSHD_STATUS_FILE names, else the
    live ones of this mesh that run on this machine (meshsshd/local_peers.py)."""
    env = os.environ if environ is None else environ
    named = env.get(STATUS_FILE_ENV)
    if not named:
        return running_peers(management_url, env)
    peer = read_peer(Path(named), running=False)
    want = management_url.rstrip("/")
    return [peer] if peer is not None and (not want or peer.management_url in ("", want)) else []


def choose_source_address(explicit: str | None, management_url: str,
                          environ: Mapping[str, str] | None = None, *, exclude: str = "") -> str | None:
    """-b, else MESHSSH_SOURCE_ADDRESS, else config.toml's `source_address`, else our own
    peer's mesh address when exactly one is found (other than `exclude`, the peer we
    dial: a server that is also where we sit does not log in to itself). With several
    the system chooses, and a refusal names the options (`source_hint`)."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get("MESHSSH_SOURCE_ADDRESS") or userconfig.load().source_address
    if chosen:
        return chosen
    ips = {p.mesh_ip for p in own_peers(management_url, env) if p.mesh_ip != exclude}
    return ips.pop() if len(ips) == 1 else None


def source_hint(source: str | None, management_url: str, environ: Mapping[str, str] | None = None) -> str:
    """What to tell a user whose connection the peer refused for its source address."""
    found = ", ".join(p.describe() for p in own_peers(management_url, environ)) or "none"
    came = f"from {source}" if source else "from the address the system chose"
    return (f"the connection came {came}, and the peer takes logins only from mesh peers its "
            f"policies allow; connect from your own peer with -b ADDRESS, MESHSSH_SOURCE_ADDRESS "
            f"or source_address in config.toml (meshsshd peers running here: {found})")


def default_login() -> str:
    """The login name when none is given: config.toml's `user` (ssh_config's `User`),
    else this machine's user name."""
    return userconfig.load().user or local_username()


def resolve(args_host: str, session: Session, port: int | None, user: str | None) -> Target:
    """Resolve through the peer list and refuse peers that cannot take SSH at all."""
    from .peers import PeerDirectory

    try:
        peer = PeerDirectory(session).resolve(args_host)
    except PeerNotFound:
        # Management knows why (unknown peer, no policy, SSH off there): ask it.
        res = session.ssh_tokens([(args_host, args_host)], no_cache=True)[args_host]
        if res.error:
            raise AccessDenied(res.error) from None
        raise
    if not peer.ssh_enabled:   # management knows which cause it is (idp/why_not.py): ask it
        res = session.ssh_tokens([(peer.id, peer.name)], no_cache=True)[peer.id]
        if res.error:
            raise AccessDenied(res.error)
    return Target(peer=peer, port=port or SSH_PORT, username=user or default_login())
