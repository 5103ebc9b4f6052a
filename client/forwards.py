"""`meshssh -L/-D/-R`, saying why the peer refused, as OpenSSH does or better.

- A local or dynamic forward whose channel the peer refuses: asyncssh's own forwarders
  drop the local connection without a word. Here each refusal is printed the way OpenSSH prints
  it, "open failed: administratively prohibited: <the peer's reason>", and meshsshd's
  reason names the flag that would allow it.
- A remote forward: a failed tcpip-forward carries no text in SSH, so meshsshd sends the
  reason as a debug message just before the failure. The client keeps the debug
  messages of its connection (`PeerNotes`, filled by connect.py's MeshClient) and shows
  the one that came while the request was out; the proxy does the same (client/proxy.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import SSHArgs

# OpenSSH's reason2txt: how it names the SSH channel-open failure codes.
_OPEN_FAILURES = {1: "administratively prohibited", 2: "connect failed", 3: "unknown channel type",
                  4: "resource shortage"}


def describe_open_failure(exc: Any) -> str:
    """'administratively prohibited: <reason>', as OpenSSH words a refused channel."""
    code = getattr(exc, "code", 0)
    what = _OPEN_FAILURES.get(code, f"unknown reason {code}")
    reason = getattr(exc, "reason", "") or ""
    return f"{what}: {reason}" if reason else what


@dataclass
class PeerNotes:
    """The debug messages a peer sent on one connection, in order."""

    messages: list[str] = field(default_factory=list)

    def mark(self) -> int:
        return len(self.messages)

    def since(self, mark: int) -> str:
        """The last message after `mark`, without meshsshd's prefix; "" if none came."""
        recent = self.messages[mark:]
        return recent[-1].removeprefix("meshsshd: ") if recent else ""


def notes_of(conn: Any) -> PeerNotes:
    """The notes of a connection dialled by connect.dial (an empty set for any other)."""
    ctx = getattr(conn.get_owner(), "ctx", None)
    return getattr(ctx, "notes", None) or PeerNotes()


async def _open_reporting(conn: Any, say: Callable[[str], None], what: str, session_factory: Any,
                          dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
    """A direct-tcpip channel for a local listener; a refusal is said, then raised."""
    from asyncssh import ChannelOpenError

    try:
        return await conn.create_connection(session_factory, dest_host, dest_port, orig_host, orig_port)
    except ChannelOpenError as exc:
        say(f"{what} to {dest_host}:{dest_port}: open failed: {describe_open_failure(exc)}")
        raise


async def forward_local_port(conn: Any, listen_host: str, listen_port: int, dest_host: str, dest_port: int,
                             say: Callable[[str], None]) -> Any:
    """asyncssh's `forward_local_port`, except that a refused channel is reported."""
    from asyncssh.listener import create_tcp_forward_listener

    listener: Any = None

    async def tunnel(session_factory: Any, orig_host: str, orig_port: int) -> Any:
        return await _open_reporting(conn, say, f"local forward {listen_port}", session_factory, dest_host,
                                     dest_port or listener.get_port(), orig_host, orig_port)

    listener = await create_tcp_forward_listener(conn, asyncio.get_running_loop(), tunnel, listen_host,
                                                 listen_port)
    return listener


async def forward_socks(conn: Any, listen_host: str, listen_port: int, say: Callable[[str], None]) -> Any:
    """asyncssh's `forward_socks`, except that a refused channel is reported (asyncssh
    answers the SOCKS request before the channel opens, so the SOCKS client only sees
    its connection closed)."""
    from asyncssh.listener import create_socks_listener

    async def tunnel(session_factory: Any, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        return await _open_reporting(conn, say, f"dynamic forward {listen_port}", session_factory, dest_host,
                                     dest_port, orig_host, orig_port)

    return await create_socks_listener(conn, asyncio.get_running_loop(), tunnel, listen_host, listen_port)


async def setup_forwards(conn: Any, args: SSHArgs, say: Callable[[str], None]) -> list[str]:
    """Start -L/-R/-D; return warnings (OpenSSH warns and goes on unless told not to)."""
    problems = []
    for f in args.local:
        try:
            await forward_local_port(conn, f.listen_host, f.listen_port, f.dest_host, f.dest_port, say)
        except (OSError, Exception) as exc:  # noqa: BLE001
            problems.append(f"Warning: local port forwarding {f.listen_port} failed: {exc}")
    for f in args.dynamic:
        try:
            await forward_socks(conn, f.listen_host, f.listen_port, say)
        except (OSError, Exception) as exc:  # noqa: BLE001
            problems.append(f"Warning: dynamic forwarding {f.listen_port} failed: {exc}")
    notes = notes_of(conn)
    for f in args.remote:
        mark = notes.mark()
        try:
            listener = await conn.forward_remote_port(f.listen_host, f.listen_port,
                                                      f.dest_host, f.dest_port)
        except Exception as exc:  # noqa: BLE001
            cause = notes.since(mark) or getattr(exc, "reason", exc)
            problems.append(f"Warning: remote port forwarding failed for listen port {f.listen_port}: {cause}")
            continue
        if f.listen_port == 0:
            say(f"Allocated port {listener.get_port()} for remote forward to {f.dest_host}:{f.dest_port}")
    return problems
