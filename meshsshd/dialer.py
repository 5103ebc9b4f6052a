"""Connecting on a user's behalf with the user's credentials (`ssh -L`, `ssh -D`).

The root daemon never dials for a user: a socket it opened would carry uid 0, and
uid-based egress rules ("only root may reach the metadata service") would not apply. A
small helper (`session/_dial_helper.py`) is started through the sessions' own privilege
drop (`session._spawn.spawn`: setpriv, no capabilities), connects to the one address the
daemon already checked, and passes the connected socket back over SCM_RIGHTS. The
helper costs one short-lived process per forwarded connection, which is what OpenSSH's
per-connection child costs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

from .session._spawn import USER_PATH, spawn
from .users import LocalUser

DIAL_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "session", "_dial_helper.py")
_REPLY_MAX = 512


class DialError(OSError):
    """The connection could not be made; str() is short and safe for the client."""


def _start_helper(user: LocalUser, address: str, port: int, timeout: float) -> tuple[subprocess.Popen, socket.socket]:
    """Blocking (executor): the helper as the user, and the daemon's end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with open(os.devnull, "wb") as devnull:
            argv = [sys.executable, "-I", "-S", DIAL_HELPER, address, str(port), f"{timeout:.3f}"]
            proc = spawn(user, sys.executable, argv, {"PATH": USER_PATH}, stdin=theirs.fileno(),
                         stdout=devnull.fileno(), stderr=devnull.fileno(), new_session=True,
                         enter_home=False)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


async def _reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message with its attached fds, without holding an executor thread."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
    msg, fds, _flags, _addr = socket.recv_fds(sock, _REPLY_MAX, 1)
    return msg, fds


async def dial_as_user(user: LocalUser, address: str, port: int, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to address:port, opened as `user`.

    Raises DialError (refused, unreachable, timed out) or OSError (helper not started)."""
    loop = asyncio.get_running_loop()
    proc, ours = await loop.run_in_executor(None, _start_helper, user, address, port, timeout)
    try:
        try:
            msg, fds = await asyncio.wait_for(_reply(ours), timeout + 5.0)
        except asyncio.TimeoutError:
            raise DialError(f"connecting to {address} port {port} timed out") from None
        if msg[:1] == b"K" and len(fds) == 1:
            try:
                sock = socket.socket(fileno=fds[0])
            except OSError:   # not a socket: the user tampered with their own helper
                os.close(fds[0])
                raise DialError(f"connecting to {address} port {port}: dial helper failed") from None
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                sock.close()
                raise DialError(f"connecting to {address} port {port}: dial helper failed")
            sock.setblocking(False)
            return sock
        for fd in fds:
            os.close(fd)
        text = msg[1:].decode(errors="replace") if msg[:1] == b"E" else "dial helper failed"
        raise DialError(f"connecting to {address} port {port}: {text}")
    finally:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None:
                proc.kill()   # our own unreaped child: its pid cannot have been reused
        await loop.run_in_executor(None, proc.wait)
