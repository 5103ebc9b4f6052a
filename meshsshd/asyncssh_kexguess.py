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
from both KEXINITs by the RFC's rule. The server's own list order stays as it is, so
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


def _preferences(kexinit: bytes) -> tuple[bytes, bytes, bool]:
    """First key exchange, first host-key algorithm and `first_kex_packet_follows`."""
    packet = SSHPacket(kexinit)
    packet.get_byte()
    packet.get_bytes(16)  # cookie
    kex, host_keys = packet.get_namelist(), packet.get_namelist()
    for _ in range(8):  # ciphers, MACs, compression (both ways), languages
        packet.get_namelist()
    follows = packet.get_boolean()
    return (kex[0] if kex else b""), (host_keys[0] if host_keys else b""), follows


def guess_is_wrong(client_kexinit: bytes, server_kexinit: bytes) -> bool:
    """RFC 4253 §7: a guessed packet follows and the preferred algorithms differ."""
    client_kex, client_host_key, follows = _preferences(client_kexinit)
    server_kex, server_host_key, _ = _preferences(server_kexinit)
    return follows and (client_kex, client_host_key) != (server_kex, server_host_key)


def _judging(process: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(process)  # keeps __wrapped__: the tests unpatch with it
    async def process_kexinit(self: Any, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        await process(self, pkttype, pktid, packet)
        # Both payloads exist now: asyncssh has parsed the client's and sent its own.
        self._ignore_first_kex = guess_is_wrong(self._client_kexinit, self._server_kexinit)

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
