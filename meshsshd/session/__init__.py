"""Sessions as the local user: PTY shells, exec, sftp-server and subsystems.

Private parts: `_spawn` (privilege drop, env/argv building), `_pty`, `_io` (fd pumps),
`_exec` (the channel session), `_sftp` (subsystem resolution), `_utmp` (login records).
"""

from ._exec import ChildSession, SessionContext
from ._sftp import resolve_subsystem
from ._spawn import ConnectionInfo, build_child_argv, build_child_env, pam_service, reset_inherited_signals

__all__ = ["ChildSession", "ConnectionInfo", "SessionContext", "build_child_argv", "build_child_env",
           "pam_service", "reset_inherited_signals", "resolve_subsystem"]
