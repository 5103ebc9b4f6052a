"""Port forwarding policy and the local-forward dialer.

- direct-tcpip (`ssh -L`, `-D`): only when local forwarding is on; the daemon dials with a
  timeout (30 s by default) and the channel opens only once the connection stands, so a
  dead target gives the client a clean "connect failed".
- tcpip-forward (`ssh -R`): only when remote forwarding is on, only on loopback or the
  peer's own addresses (asyncssh would otherwise bind every interface for `''`/`0.0.0.0`,
  i.e. GatewayPorts yes), and never on a privileged port unless the user is root.
  asyncssh closes the listener on cancel-tcpip-forward and when the connection ends.
- Unix-socket forwarding is refused: the daemon would create or connect sockets as root.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh

PRIVILEGED_PORTS_BELOW = 1024


@dataclass(frozen=True)
class ForwardDecision:
    allowed: bool
    reason: str = ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def may_listen(host: str, port: int, *, uid: int, own_addresses: Sequence[str]) -> ForwardDecision:
    """Whether a remote forward may bind host:port for a user with this uid."""
    host = host.strip().lower()
    if host in ("", "*", "0.0.0.0", "::", "[::]"):
        return ForwardDecision(False, "remote forwards may bind only loopback or this peer's mesh address")
    if not (_is_loopback(host) or host in {a.lower() for a in own_addresses}):
        return ForwardDecision(False, f"remote forwards may not bind {host}")
    if not 0 <= port <= 65535:
        return ForwardDecision(False, "port out of range")
    if 0 < port < PRIVILEGED_PORTS_BELOW and uid != 0:
        return ForwardDecision(False, f"port {port} is privileged; only root may forward it")
    return ForwardDecision(True)


async def dial(conn: asyncssh.SSHServerConnection, host: str, port: int, timeout: float) -> asyncssh.SSHTCPSession:
    """Connect to host:port for a direct-tcpip channel, or refuse the channel cleanly."""
    try:
        return await asyncio.wait_for(conn.forward_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                        f"connecting to {host} port {port} timed out") from None
