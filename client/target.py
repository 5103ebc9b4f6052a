"""What `meshssh` dials: a peer from the user's peer list, the port and login name, and
the source address that shows the peer which mesh peer the connection comes from.

Shared by every way in (`meshssh host`, the proxy, `cp`, fan-out, detached sessions, the
broker), so none of them imports the interactive client to learn where to connect.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshsshd.netmap import SSH_PORT, PeerInfo

from . import userconfig
from .errors import AccessDenied, PeerNotFound

if TYPE_CHECKING:
    from .auth import Session

STATUS_FILE_ENV = "MESHSSHD_STATUS_FILE"
DEFAULT_STATUS_FILES = ("/var/lib/meshsshd/status.json",)


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


def status_source_address(management_url: str, paths: tuple[str, ...] | None = None,
                          environ: Mapping[str, str] | None = None) -> str | None:
    """Our own peer's mesh IP from meshsshd's status file, when it is in the same mesh.

    In single-machine mode every peer is a loopback address; binding the connection to
    our peer's address is what lets the server see which peer it comes from.
    """
    env = (os.environ if environ is None else environ).get(STATUS_FILE_ENV)
    candidates = (env,) if env else (paths or DEFAULT_STATUS_FILES)
    for path in candidates:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not doc.get("mesh_ip"):
            continue
        murl = str(doc.get("management_url", "")).rstrip("/")
        if murl and murl != management_url.rstrip("/"):
            continue
        return str(doc["mesh_ip"])
    return None


def choose_source_address(explicit: str | None, management_url: str,
                          environ: Mapping[str, str] | None = None) -> str | None:
    """-b, else MESHSSH_SOURCE_ADDRESS, else config.toml's `source_address`, else the
    local peer's address."""
    env = os.environ if environ is None else environ
    return (explicit or env.get("MESHSSH_SOURCE_ADDRESS") or userconfig.load().source_address
            or status_source_address(management_url, environ=env))


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
