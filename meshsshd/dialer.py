"""Sockets on a user's behalf, made with the user's credentials (`ssh -L`, `-D`, `-R`).

The root daemon never dials or binds for a user: a socket it opened would carry uid 0,
uid-based egress rules ("only root may reach the metadata service") would not apply to
`-L`, and a `-R` listener would be root's, bound with root's right to any port. A small
helper (`session/_socket_helper.py`) is started through the sessions' own privilege drop
(`session._spawn.spawn`: setpriv, no capabilities), connects to (or binds and listens on)
exactly the addresses the daemon already checked, and passes the socket back over
SCM_RIGHTS; the daemon checks what it got before using it. The helper costs one
short-lived process per forwarded connection or `-R` request, which is what OpenSSH's
per-connection child costs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from .session._spawn import USER_PATH, spawn
from .users import LocalUser

SOCKET_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "session", "_socket_helper.py")
LISTEN_TIMEOUT = 10.0   # a bind does not wait on the network: this only bounds a stuck helper
_REPLY_MAX = 512
_MAX_SOCKETS = 8


class DialError(OSError):
    """The socket could not be made; str() is short and safe for the client."""


def _start_helper(user: LocalUser, args: Sequence[str]) -> tuple[subprocess.Popen, socket.socket]:
    """Blocking (executor): the helper as the user, and the daemon's end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with open(os.devnull, "wb") as devnull:
            argv = [sys.executable, "-I", "-S", SOCKET_HELPER, *args]
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
    msg, fds, _flags, _addr = socket.recv_fds(sock, _REPLY_MAX, _MAX_SOCKETS)
    return msg, fds


def _inet_streams(fds: list[int]) -> list[socket.socket]:
    """The fds as non-blocking TCP sockets; raises ValueError (all closed) when one is
    something else: the user may tamper with their own helper."""
    socks: list[socket.socket] = []
    bad = False
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:   # not a socket
            os.close(fd)
            bad = True
            continue
        socks.append(sock)
        bad = bad or sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6)
    if bad:
        for sock in socks:
            sock.close()
        raise ValueError("not TCP sockets")
    for sock in socks:
        sock.setblocking(False)
    return socks


async def _helper_sockets(user: LocalUser, args: Sequence[str], timeout: float, what: str) -> list[socket.socket]:
    """Run the helper with `args` as `user`: the sockets it made, or DialError naming `what`
    (OSError when the helper cannot start)."""
    loop = asyncio.get_running_loop()
    proc, ours = await loop.run_in_executor(None, _start_helper, user, args)
    try:
        try:
            msg, fds = await asyncio.wait_for(_reply(ours), timeout)
        except asyncio.TimeoutError:
            raise DialError(f"{what} timed out") from None
        if msg[:1] == b"K" and fds:
            try:
                return _inet_streams(fds)
            except ValueError:
                raise DialError(f"{what}: socket helper failed") from None
        for fd in fds:
            os.close(fd)
        text = msg[1:].decode(errors="replace") if msg[:1] == b"E" else "socket helper failed"
        raise DialError(f"{what}: {text}")
    finally:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None:
                proc.kill()   # our own unreaped child: its pid cannot have been reused
        await loop.run_in_executor(None, proc.wait)


async def dial_as_user(user: LocalUser, address: str, port: int, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to address:port, opened as `user`.

    Raises DialError (refused, unreachable, timed out) or OSError (helper not started)."""
    what = f"connecting to {address} port {port}"
    socks = await _helper_sockets(user, ["connect", address, str(port), f"{timeout:.3f}"], timeout + 5.0, what)
    if len(socks) != 1:
        for sock in socks:
            sock.close()
        raise DialError(f"{what}: socket helper failed")
    return socks[0]


def _is_listening_on(sock: socket.socket, address: str, port: int) -> bool:
    try:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        host, bound = sock.getsockname()[:2]
        return ipaddress.ip_address(host) == ipaddress.ip_address(address) and (port == 0 or bound == port)
    except (OSError, ValueError):
        return False


async def listen_as_user(user: LocalUser, addresses: Sequence[str], port: int) -> list[socket.socket]:
    """Non-blocking TCP sockets listening on each address (literal IPs), bound as `user`,
    all on `port` (0: the port the kernel chose for the first).

    Raises DialError (in use, not permitted) or OSError (helper not started)."""
    what = f"listening on port {port}"
    socks = await _helper_sockets(user, ["listen", str(port), *addresses], LISTEN_TIMEOUT, what)
    ports = {sock.getsockname()[1] for sock in socks}
    if (len(socks) != len(addresses) or len(ports) != 1
            or not all(_is_listening_on(s, a, port) for s, a in zip(socks, addresses))):
        for sock in socks:
            sock.close()
        raise DialError(f"{what}: socket helper failed")
    return socks
