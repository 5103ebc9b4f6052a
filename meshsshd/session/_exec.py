"""One SSH session channel backed by a child process running as the local user.

Covers everything OpenSSH's session does for us: PTY shells, `exec`, the no-PTY
no-command shell (VS Code), `sftp` and configured subsystems (run as `$SHELL -c cmd`),
signals to the process group, exit-status/exit-signal, stderr kept apart and never lost,
flow control both ways, and the process group killed when the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from .. import audit
from ..idle import IdleWatch
from ..logs import event
from ..users import LocalUser
from . import _utmp
from ._agent import AgentForwarding
from ._cgroup import LoginCgroup, kill_login
from ._leftovers import login_cgroup_name
from ._io import FdReader, FdWriter, make_pipe
from ._pty import PTY
from ._sftp_symlink import SymlinkOrder, needs_swap
from ._spawn import (ConnectionInfo, build_child_argv, build_child_env, build_pam_argv, pam_service,
                     signal_as_user, spawn)

log = logging.getLogger("meshsshd.session")

KILL_GRACE = 2.0


@dataclass
class SessionContext:
    """What a session needs from its connection; built by connection.py after auth."""

    user: LocalUser
    conn: ConnectionInfo
    identity: str
    via: str | None
    audit: audit.AuditSink
    resolve_subsystem: Callable[[str], str | None]   # name → command line, None = refused
    accept_env: tuple[str, ...]                      # AcceptEnv patterns; () for forced commands
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    # authorized_keys `command=`: runs instead of whatever the client asks for (sshd's
    # do_exec); meshsshd applies it, not asyncssh, to set SSH_ORIGINAL_COMMAND.
    forced_command: str | None = None
    agent: AgentForwarding = field(default_factory=AgentForwarding)   # closed with the connection
    # How the identity was proven, and its token's own local_users fence: what a policy
    # change re-checks for sessions that outlive the connection (detached/_revoke.py).
    method: str = ""
    token_local_users: tuple[str, ...] | None = None
    cgroup_scope: str = ""   # names this daemon's login cgroups (_leftovers.cgroup_scope)
    channel_timeout: float = 0.0   # sshd's ChannelTimeout session=…: idle seconds, 0 = never

    def base_event(self, session_id: str) -> dict[str, Any]:
        return dict(session_id=session_id, identity=self.identity, source_ip=self.conn.client_ip,
                    local_user=self.user.name, via=self.via)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return f"SIG{signum}"


def _first_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


class ChildSession(asyncssh.SSHServerSession):
    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.id = uuid.uuid4().hex[:12]
        self._chan: asyncssh.SSHServerChannel | None = None
        self._loop = asyncio.get_running_loop()
        self._kind = "shell"
        self._command: str | None = None
        self._original_command: str | None = None
        self._subsystem: str | None = None
        self._term: str | None = None
        self._size = (80, 24, 0, 0)
        self._modes: Mapping[int, int] = {}
        self._want_pty = False
        self._pty: PTY | None = None
        self._popen: subprocess.Popen | None = None
        self._pidfd = -1
        self._stdin: FdWriter | None = None
        self._readers: list[FdReader] = []
        self._input_buf: list[bytes] = []
        self._input_eof = False
        self._symlink_order: SymlinkOrder | None = None
        self._idle: IdleWatch | None = None
        self._exit: tuple[int, int] | None = None   # (returncode, raw wait status)
        self._finished = False
        self._lost = False
        self._peer_closed = False   # the client sent CLOSE; we answer when the command exits
        self._started = time.time()
        self._utmp: _utmp.LoginRecord | None = None
        self._pam = False   # our child is the PAM helper (root); the user's process is its child
        self._cgroup: LoginCgroup | None = None
        self._login_ended = False

    @property
    def closed(self) -> bool:
        return self._lost or self._finished

    # ---- requests before start ------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan
        if self.ctx.channel_timeout:
            self._idle = IdleWatch(self.ctx.channel_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        event(log, "session.idle_closed", session_id=self.id, seconds=self.ctx.channel_timeout)
        self.close(f"closing the session: no traffic for {self.ctx.channel_timeout:g} s (channel_timeout)")

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]) -> bool:
        self._want_pty = True
        self._term = term_type
        self._size = term_size if term_size[0] and term_size[1] else (80, 24, 0, 0)
        self._modes = dict(term_modes)
        return True

    def _forced(self, original: str | None) -> bool:
        """Run the forced command instead of the request, if there is one. As sshd:
        SSH_ORIGINAL_COMMAND is the exec command or the subsystem's command line (a
        shell request has none), and any subsystem request becomes the forced command."""
        if self.ctx.forced_command is None:
            return False
        self._kind, self._command, self._original_command = "exec", self.ctx.forced_command, original
        return True

    def shell_requested(self) -> bool:
        if not self._forced(None):
            self._kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        if not self._forced(command):
            self._kind, self._command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        command = self.ctx.resolve_subsystem(subsystem)
        if self._forced(command or subsystem):
            return True
        if command is None:
            event(log, "subsystem.refused", session_id=self.id, subsystem=subsystem)
            return False
        self._kind, self._subsystem, self._command = "subsystem", subsystem, command
        client = self._chan.get_extra_info("client_version") if self._chan is not None else ""
        if subsystem == "sftp" and needs_swap(str(client or "")):
            self._symlink_order = SymlinkOrder()   # _sftp_symlink.py: for draft-order clients
        self._want_pty = False   # subsystems never get a terminal (as OpenSSH)
        return True

    def session_started(self) -> None:
        self._loop.create_task(self._start())

    # ---- start ----------------------------------------------------------------------
    async def _start(self) -> None:
        chan = self._chan
        assert chan is not None
        user = self.ctx.user
        pty = self._want_pty and self._kind != "subsystem"
        child_fds: list[int] = []
        parent_fds: list[int] = []
        try:
            auth_sock = await self._prepare_agent(chan)
            if pty:
                self._pty = PTY(user.uid, self._size, self._modes)
                stdin = stdout = stderr = self._pty.slave
            else:
                for child_reads in (True, False, False):   # stdin, stdout, stderr
                    r, w = make_pipe()
                    child_fds.append(r if child_reads else w)
                    parent_fds.append(w if child_reads else r)
                stdin, stdout, stderr = child_fds
                parent = tuple(parent_fds)
            env = build_child_env(
                user, self.ctx.conn, chan.get_environment(),
                term=self._term if pty else None,
                tty_name=self._pty.name if self._pty else None,
                auth_sock=auth_sock,
                original_command=self._original_command,
                accept_env=self.ctx.accept_env,
            )
            executable, argv = build_child_argv(user.shell, self._command, pty=pty)
            tty = self._pty.name if self._pty else None
            self._popen = await self._loop.run_in_executor(
                None, lambda: self._spawn(user, executable, argv, env, tty, stdin, stdout, stderr, pty))
        except Exception as exc:   # any failure (OSError, ValueError for a NUL byte, ...)
            self._start_failed(exc, child_fds + parent_fds)
            return
        for fd in child_fds:
            os.close(fd)
        if self._pty:
            self._pty.close_slave()
        self._register()
        if self._lost:   # the client left while we were spawning
            self._kill_group()
        self._watch_child()
        if self._pty:
            master = self._pty.master
            self._stdin = FdWriter(self._loop, os.dup(master), owns_fd=True,
                                   on_pause=chan.pause_reading, on_resume=chan.resume_reading)
            self._readers = [FdReader(self._loop, master, self._write_stdout, self._output_eof, owns_fd=False)]
            self._utmp = _utmp.LoginRecord(self._popen.pid, self._pty.name, user.name, self.ctx.conn.client_ip)
            self._loop.run_in_executor(None, _utmp.write_login, self._utmp)
        else:
            in_w, out_r, err_r = parent
            self._stdin = FdWriter(self._loop, in_w, owns_fd=True,
                                   on_pause=chan.pause_reading, on_resume=chan.resume_reading)
            self._readers = [FdReader(self._loop, out_r, self._write_stdout, self._output_eof),
                             FdReader(self._loop, err_r, self._write_stderr, self._output_eof)]
        for data in self._input_buf:
            self._stdin.write(data)
        self._input_buf.clear()
        if self._input_eof and not self._pty:
            self._stdin.write_eof()

    def _start_failed(self, exc: Exception, fds: list[int]) -> None:
        """Close everything the start opened and answer the channel, whatever failed: a
        channel left without an exit status keeps its fds and its client forever."""
        for fd in fds:
            os.close(fd)
        if self._pty is not None:
            self._pty.close()
            self._pty = None
        if self._cgroup is not None:
            self._loop.run_in_executor(None, self._cgroup.remove)
            self._cgroup = None
        event(log, "session.spawn-failed", level=logging.WARNING, session_id=self.id,
              user=self.ctx.user.name, error=str(exc), error_type=type(exc).__name__)
        self._finished = True
        if self._chan is not None and not self._lost:
            reason = getattr(exc, "strerror", None) or exc
            self._chan.write_stderr(
                f"meshsshd: cannot start session for {self.ctx.user.name}: {reason}\r\n".encode())
            self._chan.exit(1)

    def _spawn(self, user: LocalUser, executable: str, argv: list[str], env: dict[str, str], tty: str | None,
               stdin: int, stdout: int, stderr: int, pty: bool) -> subprocess.Popen:
        """Blocking (executor): through the PAM helper when PAM is configured; in a cgroup of
        its own where cgroup v2 is writable (`_cgroup`)."""
        self._cgroup = LoginCgroup.create(login_cgroup_name(self.ctx.cgroup_scope, self.id)) if os.geteuid() == 0 else None
        service = pam_service()
        if service is not None and os.geteuid() == 0:
            executable, argv = build_pam_argv(user, executable, argv, service=service, tty=tty,
                                              rhost=self.ctx.conn.client_ip, python=sys.executable)
            self._pam = True
            proc = spawn(user, executable, argv, env, stdin=stdin, stdout=stdout, stderr=stderr,
                         new_session=not pty, as_root=True, cgroup=self._cgroup)
        else:
            proc = spawn(user, executable, argv, env, stdin=stdin, stdout=stdout, stderr=stderr,
                         new_session=not pty, cgroup=self._cgroup)
        if self._cgroup is not None:
            self._cgroup.add(proc.pid)
        return proc

    async def _prepare_agent(self, chan: asyncssh.SSHServerChannel) -> str | None:
        """SSH_AUTH_SOCK when the client forwards its agent (asyncssh accepted the request
        and has its own root-only listener); the user's socket comes from `_agent`."""
        if not chan.get_agent_path():
            return None
        path = await self.ctx.agent.path(chan.get_extra_info("connection"), self.ctx.user, self.id)
        if path is not None:
            self.ctx.audit.emit(audit.ForwardOpened(**self.ctx.base_event(self.id), forward="agent"))
        return path

    def _register(self) -> None:
        base = self.ctx.base_event(self.id)
        self.ctx.registry[self.id] = {
            "id": self.id, "identity": self.ctx.identity, "source": self.ctx.conn.client_ip,
            "local_user": self.ctx.user.name, "kind": self._subsystem or self._kind,
            "pty": self._pty is not None, "started": self._started, "pid": self._popen.pid if self._popen else None,
        }
        self.ctx.audit.emit(audit.SessionStarted(**base, kind=self._kind))
        if self._kind == "exec":
            self.ctx.audit.emit(audit.CommandExecuted(**base, command=self._command or ""))
        elif self._kind == "subsystem":
            self.ctx.audit.emit(audit.SubsystemStarted(**base, subsystem=self._subsystem or ""))

    def _watch_child(self) -> None:
        assert self._popen is not None
        self._pidfd = os.pidfd_open(self._popen.pid)
        self._loop.add_reader(self._pidfd, self._child_exited)

    # ---- data -----------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._symlink_order is not None:
            data = self._symlink_order.feed(data)
        if self._stdin is None:
            self._input_buf.append(data)
        else:
            self._stdin.write(data)

    def eof_received(self) -> bool:
        self._input_eof = True
        if self._stdin is not None and self._pty is None:
            self._stdin.write_eof()
        return True   # keep the channel half-open: output still flows

    def _write_stdout(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._chan is not None and not self._lost and not self._peer_closed:
            self._chan.write(data)

    def _write_stderr(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self._chan is not None and not self._lost and not self._peer_closed:
            self._chan.write_stderr(data)

    def pause_writing(self) -> None:
        for r in self._readers:
            r.pause()

    def resume_writing(self) -> None:
        for r in self._readers:
            r.resume()

    # ---- control --------------------------------------------------------------------
    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self._size = (width, height, pixwidth, pixheight)
        if self._pty is not None:
            self._pty.resize(width, height, pixwidth, pixheight)

    def break_received(self, msec: int) -> bool:
        if self._pty is None:
            return False
        try:
            self._pty.send_break(msec)
        except OSError:
            return False
        return True

    def _is_forced_command(self) -> bool:
        """authorized_keys `command=` (meshsshd runs it, ctx.forced_command) or a
        certificate's force-command (asyncssh runs that in place of the client's request)."""
        if self.ctx.forced_command is not None:
            return True
        conn = self._chan.get_extra_info("connection") if self._chan is not None else None
        return conn is not None and conn.get_certificate_option("force-command") is not None

    def signal_received(self, signal_name: str) -> None:
        """As sshd: refused for subsystems and forced commands; otherwise sent to the
        session's process group with the user's credentials (never as root)."""
        if self._kind == "subsystem" or self._popen is None or self._exit is not None:
            return
        signum = getattr(signal, "SIG" + signal_name.upper(), None)
        if signum is None or self._is_forced_command():
            event(log, "session.signal-refused", session_id=self.id, signal=signal_name,
                  reason="unknown" if signum is None else "forced-command")
            return
        self._loop.run_in_executor(None, self._signal_as_user, self._popen.pid, signum)

    def _signal_as_user(self, pid: int, signum: int) -> None:
        """Blocking (executor). Under PAM the group to signal is that of the helper's child
        (a shell with job control leads its own); a stale pid here is harmless, since the
        kill runs with the user's rights."""
        if self._pam:
            pid = _first_child(pid) or pid
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            return
        signal_as_user(self.ctx.user, pgid, signum)

    # ---- end ------------------------------------------------------------------------
    def _child_exited(self) -> None:
        assert self._popen is not None
        try:
            pid, status = os.waitpid(self._popen.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self._popen.pid, 0
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        rc = os.waitstatus_to_exitcode(status)
        self._popen.returncode = rc
        self._exit = (rc, status)
        if self._utmp is not None:
            self._loop.run_in_executor(None, _utmp.write_logout, self._utmp)
            self._utmp = None
        if self._pty is not None:
            # The shell is gone: forward what it left in the terminal and finish, even if
            # a background job still holds the slave open (as sshd does).
            for r in self._readers:
                r.drain()
                r.stop()
        self._maybe_finish()

    def _output_eof(self) -> None:
        """No channel EOF here, even when the child closed its output: clients that close a
        channel once EOF went both ways (plink, an OpenSSH ControlMaster, dbclient) would
        close it before exit-status. `_maybe_finish` sends exit-status, then the close, once
        the child is reaped and its output drained (sshd's order)."""
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished or self._exit is None or not all(r.eof for r in self._readers):
            return
        self._finished = True
        rc, status = self._exit
        chan = self._chan
        sig_name = None
        if chan is not None and not self._lost:
            if os.WIFSIGNALED(status):
                sig_name = _signal_name(os.WTERMSIG(status))
                chan.exit_with_signal(sig_name, os.WCOREDUMP(status), "", "")
            else:
                chan.exit(rc)
        self._end(rc if sig_name is None else None, sig_name)

    def _end_login(self) -> None:
        """The session is over: end what escaped its process group too (`setsid`,
        `nohup`), in its cgroup or, without one, in its session (`_cgroup.kill_login`)."""
        if self._login_ended or self._popen is None:
            return
        self._login_ended = True
        self._loop.run_in_executor(None, kill_login, self._cgroup, self._popen.pid, self.ctx.user.uid)

    def _end(self, exit_status: int | None, exit_signal: str | None) -> None:
        self._end_login()
        if self.ctx.registry.pop(self.id, None) is not None:
            self.ctx.audit.emit(audit.SessionEnded(
                **self.ctx.base_event(self.id), exit_status=exit_status, exit_signal=exit_signal,
                bytes_in=self._stdin.bytes if self._stdin else 0,
                bytes_out=sum(r.bytes for r in self._readers)))
        self._cleanup_fds()

    def _cleanup_fds(self) -> None:
        for r in self._readers:
            r.close()
        if self._stdin is not None:
            self._stdin.close()
        if self._pty is not None and self._exit is not None:
            self._pty.close()

    def _kill_group(self) -> None:
        """End the session's process group (client gone, revoked, shutting down).

        Sent as root on purpose, unlike a user's `signal` request: the signals are the
        daemon's choice, and the group is the one our child leads, which is not reaped
        while `_exit` is None, so its id cannot have been handed to anyone else; a
        session that ends takes what the user started in it along, `sudo`'d commands
        included (with the user's rights those would outlive a revocation)."""
        popen = self._popen
        if popen is None or self._exit is not None:
            return
        try:
            os.killpg(popen.pid, signal.SIGHUP)
            os.killpg(popen.pid, signal.SIGCONT)
        except ProcessLookupError:
            return

        def hard_kill() -> None:
            if self._exit is None:
                try:
                    os.killpg(popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._end_login()
        self._loop.call_later(KILL_GRACE, hard_kill)

    def hold_on_close(self) -> bool:
        """The client closed the channel (`asyncssh_close`): as sshd, a command without a
        terminal runs on, its output is read and dropped, its stdin ends, and exit-status
        goes out before our CLOSE. A terminal session is hung up as before."""
        if self._pty is not None or self._popen is None or self._exit is not None or self._lost:
            return False
        self._peer_closed = True
        self.eof_received()
        self.resume_writing()
        return True

    def close(self, message: str | None = None) -> None:
        """Server-side close (revocation): tell the user, end the process group."""
        if self._chan is not None and not self._lost:
            if message:
                self._chan.write_stderr(f"\r\nmeshsshd: {message}\r\n".encode())
            self._chan.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._idle is not None:
            self._idle.stop()
        if self._pty is not None and self._exit is None:
            # Closing the master hangs up the terminal (SIGHUP to its session).
            for r in self._readers:
                r.stop()
            if self._stdin is not None:
                self._stdin.close()
        self._kill_group()
        if self._exit is not None or self._popen is None:
            self._end(None, None)
        elif self._pty is not None:
            self._pty.close()
