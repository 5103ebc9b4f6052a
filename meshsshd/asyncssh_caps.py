"""Bound what asyncssh keeps per session channel for requests a client sends.

asyncssh 2.24 stores every `env` request of a session channel (`_process_env_request`:
`self._env[key] = value`, names meshsshd's AcceptEnv filter later drops included) and
queues every channel request behind one that is still being answered (`_process_request`:
`self._request_queue.append`). A logged-in client could grow the daemon without bound
(50 000 env requests: ~45 MiB). sshd ignores env requests past 128 per session; here
a connection past `MAX_ENV` env variables on a channel, or `MAX_QUEUED` unanswered
requests, is closed with one log line, before asyncssh stores anything.

`cap_channel_requests()` wraps `SSHServerChannel`'s CHANNEL_REQUEST handler (only the
asyncssh versions it was read against; otherwise one warning and asyncssh as it is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh import channel as _chan

from .asyncssh_patch import guard_server_channel_handler, version_checked
from .logs import event

log = logging.getLogger(__name__)

MAX_ENV = 128      # env variables kept per session channel (sshd's limit)
MAX_QUEUED = 64    # channel requests waiting behind one not yet answered

_applied = False


def refusal(version: str, process_request: Callable[..., Any]) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    code = getattr(process_request, "__code__", None)
    if code is None or not {"_request_queue", "get_string", "get_boolean"} <= set(code.co_names):
        return "process-request-changed"
    if not hasattr(_chan.SSHServerChannel, "_process_env_request"):
        return "env-request-changed"
    return None


def over_cap(request: bytes, env_count: int, queued: int) -> str | None:
    """Which cap one more request would exceed, or None."""
    if request == b"env" and env_count >= MAX_ENV:
        return "env"
    if queued >= MAX_QUEUED:
        return "queued-requests"
    return None


def _capping(process_request: Callable[..., None]) -> Callable[..., None]:
    def process_request_capped(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        start = packet._idx
        request = packet.get_string()
        packet._idx = start
        cap = over_cap(request, len(self._env), len(self._request_queue))
        if cap is not None:
            conn = self._conn
            peer = conn.get_extra_info("peername") if conn is not None else None
            event(log, "connection.closed", level=logging.WARNING, reason=f"too-many-{cap}",
                  source=str(peer[0]) if peer else None, limit=MAX_ENV if cap == "env" else MAX_QUEUED)
            raise asyncssh.DisconnectError(asyncssh.DISC_BY_APPLICATION, f"too many {cap} requests")
        process_request(self, pkttype, pktid, packet)

    process_request_capped.__wrapped__ = process_request  # type: ignore[attr-defined]
    return process_request_capped


def cap_channel_requests() -> bool:
    """Apply the patch once; True if session channels now cap their requests."""
    global _applied
    if _applied:
        return True
    _applied = guard_server_channel_handler(
        log, "asyncssh-caps", _chan.MSG_CHANNEL_REQUEST, _chan.SSHChannel._process_request, _capping, refusal,
        change=f"at most {MAX_ENV} env and {MAX_QUEUED} queued requests per session channel",
        effect="env and channel requests are kept without bound")
    return _applied
