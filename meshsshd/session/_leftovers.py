"""Logins a crashed run of this daemon left behind: found by their cgroups, ended, audited.

Each login runs in `<cgroup2>/meshsshd/s-<scope>-<session id>` (`_cgroup.LoginCgroup`),
where the scope is a digest of the daemon's state directory: several daemons on one host
(tests, a standalone server next to a managed peer) each find only their own. A daemon
that dies (kill -9, OOM) cannot end its logins; its processes would run on as the user,
unaudited. At start-up, once per process and scope, every `s-<scope>-*` cgroup is killed
and removed, and each is reported so the audit trail shows how it ended.

Detached sessions (`d-*` cgroups, their holders) are meant to outlive the daemon and are
not touched. Without writable cgroup v2 nothing is found here (documented in
docs/server.md, "A daemon crash").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from ..audit import AuditSink, SessionEnded
from ..logs import event
from ._cgroup import BASE, LoginCgroup, cgroup2_root, kill_login

log = logging.getLogger("meshsshd.session")
_swept: set[str] = set()   # scopes this process has cleaned: its own logins are not leftovers


def cgroup_scope(state_dir: Path) -> str:
    """A short name for one daemon's state directory (stable across its restarts)."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]


def login_cgroup_name(scope: str, session_id: str) -> str:
    return f"s-{scope}-{session_id}" if scope else f"s-{session_id}"


@dataclass(frozen=True)
class Leftover:
    """One login the previous run left: its session id and the user it ran as."""

    session_id: str
    local_user: str = ""


def end_leftover_logins(scope: str) -> list[Leftover]:
    """Kill and remove this scope's login cgroups (blocking: use the executor)."""
    root = cgroup2_root()
    prefix = login_cgroup_name(scope, "")
    if root is None or not scope:
        return []
    try:
        names = sorted(n for n in os.listdir(root / BASE) if n.startswith(prefix))
    except OSError:
        return []
    out = []
    for name in names:
        cgroup = LoginCgroup(root / BASE / name)
        user = _owner(cgroup.members())
        kill_login(cgroup, sid=0, uid=0)   # with a cgroup, sid and uid are not needed
        out.append(Leftover(name[len(prefix):], user))
    return out


def _owner(pids: list[int]) -> str:
    """The user the login's processes run as (the first that is not root), for the event."""
    for pid in pids:
        with contextlib.suppress(OSError, KeyError):
            uid = os.stat(f"/proc/{pid}").st_uid
            if uid != 0:
                return pwd.getpwuid(uid).pw_name
    return ""


async def end_leftovers(scope: str, audit: AuditSink) -> None:
    """Once per process and state directory: end what the previous run left and emit a
    `session.ended` (reason `daemon-restart`) for each. A server restarted inside the same
    process (SSH toggled off and on) does not sweep again: those logins are its own."""
    if scope in _swept or os.geteuid() != 0:
        return
    _swept.add(scope)
    for left in await asyncio.get_running_loop().run_in_executor(None, end_leftover_logins, scope):
        event(log, "session.leftover-ended", session_id=left.session_id, user=left.local_user or None)
        audit.emit(SessionEnded(session_id=left.session_id, local_user=left.local_user, reason="daemon-restart"))
