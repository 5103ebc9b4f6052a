"""Carrying a key's authorized_keys options past asyncssh's own reset of them.

asyncssh enforces a key's options (`command=`, `no-pty`, `permitopen=`, `restrict`, …)
from `SSHServerConnection._key_options`, but it fills that only for keys *it* checked
against its own authorized_keys; a key that our `validate_public_key` accepted leaves it
empty, and every new userauth request empties it again. So the server keeps the options
of the key it accepted and puts them back in `auth_completed` (meshsshd/connection.py).

That writes a private attribute, so, as in asyncssh_tuning, only for the asyncssh
versions it was read against and only if the pieces still use the attribute the way read
here: the reset in `_process_userauth_request`, the reads in `get_key_option` and
`check_key_permission`. Otherwise `enforceable()` is False and the server refuses keys
that carry options (a key whose restrictions would silently not apply must not log in),
with one warning; keys without options work as before.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncssh
from asyncssh import connection as _conn

from .asyncssh_patch import apply_guarded, version_checked

log = logging.getLogger(__name__)

_READERS = ("get_key_option", "check_key_permission", "_process_userauth_request")

_verdict: bool | None = None


def refusal(version: str, cls: type = _conn.SSHServerConnection) -> str | None:
    """Why key options cannot be restored on this asyncssh, or None if they can."""
    if not version_checked(version):
        return "version-not-checked"
    for name in _READERS:
        code = getattr(getattr(cls, name, None), "__code__", None)
        if code is None or "_key_options" not in code.co_names:
            return f"{name}-changed"
    return None


def enforceable() -> bool:
    """Whether restore() works here; decided (and warned about) once per process."""
    global _verdict
    if _verdict is None:
        _verdict = apply_guarded(log, "asyncssh-keyopts", refusal(asyncssh.__version__), lambda: None,
                                 change="key options restored after login",
                                 effect="public keys with authorized_keys options are refused")
    return _verdict


def restore(conn: Any, options: dict[str, Any]) -> None:
    """Give the authenticated connection the options of the key that logged it in."""
    assert enforceable(), "restore() without enforceable()"
    conn._key_options = dict(options)  # noqa: SLF001 — see the module docstring
