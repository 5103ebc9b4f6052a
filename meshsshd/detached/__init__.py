"""Detached sessions: commands and PTY shells that outlive the client (and meshsshd).

WinRM's `-InDisconnectedSession`, `Connect-PSSession` and `Receive-PSSession` for the
mesh. Each detached session is owned by a holder process (`session/_holder.py`) that
this module launches: the holder spawns the child as the user, keeps its PTY master or
pipes and a bounded output spool, and answers on a unix socket in
`<state_dir>/sessions/` (mode 0700, root only). The holder is re-parented to init, so
neither a client disconnect nor a restart of meshsshd ends the session; on start the
daemon scans the directory and picks up every holder still alive.

Clients reach it through one reserved subsystem on the ordinary SSH connection,
`meshsshd-sessions@meshsshd`, so the usual JWT authentication and access rules apply.
The client sends one JSON line; the daemon answers one JSON line (`{"ok": true, ...}` or
`{"ok": false, "error": "..."}`), then, for `receive` and `attach`, the session's output
as channel data (stderr as extended data) and finally the session's exit status.

    {"op": "list"}
    {"op": "start", "command": "cmd" | null, "pty": bool, "term": "xterm", "cols": 80, "rows": 24, "env": {}}
    {"op": "kill", "id": ID}          (a finished session is forgotten instead)
    {"op": "receive", "id": ID, "follow": bool}
    {"op": "attach", "id": ID, "cols": 80, "rows": 24}   then input and window-change

Only the identity that started a session, logged in as the same local user, may see or
touch it; anyone else gets "no such session" (existence is not revealed).

Private parts: `_store` (the registry on disk, holder sockets, the operations with the
owner check), `_launch` (starting a holder), `_channel` (the subsystem's request and
relay), `_session` (the session channel that serves it), `_meta` (owner fence, expiry,
listing), `_frames` (the holder's frames), `_events` (audit), `_revoke` (ending what a new
policy no longer allows).
"""

from ._meta import is_expired, may_see, summary
from ._revoke import revoke_detached
from ._session import SUBSYSTEM, DetachableSession
from ._store import DetachedSessions

__all__ = ["SUBSYSTEM", "DetachableSession", "DetachedSessions", "is_expired", "may_see", "revoke_detached",
           "summary"]
