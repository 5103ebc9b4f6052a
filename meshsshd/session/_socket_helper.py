"""Make one socket as the user and hand it back to the daemon: a dial or a listener.

Run by path (standard library only) through the same privilege drop as a session
(`_spawn.spawn`, setpriv), so the kernel sees the user's uid on the socket:

- `python -I -S _socket_helper.py connect ADDRESS PORT TIMEOUT` (`ssh -L`, `-D`): uid-based
  egress rules (nftables/iptables `--uid-owner`) hold exactly as for a program the user
  runs.
- `python -I -S _socket_helper.py listen PORT ADDRESS...` (`ssh -R`): the listening socket
  is the user's, and the kernel applies the user's limits to the bind (no port below
  `ip_unprivileged_port_start` without CAP_NET_BIND_SERVICE). One socket per address, all
  on the same port (port 0: the one the kernel gave the first), as sshd binds
  `localhost` on 127.0.0.1 and ::1.

fd 0 is a unix socket to the daemon; the reply is one message: b"K" with the sockets
attached (SCM_RIGHTS), or b"E" and the error text. The daemon checked every address
against its policy before starting this; the helper uses those literal addresses and
nothing else, and the daemon checks what comes back.
"""

from __future__ import annotations

import socket
import sys

LISTEN_BACKLOG = 128


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _connect(address: str, port: str, timeout: str) -> list[socket.socket]:
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    sock.settimeout(float(timeout))
    sock.connect((address, int(port)))
    return [sock]


def _listen(port_text: str, *addresses: str) -> list[socket.socket]:
    port, socks = int(port_text), []
    for address in addresses:
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
        port = sock.getsockname()[1]
    return socks


def main() -> int:
    back = socket.socket(fileno=0)
    verb, args = sys.argv[1], sys.argv[2:]
    make = {"connect": _connect, "listen": _listen}[verb]
    try:
        socks = make(*args)
    except OSError as exc:
        text = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        back.sendall(b"E" + text.encode(errors="replace"))
        return 1
    socket.send_fds(back, [b"K"], [s.fileno() for s in socks])
    return 0


if __name__ == "__main__":
    sys.exit(main())
