"""One log event for a connection whose SSH handshake never finished.

asyncssh closes such a connection (no common algorithm, a disconnect or protocol error
during key exchange) without a word at any log level, so an admin could not tell why a
client cannot connect. `log_failure` is called when a connection is lost and writes
`handshake.failed` if key exchange never completed (asyncssh sets the negotiated
`send_cipher` only then): the client's version string, asyncssh's reason and, when the
client's KEXINIT arrived, which lists had nothing in common with ours (`unmatched`) and
the client's offer for them. That is worked out here from both KEXINITs because under
uvloop a client that finds no match itself hangs up before asyncssh's own check runs.
A failed negotiation is logged at info; anything else (a scanner, a client that hangs
up mid-exchange) at debug, so that floods of junk connections do not fill the log. Both
strings come from the client: they are capped here and JSON-escaped by `event`.
"""

from __future__ import annotations

import logging

import asyncssh
from asyncssh.encryption import encryption_needs_mac

from . import asyncssh_kexguess
from .logs import event

log = logging.getLogger(__name__)

MAX_VERSION = 255   # RFC 4253 §4.2: the identification string's limit
MAX_REASON = 1024   # enough for both algorithm lists of a real client
MAX_OFFER = 512     # one of the client's name-lists


def _first_common(client: list[bytes], server: list[bytes]) -> bytes | None:
    return next((name for name in client if name in server), None)


def unmatched(client_kexinit: bytes, server_kexinit: bytes) -> dict[str, str]:
    """The KEXINIT lists with no name in common, each with the client's offer (capped).

    A MAC list counts only where the cipher negotiated in that direction needs a MAC
    (not AES-GCM or chacha20-poly1305), as in RFC 4253 §7.1's negotiation."""
    client, _ = asyncssh_kexguess.parse_kexinit(client_kexinit)
    server, _ = asyncssh_kexguess.parse_kexinit(server_kexinit)
    out: dict[str, str] = {}
    for field in asyncssh_kexguess.FIELDS[:8]:
        if field.startswith("mac_"):
            cipher = _first_common(client["cipher_" + field[4:]], server["cipher_" + field[4:]])
            if cipher is None or not encryption_needs_mac(cipher):
                continue
        if _first_common(client[field], server[field]) is None:
            out[field] = b",".join(client[field]).decode("ascii", "replace")[:MAX_OFFER]
    return out


def log_failure(conn: asyncssh.SSHServerConnection, exc: Exception | None, source: str) -> None:
    """Log `handshake.failed` unless key exchange completed."""
    if conn.get_extra_info("send_cipher") is not None:
        return
    both = asyncssh_kexguess.kexinits(conn)
    missing = unmatched(*both) if both is not None else {}
    version = conn.get_extra_info("client_version")
    no_match = bool(missing) or isinstance(exc, asyncssh.KeyExchangeFailed)
    event(log, "handshake.failed", level=logging.INFO if no_match else logging.DEBUG, source=source,
          client_version=(version or "")[:MAX_VERSION] or None,
          error=type(exc).__name__ if exc is not None else None,
          reason=(str(exc) if exc is not None else "closed")[:MAX_REASON],
          unmatched=missing or None)
