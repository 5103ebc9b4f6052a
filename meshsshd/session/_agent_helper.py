"""Make a forwarded-agent socket as the user and hand its listening fd to the daemon.

Run by path (`python -I -S _agent_helper.py`, standard library only) with the user's
credentials, stdin a unix socketpair to the daemon. Like sshd after its privilege drop
it creates `/tmp/ssh-XXXXXXXXXX/` (mode 0700, the user's) and binds `agent.<pid>` in it
(mode 0600), so every path operation is the user's own. It sends the listening socket
back with SCM_RIGHTS (the daemon reads the path from the socket itself, not from us),
then waits: when the daemon closes its end (the connection ended, or the daemon died)
it removes the socket and the directory, again as the user, and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

BASE = "/tmp"


def _make_directory() -> str:
    """`BASE/ssh-XXXXXXXXXX`, mode 0700, as mkdtemp (whose import would double our start)."""
    for _ in range(100):
        path = os.path.join(BASE, "ssh-" + os.urandom(5).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name in {BASE}")


def main() -> int:
    for sig in (signal.SIGHUP, signal.SIGINT):   # the daemon's EOF ends us, not a hang-up
        signal.signal(sig, signal.SIG_IGN)
    daemon = socket.socket(fileno=0)
    try:
        directory = _make_directory()
    except OSError as exc:
        os.write(2, f"meshsshd: agent socket directory in {BASE}: {exc.strerror}\n".encode())
        return 1
    os.umask(0o177)   # for the socket: 0600; nothing else is created after it
    path = os.path.join(directory, f"agent.{os.getpid()}")
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
        socket.send_fds(daemon, [b"ok"], [listener.fileno()])
        listener.close()
        while daemon.recv(64):
            pass
    except OSError as exc:
        os.write(2, f"meshsshd: agent socket: {exc.strerror or exc}\n".encode())
        return 1
    finally:
        for remove in (lambda: os.unlink(path), lambda: os.rmdir(directory)):
            try:
                remove()
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
