"""A policy change reaches detached sessions too: what no longer passes is ended.

A detached session outlives its connection, so closing connections on `apply()` does not
touch it. Here every running session's recorded login (identity, how it was proven, the
token's own `local_users` fence, local user, source address) goes through the same check
as a live connection (`server.still_allowed`, passed in: this module must not import the
server); a session that fails is ended through its holder (as `kill` does, which also
ends what escaped its process group, see `session/_holder.py`) and audited as
`detached.revoked`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..auth import Identity
from ..logs import event
from ._events import DetachedRevoked
from ._store import DetachedSessions

log = logging.getLogger("meshsshd.detached")

# (identity, login, source ip) → ("", "") to keep, or (reason, message)
LoginCheck = Callable[[Identity, str, str], tuple[str, str]]


def recorded_identity(meta: Mapping[str, Any]) -> Identity:
    """The login a session was started under, as the access rules see it. Sessions
    started before the method was recorded get it from the identity's form."""
    value = str(meta.get("identity") or "")
    method = meta.get("method") or ("publickey" if value.startswith("key:")
                                    else "none" if value.startswith("peer:") else "jwt")
    fence = meta.get("token_local_users")
    return Identity(value=value, method=str(method), via=meta.get("via"),
                    local_users=tuple(fence) if isinstance(fence, list) else None)


def revocation_reason(meta: Mapping[str, Any], check: LoginCheck) -> str:
    """"" when the session may go on, else the reason code."""
    login = "root" if meta.get("uid") == 0 else str(meta.get("local_user") or "")
    reason, _message = check(recorded_identity(meta), login, str(meta.get("source") or ""))
    return reason


async def revoke_detached(store: DetachedSessions, check: LoginCheck) -> int:
    """End every running detached session the check refuses; how many were ended."""
    ended = 0
    for meta in await store.running():
        reason = revocation_reason(meta, check)
        if not reason:
            continue
        result, meta = await store.stop_holder(meta)
        ended += 1
        store.audit.emit(DetachedRevoked(session_id=meta["id"], identity=str(meta.get("identity") or ""),
                                         source_ip=str(meta.get("source") or ""),
                                         local_user=str(meta.get("local_user") or ""), via=meta.get("via"),
                                         reason=reason))
        event(log, "detached.revoked", session_id=meta["id"], identity=meta.get("identity"),
              user=meta.get("local_user"), reason=reason, result=result)
    return ended

