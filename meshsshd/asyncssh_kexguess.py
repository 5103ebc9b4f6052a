"""Judge a client's guessed first key-exchange packet as RFC 4253 §7 does.

A client may send its first key-exchange packet right after its KEXINIT, before it has
seen the server's, guessing the algorithms (`first_kex_packet_follows`). The guess is
right only when both sides' *preferred* key exchange and host-key algorithms are the
same (RFC 4253 §7: "server and client have different preferred algorithm"); otherwise the
guessed packet is ignored and the client sends the real one. OpenSSH and dropbear judge
it that way. asyncssh 2.24 instead calls the guess right whenever the negotiated key
exchange is the client's first, so with `mlkem768x25519-sha256` first on our side and
dropbear's `curve25519-sha256` first on its side, asyncssh answered the guess, dropbear
(which judged it wrong) sent its real KEXDH_INIT as well, and asyncssh dropped the
connection with "Key exchange not in progress".

`judge_guesses()` wraps the server's KEXINIT handler: once asyncssh has processed the
client's KEXINIT (and the packets after it wait until it has), the ignore flag is set
from both KEXINITs by the RFC's rule. The wrap also keeps the client's KEXINIT on the
connection as it arrives, before asyncssh's handler task runs, so that `kexinits()` can
show `handshake.py` both offers even when the client hangs up first (under uvloop a
client's KEXINIT and its FIN are delivered together and the task never runs). The server's own list order stays as it is, so
clients that prefer ML-KEM still get it. Guarded like the other asyncssh patches: only
checked versions, only if the handler still has the shape read here; otherwise one
warning and dropbear's client cannot connect. Upstream fix wanted in asyncssh.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
from asyncssh import connection as _conn
from asyncssh.packet import SSHPacket

from .asyncssh_patch import apply_guarded, version_checked

log = logging.getLogger(__name__)

MSG_KEXINIT = _conn.MSG_KEXINIT

# What the wrap relies on: the handler stores the client's KEXINIT payload and sets the
# ignore flag that the receive loop consults for the next key-exchange packet.
_SHAPE_NAMES = frozenset({"_client_kexinit", "_ignore_first_kex", "get_consumed_payload"})

_applied = False


def refusal(version: str, server_cls: type = _conn.SSHServerConnection) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    handlers = getattr(server_cls, "_packet_handlers", None)
    handler = handlers.get(MSG_KEXINIT) if isinstance(handlers, dict) else None
    code = getattr(inspect.unwrap(handler) if handler else None, "__code__", None)  # our own wrap is no change
    if code is None or not _SHAPE_NAMES <= set(code.co_names):
        return "kexinit-changed"
    return None


# The name-lists of a KEXINIT, in wire order (RFC 4253 §7.1).
FIELDS = ("kex", "host_key", "cipher_cs", "cipher_sc", "mac_cs", "mac_sc",
          "compression_cs", "compression_sc", "language_cs", "language_sc")


def parse_kexinit(kexinit: bytes) -> tuple[dict[str, list[bytes]], bool]:
    """The name-lists by field, and `first_kex_packet_follows`."""
    packet = SSHPacket(kexinit)
    packet.get_byte()
    packet.get_bytes(16)  # cookie
    lists = {field: packet.get_namelist() for field in FIELDS}
    return lists, packet.get_boolean()


def _preferences(kexinit: bytes) -> tuple[tuple[bytes, bytes], bool]:
    lists, follows = parse_kexinit(kexinit)
    return tuple(lists[f][0] if lists[f] else b"" for f in ("kex", "host_key")), follows  # type: ignore[return-value]


def guess_is_wrong(client_kexinit: bytes, server_kexinit: bytes) -> bool:
    """RFC 4253 §7: a guessed packet follows and the preferred algorithms differ."""
    client, follows = _preferences(client_kexinit)
    server, _ = _preferences(server_kexinit)
    return follows and client != server


def kexinits(conn: Any) -> tuple[bytes, bytes] | None:
    """The client's and the server's KEXINIT of `conn`'s first key exchange, once both exist."""
    client, server = getattr(conn, "_meshsshd_client_kexinit", None), getattr(conn, "_server_kexinit", None)
    return (client, server) if isinstance(client, bytes) and isinstance(server, bytes) else None


def _judging(process: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def judged(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        await process(self, pkttype, pktid, packet)
        # Both payloads exist now: asyncssh has parsed the client's and sent its own.
        self._ignore_first_kex = guess_is_wrong(self._client_kexinit, self._server_kexinit)

    @functools.wraps(process)  # keeps __wrapped__: the tests unpatch with it
    def process_kexinit(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> Awaitable[None]:
        if getattr(self, "_meshsshd_client_kexinit", None) is None:
            self._meshsshd_client_kexinit = packet.get_full_payload()
        return judged(self, pkttype, pktid, packet)

    return process_kexinit


def judge_guesses() -> bool:
    """Patch asyncssh's server connections once per process; True if applied."""
    global _applied
    if not _applied:
        cls = _conn.SSHServerConnection

        def patch() -> None:
            # The server class's own table: asyncssh's clients keep theirs.
            handlers = cls._packet_handlers  # type: ignore[attr-defined]
            cls._packet_handlers = {**handlers, MSG_KEXINIT: _judging(handlers[MSG_KEXINIT])}  # type: ignore[attr-defined]

        _applied = apply_guarded(log, "asyncssh-kexguess", refusal(asyncssh.__version__, cls), patch,
                                 change="a guessed first KEX packet is judged by both sides' preferences",
                                 effect="clients that guess (dropbear) are disconnected during key exchange")
    return _applied
