"""Answer OpenSSH's transport ping, so that its keystroke-timing obfuscation stays on.

OpenSSH ≥ 9.5 hides the timing of keystrokes in an interactive session by sending them
at a fixed interval, padded with SSH2_MSG_PING packets (OpenSSH's PROTOCOL, "transport:
SSH2_MSG_PING/PONG"). It does so only with a server that lists `ping@openssh.com`
(value "0") in its SSH_MSG_EXT_INFO; asyncssh 2.24 neither lists it nor knows the two
messages, so against it every keystroke went out on its own, timed as typed.

`answer_pings()` adds both, for server connections only:

- `ping@openssh.com` = "0" joins the EXT_INFO that asyncssh sends after the first key
  exchange (a wrap of `SSHServerConnection._send_ext_info`);
- SSH2_MSG_PING (192) `string data` is answered with SSH2_MSG_PONG (193) carrying the
  same data; a PONG is taken silently. As OpenSSH does, a ping during a key exchange
  gets no answer. One before authentication never reaches the handler: asyncssh refuses
  any message past the userauth range then (a protocol error), and before the first
  NEWKEYS strict KEX refuses it too, so the message numbers and sequence handling of
  `kex-strict` are untouched.

Like asyncssh_tuning, it patches only the asyncssh versions it was read against and only
if the pieces still have the shape read here; otherwise one warning and no ping support
(the client then simply does not obfuscate). Upstream fix wanted: ping support in asyncssh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh import connection as _conn
from asyncssh.packet import SSHPacket, String

from .asyncssh_patch import apply_guarded, version_checked

log = logging.getLogger(__name__)

MSG_PING = 192
MSG_PONG = 193
EXTENSION = b"ping@openssh.com"
EXTENSION_VERSION = b"0"

# What the patch relies on: EXT_INFO is built from `_extensions_to_send` and sent with
# send_packet; a packet's handler is looked up in the class's `_packet_handlers`.
_EXT_INFO_NAMES = frozenset({"_extensions_to_send", "send_packet", "MSG_EXT_INFO"})
_DISPATCH_NAMES = frozenset({"_packet_handlers"})

_applied = False


def refusal(version: str, server_cls: type = _conn.SSHServerConnection) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    handlers = getattr(server_cls, "_packet_handlers", None)
    if not isinstance(handlers, dict):
        return "dispatch-changed"
    if MSG_PING in handlers or MSG_PONG in handlers:
        return "asyncssh-answers-pings"  # upstream did it: leave it to asyncssh
    send_ext_info = getattr(getattr(server_cls, "_send_ext_info", None), "__code__", None)
    if send_ext_info is None or not _EXT_INFO_NAMES <= set(send_ext_info.co_names):
        return "ext-info-changed"
    process = getattr(getattr(server_cls, "process_packet", None), "__code__", None)
    if process is None or not _DISPATCH_NAMES <= set(process.co_names):
        return "dispatch-changed"
    for name in ("_kex_complete", "_extensions_to_send"):
        if name not in _conn.SSHConnection.__init__.__code__.co_names:
            return "connection-changed"
    return None


def _process_ping(self: Any, _pkttype: int, _pktid: int, packet: SSHPacket) -> None:
    data = packet.get_string()
    packet.check_end()
    if not self._kex_complete:  # OpenSSH: no reply during a key exchange
        return
    self.send_packet(MSG_PONG, String(data))


def _process_pong(self: Any, _pkttype: int, _pktid: int, packet: SSHPacket) -> None:
    packet.get_string()
    packet.check_end()


def _advertising(send_ext_info: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(send_ext_info)  # keeps __wrapped__: the tests unpatch with it
    def send_ext_info_with_ping(self: Any) -> None:
        self._extensions_to_send[EXTENSION] = EXTENSION_VERSION
        send_ext_info(self)

    return send_ext_info_with_ping


def answer_pings() -> bool:
    """Patch asyncssh's server connections once per process; True if applied."""
    global _applied
    if not _applied:
        cls = _conn.SSHServerConnection

        def patch() -> None:
            # The server class's own table: asyncssh's clients (and their table) stay as they are.
            cls._packet_handlers = {**cls._packet_handlers,  # type: ignore[attr-defined]
                                    MSG_PING: _process_ping, MSG_PONG: _process_pong}
            cls._send_ext_info = _advertising(cls._send_ext_info)  # type: ignore[method-assign]

        _applied = apply_guarded(log, "asyncssh-ping", refusal(asyncssh.__version__, cls), patch,
                                 change="ping@openssh.com advertised and answered",
                                 effect="OpenSSH clients send keystrokes without timing obfuscation")
    return _applied
