"""Dial one address as the user and hand the connected socket back to the daemon.

Run by path (`python -I -S _dial_helper.py ADDRESS PORT TIMEOUT`, standard library only)
through the same privilege drop as a session (`_spawn.spawn`, setpriv), so the kernel
sees the user's uid on the socket: uid-based egress rules (nftables/iptables
`--uid-owner`) hold for `ssh -L`/`-D` exactly as for a program the user runs. fd 0 is a
unix socket to the daemon; the reply is one message: b"K" with the socket attached
(SCM_RIGHTS), or b"E" and the error text. The daemon checked the address against its
policy before starting this; the helper dials that literal address and nothing else.
"""

from __future__ import annotations

import socket
import sys


def main() -> int:
    address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    back = socket.socket(fileno=0)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except OSError as exc:
        text = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        back.sendall(b"E" + text.encode(errors="replace"))
        return 1
    socket.send_fds(back, [b"K"], [sock.fileno()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
