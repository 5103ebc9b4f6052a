"""Dialling as the user (meshsshd/dialer.py) with the real helper process."""

from __future__ import annotations

import os
import socket

import pytest

from meshsshd.dialer import DialError, dial_as_user, listen_as_user
from meshsshd.users import lookup_user_sync
from tests.support import free_port, os_user, require_root


async def test_connects_as_the_user_and_says_why_not() -> None:
    require_root()
    with os_user("mdl") as pw, socket.create_server(("127.0.0.1", 0)) as listener:
        user = lookup_user_sync(pw.pw_name)
        assert user is not None
        port = listener.getsockname()[1]
        sock = await dial_as_user(user, "127.0.0.1", port, 5)
        with sock:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getpeername() == sock.getsockname()
                # the kernel's owner of the socket is the user, not the daemon
                inode = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
                assert _socket_uid(inode) == pw.pw_uid
        with pytest.raises(DialError, match="refused"):
            await dial_as_user(user, "127.0.0.1", free_port(), 5)


def _socket_uid(inode_link: str) -> int:
    """The uid column of /proc/net/tcp for the socket with that inode."""
    inode = inode_link.removeprefix("socket:[").rstrip("]")
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if cols[9] == inode:
                return int(cols[7])
    raise AssertionError("socket not in /proc/net/tcp")


async def test_listens_as_the_user_with_the_users_limits() -> None:
    """The helper binds with the user's credentials: the socket is theirs, a port below
    1024 is the kernel's to refuse (no CAP_NET_BIND_SERVICE), and port 0 gives every
    address the same port."""
    require_root()
    with os_user("mdl") as pw:
        user = lookup_user_sync(pw.pw_name)
        assert user is not None
        socks = await listen_as_user(user, ["127.0.0.1"], 0)
        with socks[0] as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert _socket_uid(f"socket:[{os.fstat(sock.fileno()).st_ino}]") == pw.pw_uid
            with pytest.raises(DialError, match="Address already in use"):
                await listen_as_user(user, ["127.0.0.1"], sock.getsockname()[1])
        with pytest.raises(DialError, match="Permission denied"):
            await listen_as_user(user, ["127.0.0.1"], 1000)
