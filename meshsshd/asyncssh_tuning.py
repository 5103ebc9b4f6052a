"""Stop asyncssh's per-packet SSH_MSG_IGNORE where it protects nothing.

asyncssh 2.24 puts an empty SSH_MSG_IGNORE in front of every encrypted packet past key
exchange (`SSHConnection.send_packet`, "insert an ignore packet into the stream"), an old
countermeasure against chosen-plaintext attacks on CBC-mode ciphers. meshsshd offers no
CBC cipher (`algorithms.ENCRYPTION_ALGS`: AES-GCM, chacha20-poly1305, AES-CTR with EtM
MACs), so for it the ignore packet only doubles the encryptions and `send()` calls per
data packet; bench/RESULTS.md ("Bulk and sftp") measured downloads 0.6–0.9 × sshd with it
and ~1.0–1.5 × without.

`skip_ignore_packets()` wraps `SSHConnection.send_packet` so that the one ignore packet
it inserts is dropped when the connection's negotiated send cipher is not CBC; with a CBC
cipher (or none known yet) asyncssh behaves exactly as before. It patches only the
asyncssh versions it was checked against and only if `send_packet` still has the shape
read here; otherwise it logs one warning and leaves asyncssh alone (slower, still right).
Upstream fix wanted: send the ignore only for CBC ciphers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh import connection as _conn

from .asyncssh_patch import apply_guarded, version_checked

log = logging.getLogger(__name__)

# Names send_packet uses for the insertion: `if self._send_encryption and pkttype >
# MSG_KEX_LAST: self.send_packet(MSG_IGNORE, String(b''))`.
_SHAPE_NAMES = frozenset({"_send_encryption", "MSG_KEX_LAST", "send_packet", "MSG_IGNORE", "String"})
_SHAPE_PARAMS = ("self", "pkttype", "args", "handler")

_MSG_IGNORE = _conn.MSG_IGNORE
_MSG_KEX_LAST = _conn.MSG_KEX_LAST

_applied = False


def refusal(version: str, send_packet: Callable[..., Any]) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    code = getattr(send_packet, "__code__", None)
    if code is None or not _SHAPE_NAMES <= set(code.co_names):
        return "send-packet-changed"
    if tuple(inspect.signature(send_packet).parameters) != _SHAPE_PARAMS:
        return "send-packet-changed"
    return None


def _skipping(send_packet: Callable[..., None]) -> Callable[..., None]:
    """`send_packet` that drops the ignore packet it would insert for a non-CBC cipher.

    An outer call for a packet past key exchange marks the connection; the nested
    MSG_IGNORE call that send_packet then makes consumes the mark and returns. The mark
    is cleared afterwards in any case, so a packet that send_packet defers (before
    authentication) cannot swallow a later ignore. The cipher name comes from the
    connection's `send_cipher`, set together with the new send encryption; unknown
    counts as CBC."""

    def send_packet_without_ignore(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _MSG_IGNORE and self._meshsshd_skip_ignore:
            self._meshsshd_skip_ignore = False
            return
        if (pkttype > _MSG_KEX_LAST and self._send_encryption
                and "cbc" not in self.get_extra_info("send_cipher", "cbc")):
            self._meshsshd_skip_ignore = True
            try:
                send_packet(self, pkttype, *args, handler=handler)
            finally:
                self._meshsshd_skip_ignore = False
            return
        send_packet(self, pkttype, *args, handler=handler)

    send_packet_without_ignore.__wrapped__ = send_packet  # type: ignore[attr-defined]
    return send_packet_without_ignore


def skip_ignore_packets() -> bool:
    """Patch asyncssh once per process (see the module docstring); True if applied."""
    global _applied
    if not _applied:
        cls = _conn.SSHConnection

        def patch() -> None:
            cls._meshsshd_skip_ignore = False  # type: ignore[attr-defined]
            cls.send_packet = _skipping(cls.send_packet)  # type: ignore[method-assign]

        _applied = apply_guarded(log, "asyncssh-tuning", refusal(asyncssh.__version__, cls.send_packet), patch,
                                 change="no ignore packet before non-CBC packets",
                                 effect="asyncssh sends an ignore packet before every encrypted packet "
                                        "(slower bulk transfers)")
    return _applied
