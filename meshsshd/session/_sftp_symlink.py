"""SSH_FXP_SYMLINK in the order OpenSSH's sftp-server reads it, whatever the client sent.

SFTP v3 says SYMLINK carries (linkpath, targetpath); OpenSSH's sftp-server, which serves
`sftp` here, has always read them the other way round, and its own client, paramiko,
curl (libssh2), PuTTY, sshfs and Go's pkg/sftp send them that way. Some clients send the
draft's order unless the server's version string says OpenSSH (asyncssh, node's ssh2,
libssh): against meshsshd their links came out backwards or failed. For those clients only, this filter
sits in the client-to-server byte stream and swaps the two strings of each SYMLINK
packet; it reads packet headers and otherwise passes bytes through untouched, so the
data path of everyone else is not even wrapped."""

from __future__ import annotations

import struct

FXP_SYMLINK = 20
# How the software part of the identification string starts for clients that send
# SYMLINK in the draft's order to a server that does not call itself OpenSSH. Each ends
# where the name does: libssh2 (`libssh2_1.10.0`, curl's) sends what its caller passes,
# which is OpenSSH's order, and must not be taken for libssh (`libssh_0.10.4`). node's
# ssh2 puts its version right after the name (`ssh2js1.17.0`).
DRAFT_ORDER_CLIENTS = ("AsyncSSH_", "ssh2js", "libssh_")
_MAX_SYMLINK = 64 * 1024   # a longer SYMLINK packet is passed through as it is


def needs_swap(client_version: str) -> bool:
    """`SSH-2.0-AsyncSSH_2.24.1` → True. The software name is the first word after the
    protocol version, up to its own version."""
    software = client_version.split("-", 2)[2] if client_version.count("-") >= 2 else ""
    return any(software.startswith(name) for name in DRAFT_ORDER_CLIENTS)


def _swapped(packet: bytes) -> bytes:
    """A whole SYMLINK packet (length prefix included) with its two paths exchanged;
    unchanged when it does not parse."""
    try:
        at = 4 + 1 + 4   # length, type, request id
        (n1,) = struct.unpack_from(">I", packet, at)
        first = packet[at + 4: at + 4 + n1]
        (n2,) = struct.unpack_from(">I", packet, at + 4 + n1)
        second = packet[at + 8 + n1: at + 8 + n1 + n2]
        if len(first) != n1 or len(second) != n2 or at + 8 + n1 + n2 != len(packet):
            return packet
    except struct.error:
        return packet
    return packet[:at] + struct.pack(">I", n2) + second + struct.pack(">I", n1) + first


class SymlinkOrder:
    """Feed the client's bytes in, write what comes out to sftp-server's stdin."""

    def __init__(self) -> None:
        self._head = b""     # a packet's first bytes, until its length and type are known
        self._skip = 0       # bytes of the current (non-SYMLINK) packet still to pass
        self._symlink = b""  # a SYMLINK packet being collected
        self._want = 0       # its total size

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                out.append(bytes(view[:n]))
                view, self._skip = view[n:], self._skip - n
            elif self._want:
                n = min(self._want - len(self._symlink), len(view))
                self._symlink += bytes(view[:n])
                view = view[n:]
                if len(self._symlink) == self._want:
                    out.append(_swapped(self._symlink))
                    self._symlink, self._want = b"", 0
            else:
                n = min(5 - len(self._head), len(view))
                self._head += bytes(view[:n])
                view = view[n:]
                if len(self._head) < 5:
                    break
                (length,) = struct.unpack_from(">I", self._head)
                if self._head[4] == FXP_SYMLINK and 5 <= length + 4 <= _MAX_SYMLINK:
                    self._symlink, self._want = self._head, length + 4
                else:
                    out.append(self._head)
                    self._skip = max(0, length - 1)
                self._head = b""
        return b"".join(out)
