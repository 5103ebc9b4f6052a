"""Refuse user-auth signatures outside the allowlist (SHA-1 `ssh-rsa`, `ssh-dss`).

asyncssh's `signature_algs` narrows what the server *advertises* (`server-sig-algs`) and
what it signs with, but `SSHServerConnection.validate_public_key` verifies a client's
signature with any algorithm the key type can make: an RSA key signing with `ssh-rsa`
(SHA-1) or a DSA key (`ssh-dss`, SHA-1 only) logged in, although sshd refuses both and
our docs say no SHA-1. `refuse_weak_signatures()` wraps that method: a signature whose
own algorithm name is not in `algorithms.SIGNATURE_ALGS` fails before it is verified,
with one `auth.signature-refused` event; the client sees an ordinary publickey failure
and may retry with `rsa-sha2-256/512`. Guarded like the other asyncssh patches: only
checked versions and only if the method still has the shape read here; otherwise one
warning and SHA-1 signatures are accepted. Upstream fix wanted: verify against
`signature_algs`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
from asyncssh import connection as _conn
from asyncssh.packet import PacketDecodeError, SSHPacket

from .algorithms import SIGNATURE_ALGS
from .asyncssh_patch import apply_guarded, version_checked
from .logs import event

log = logging.getLogger(__name__)

ALLOWED = frozenset(a.encode() for a in SIGNATURE_ALGS)

# What the wrap relies on: the method verifies `signature` with the key it found.
_SHAPE_NAMES = frozenset({"verify", "_session_id"})
_SHAPE_PARAMS = ("self", "username", "key_data", "msg", "signature")

_applied = False


def refusal(version: str, server_cls: type = _conn.SSHServerConnection) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    method = getattr(server_cls, "validate_public_key", None)
    code = getattr(inspect.unwrap(method) if method else None, "__code__", None)  # our own wrap is no change
    if code is None or not _SHAPE_NAMES <= set(code.co_names) or code.co_varnames[:5] != _SHAPE_PARAMS:
        return "validate-public-key-changed"
    return None


def signature_algorithm(signature: bytes) -> bytes | None:
    """The algorithm name an SSH signature blob starts with; None if it has none."""
    try:
        return SSHPacket(signature).get_string()
    except PacketDecodeError:
        return None


def _refusing(validate: Callable[..., Awaitable[bool]]) -> Callable[..., Awaitable[bool]]:
    @functools.wraps(validate)  # keeps __wrapped__: the tests unpatch with it
    async def validate_public_key(self: Any, username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if msg:
            alg = signature_algorithm(signature)
            if alg is not None and alg not in ALLOWED:
                peer = self.get_extra_info("peername") or ("",)
                event(log, "auth.signature-refused", source=str(peer[0]), user=username[:64],
                      algorithm=alg[:64].decode("ascii", "replace"), reason="not-allowlisted")
                return False
        return await validate(self, username, key_data, msg, signature)

    return validate_public_key


def refuse_weak_signatures() -> bool:
    """Patch asyncssh's server connections once per process; True if applied."""
    global _applied
    if not _applied:
        cls = _conn.SSHServerConnection

        def patch() -> None:
            cls.validate_public_key = _refusing(cls.validate_public_key)  # type: ignore[method-assign]

        _applied = apply_guarded(log, "asyncssh-sigalgs", refusal(asyncssh.__version__, cls), patch,
                                 change="user-auth signatures outside the allowlist are refused",
                                 effect="SHA-1 user-auth signatures (ssh-rsa, ssh-dss) are accepted")
    return _applied
