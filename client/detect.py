"""`meshssh detect HOST PORT`: is this a meshsshd, and does it want a JWT?

OpenSSH runs this from the drop-in's `Match … exec` for every matching `ssh`, so it
must be fast and harmless: plain sockets, a short timeout, and it sends nothing — it
only reads the server's identification string (RFC 4253 §4.2 lets a server print
other lines first, so a few are skipped). Exit codes (NetBird's): 0 meshsshd that
requires a JWT, 1 meshsshd without JWT, 2 anything else or any error.
"""

from __future__ import annotations

import socket
import time

JWT_REQUIRED = 0
NO_JWT = 1
OTHER = 2
SOFTWARE_PREFIX = "meshsshd"
JWT_MARKER = "meshsshd-jwt"
TIMEOUT = 3.0
MAX_LINES = 5


def classify(line: str) -> int:
    """The exit code for one identification line, e.g. 'SSH-2.0-meshsshd_0.1 meshsshd-jwt'."""
    line = line.strip()
    if not line.startswith("SSH-2.0-") and not line.startswith("SSH-1.99-"):
        return OTHER
    ident = line.split("-", 2)[2]
    software, _, comments = ident.partition(" ")
    if not software.lower().startswith(SOFTWARE_PREFIX):
        return OTHER
    return JWT_REQUIRED if JWT_MARKER in comments.split() else NO_JWT


def read_identification(host: str, port: int, timeout: float = TIMEOUT) -> str | None:
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            buf = b""
            lines = 0
            while lines < MAX_LINES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
                chunk = sock.recv(256)
                if not chunk:
                    return None
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.rstrip(b"\r").decode("ascii", "replace")
                    if text.startswith("SSH-"):
                        return text
                    lines += 1
                if len(buf) > 255:
                    return None
    except OSError:
        return None
    return None


def detect(host: str, port: int, timeout: float = TIMEOUT) -> int:
    line = read_identification(host, port, timeout)
    return OTHER if line is None else classify(line)
