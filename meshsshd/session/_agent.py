"""Agent forwarding (`ssh -A`): the session's `SSH_AUTH_SOCK`, made by and for the user.

asyncssh answers `auth-agent-req@openssh.com` itself and then listens on a socket of its
own in a root-only temporary directory; that listener stays root's and unused, it only
gives asyncssh's `create_agent_connection` its go-ahead. The socket the user's programs
see is made by `_agent_helper.py`, started with the user's credentials (like a session
child): it creates `/tmp/ssh-XXXXXXXXXX/agent.<pid>` as the user and passes the
listening fd back over SCM_RIGHTS. The daemon accepts on that fd and opens an
`auth-agent@openssh.com` channel per connection, the way asyncssh forwards its own
listener. Nothing privileged touches the path, neither to make it nor to remove it: the
helper removes both when the daemon closes its end of the socketpair (connection closed,
or the daemon gone). Before this, the daemon chowned asyncssh's directory and then the
socket by path, and a user could swap a symlink in between (root chowned the target).

One socket per connection, made on the first session that needs it, as sshd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import asyncssh
from asyncssh.forward import SSHLocalPathForwarder

from ..logs import event
from ..users import LocalUser
from ._spawn import USER_PATH, spawn

log = logging.getLogger("meshsshd.session")

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_agent_helper.py")
HELPER_TIMEOUT = 15.0


@dataclass
class AgentSocket:
    """A listening agent socket the daemon serves; `close` makes the helper remove it."""

    path: str
    server: asyncio.AbstractServer
    channel: socket.socket      # our end of the helper's stdin
    helper: subprocess.Popen

    def close(self) -> None:
        self.server.close()
        self.channel.close()


def _start_helper(user: LocalUser) -> tuple[socket.socket, subprocess.Popen, int]:
    """Blocking (executor): the helper as the user; (our end, process, its stderr)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    err_r, err_w = os.pipe()
    try:
        with open(os.devnull, "rb+") as devnull:
            helper = spawn(user, sys.executable, [sys.executable, "-I", "-S", HELPER], {"PATH": USER_PATH},
                           stdin=theirs.fileno(), stdout=devnull.fileno(), stderr=err_w,
                           new_session=True, enter_home=False)
    except BaseException:
        ours.close()
        os.close(err_r)
        raise
    finally:
        theirs.close()
        os.close(err_w)
    ours.setblocking(False)
    return ours, helper, err_r


def _received_listener(ours: socket.socket, err_r: int) -> socket.socket:
    """The listening socket the helper sent, checked; OSError with its reason if none."""
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
    except BlockingIOError:
        fds = []
    if not fds:
        os.set_blocking(err_r, False)
        with contextlib.suppress(OSError):
            reason = os.read(err_r, 512).decode(errors="replace").strip()
        raise OSError(reason or "agent socket helper failed")
    listener = socket.socket(fileno=fds[0])
    for fd in fds[1:]:
        os.close(fd)
    name = listener.getsockname() if listener.family == socket.AF_UNIX else None
    if (listener.type != socket.SOCK_STREAM or not isinstance(name, str) or not name.startswith("/")
            or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        listener.close()
        raise OSError("agent socket helper sent something else than a listening unix socket")
    listener.setblocking(False)
    return listener


def _reap(loop: asyncio.AbstractEventLoop, helper: subprocess.Popen) -> None:
    """Collect the helper when it exits, without holding an executor thread."""
    pidfd = os.pidfd_open(helper.pid)

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            helper.returncode = os.waitstatus_to_exitcode(os.waitpid(helper.pid, 0)[1])

    loop.add_reader(pidfd, exited)


async def open_agent_socket(conn: asyncssh.SSHServerConnection, user: LocalUser) -> AgentSocket:
    """Make the user's agent socket and serve it over `conn`; raises OSError."""
    loop = asyncio.get_running_loop()
    ours, helper, err_r = await loop.run_in_executor(None, _start_helper, user)
    _reap(loop, helper)
    try:
        ready = loop.create_future()
        loop.add_reader(ours.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, HELPER_TIMEOUT)
        except asyncio.TimeoutError:
            raise OSError("agent socket helper did not answer") from None
        finally:
            loop.remove_reader(ours.fileno())
        listener = _received_listener(ours, err_r)
        try:
            server = await loop.create_unix_server(
                lambda: SSHLocalPathForwarder(conn, conn.create_agent_connection), sock=listener)
        except BaseException:
            listener.close()
            raise
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(err_r)
    return AgentSocket(listener.getsockname(), server, ours, helper)


class AgentForwarding:
    """A connection's forwarded agent: made once, on the first session that asks."""

    def __init__(self) -> None:
        self._task: asyncio.Task[AgentSocket] | None = None
        self._closed = False

    async def path(self, conn: asyncssh.SSHServerConnection, user: LocalUser, session_id: str) -> str | None:
        """SSH_AUTH_SOCK for a session, or None (logged) when it cannot be made."""
        if self._closed:
            return None
        if self._task is None:
            self._task = asyncio.ensure_future(open_agent_socket(conn, user))
        try:
            agent = await asyncio.shield(self._task)
        except OSError as exc:
            event(log, "agent.socket-failed", level=logging.WARNING, session_id=session_id, user=user.name,
                  error=str(exc))
            return None
        return agent.path

    def close(self) -> None:
        """The connection is gone: stop serving; the helper then removes the socket."""
        self._closed = True
        task = self._task
        if task is None:
            return
        if not task.done():
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().close())
        elif not task.cancelled() and task.exception() is None:
            task.result().close()
