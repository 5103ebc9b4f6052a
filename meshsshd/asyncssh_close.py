"""Keep a session channel the client closed until its command exits, as sshd does.

asyncssh 2.24 answers a client's CHANNEL_CLOSE at once (`SSHChannel._process_close`:
`_close_send()`, then the session's `connection_lost`), so meshsshd killed the command and
a client that closes first and then waits for the server's CLOSE (OpenSSH's ControlMaster
does, as Ansible's ControlPersist uses it) got no exit-status. sshd keeps the channel
until the child exits, then sends exit-status and its CLOSE.

`hold_closed_sessions()` wraps `SSHServerChannel._process_close`: when the channel's
session has a `hold_on_close()` that says yes (`ChildSession`: a command without a
terminal still running), the close is recorded and nothing is answered; the session's
exit (exit-status, then `close()`) sends our CLOSE and asyncssh cleans up as usual. A
connection that drops still ends the session through `connection_lost`. Only the asyncssh
versions it was read against are patched; otherwise one warning and asyncssh's behaviour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asyncssh import channel as _chan

from .asyncssh_patch import guard_server_channel_handler, version_checked

log = logging.getLogger(__name__)

_applied = False
_OPEN_STATES = frozenset({"open", "eof_pending", "eof"})


def refusal(version: str, process_close: Callable[..., Any]) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    code = getattr(process_close, "__code__", None)
    if code is None or not {"_close_send", "_recv_state", "_flush_recv_buf"} <= set(code.co_names):
        return "process-close-changed"
    return None


def _holding(process_close: Callable[..., None]) -> Callable[..., None]:
    def process_close_when_done(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        hold = getattr(self._session, "hold_on_close", None)
        if self._recv_state not in _OPEN_STATES or hold is None or not hold():
            process_close(self, pkttype, pktid, packet)
            return
        packet.check_end()
        # The client reads nothing more: drop what waits for its window, and take no
        # more input. `close()` later sends our CLOSE and `_discard_recv` cleans up.
        self._send_buf = []
        self._send_buf_len = 0
        self._recv_buf = []
        self._recv_state = "close_pending"

    process_close_when_done.__wrapped__ = process_close  # type: ignore[attr-defined]
    return process_close_when_done


def hold_closed_sessions() -> bool:
    """Apply the patch once; True if asyncssh now holds closed session channels."""
    global _applied
    if _applied:
        return True
    _applied = guard_server_channel_handler(
        log, "asyncssh-close", _chan.MSG_CHANNEL_CLOSE, _chan.SSHChannel._process_close, _holding, refusal,
        change="a closed session channel is answered once its command exits",
        effect="a command ends when its client closes the channel first (no exit-status)")
    return _applied
