"""Starting a holder (`session/_holder.py`): the child's PTY or pipes, its argv and env as
the user, PAM or the home-entering wrapper, its cgroup and systemd scope, then the spec on
the holder's stdin. Blocking (fork, exec, wait for the holder's one-line answer), so the
store runs it in a thread; kept apart from the store, which only keeps the records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..session import SessionContext, build_child_argv, build_child_env
from ..session._cgroup import LoginCgroup
from ..session._pty import PTY
from ..session._spawn import build_home_argv, build_pam_argv, pam_service

HOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "session", "_holder.py")


def systemd_scope(sid: str, environ: Mapping[str, str] = os.environ,
                  booted: bool | None = None, systemd_run: str | None = None) -> list[str]:
    """Under a systemd service, stopping the unit kills its whole cgroup (KillMode=mixed):
    the holder would die with meshsshd. `systemd-run --scope` moves it into a transient
    scope of its own (it execs the holder in place, keeping our pipes and fds), the way
    logind keeps an sshd session alive across an sshd restart. Elsewhere: nothing."""
    if booted is None:
        booted = os.path.isdir("/run/systemd/system")
    if systemd_run is None:
        systemd_run = shutil.which("systemd-run")
    if not (booted and systemd_run and environ.get("INVOCATION_ID")):
        return []
    return [systemd_run, "--scope", "--quiet", "--collect", f"--unit=meshsshd-session-{sid}",
            "--description=meshsshd detached session", "--"]


def launch_holder(directory: Path, ctx: SessionContext, meta: dict[str, Any], pty: bool, term: str | None,
                  cols: int, rows: int, client_env: dict[str, str], command: str | None) -> dict[str, Any]:
    """Start the holder of session `meta` in the sessions `directory`; its answer
    (`{"ok": true, "holder_pid": ..., "pid": ...}` or `{"ok": false, "error": ...}`)."""
    user = ctx.user
    close_after: list[int] = []
    term_pty: PTY | None = None
    try:
        if pty:
            term_pty = PTY(user.uid, (cols, rows, 0, 0), {})
            child_fds = [term_pty.slave] * 3
            parent_fds = [term_pty.master]
        else:
            devnull = os.open(os.devnull, os.O_RDONLY)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            close_after = [devnull, out_r, out_w, err_r, err_w]
            child_fds = [devnull, out_w, err_w]
            parent_fds = [out_r, err_r]
        env = build_child_env(user, ctx.conn, client_env, term=term,
                              tty_name=term_pty.name if term_pty else None, accept_env=ctx.accept_env)
        env["MESHSSHD_SESSION_ID"] = meta["id"]
        executable, argv = build_child_argv(user.shell, command, pty=pty)
        as_root = False
        service = pam_service()
        if service is not None and os.geteuid() == 0:
            executable, argv = build_pam_argv(user, executable, argv, service=service,
                                              tty=term_pty.name if term_pty else None,
                                              rhost=ctx.conn.client_ip, python=sys.executable)
            as_root = True
        else:
            executable, argv = build_home_argv(user.home, executable, argv, env.get("PATH", ""))
        spec = dict(id=meta["id"], dir=str(directory), pty=pty, spool_limit=meta["spool_limit"],
                    executable=executable, argv=argv, env=env, uid=user.uid, gid=user.gid,
                    groups=list(user.groups), as_root=as_root,
                    child_fds=child_fds, parent_fds=parent_fds, meta=meta)
        holder = [sys.executable, "-I", "-S", HOLDER]
        cgroup = LoginCgroup.create(f"d-{meta['id']}") if os.geteuid() == 0 else None
        if cgroup is not None:   # the holder and all it starts; it kills the rest when done
            spec["cgroup"] = str(cgroup.path)
            holder = cgroup.join_argv(holder)
        proc = subprocess.Popen([*systemd_scope(meta["id"]), *holder],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                                pass_fds=sorted(set(child_fds + parent_fds)), start_new_session=True,
                                close_fds=True)
        out, _ = proc.communicate(json.dumps(spec).encode(), timeout=30)
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"ok": False, "error": "holder did not start"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"ok": False, "error": getattr(exc, "strerror", None) or str(exc)}
    finally:
        for fd in close_after:
            os.close(fd)
        if term_pty is not None:
            term_pty.close()
