"""The SYMLINK swap: only SYMLINK packets change, in any chunking of the stream, and only
for clients that send the draft's order."""

from __future__ import annotations

import random
import struct

import pytest

from meshsshd.session._sftp_symlink import SymlinkOrder, needs_swap


def packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def s(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


def symlink(req: int, first: bytes, second: bytes) -> bytes:
    return packet(20, struct.pack(">I", req) + s(first) + s(second))


@pytest.mark.parametrize("version, swap", [
    ("SSH-2.0-AsyncSSH_2.24.1", True), ("SSH-2.0-ssh2js1.16.0", True), ("SSH-2.0-libssh_0.10.4", True),
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2", False), ("SSH-2.0-paramiko_3.4.0", False),
    ("SSH-2.0-libssh2_1.10.0", False),
    ("SSH-2.0-PuTTY_Release_0.78", False), ("SSH-2.0-Go", False), ("garbage", False), ("", False),
])
def test_which_clients_are_swapped(version: str, swap: bool) -> None:
    assert needs_swap(version) is swap


def test_only_symlink_packets_change_whatever_the_chunking() -> None:
    write = packet(6, struct.pack(">I", 7) + s(b"handle") + struct.pack(">Q", 0) + s(b"\x14" * 70000))
    stream = (packet(1, struct.pack(">I", 3)) + write + symlink(9, b"link", b"target")
              + packet(17, struct.pack(">I", 10) + s(b"/x")) + symlink(11, b"", b"t" * 300))
    want = (packet(1, struct.pack(">I", 3)) + write + symlink(9, b"target", b"link")
            + packet(17, struct.pack(">I", 10) + s(b"/x")) + symlink(11, b"t" * 300, b""))
    rng = random.Random(5)
    for _ in range(200):
        f, out, at = SymlinkOrder(), b"", 0
        while at < len(stream):
            n = rng.choice([1, 2, 3, 5, 7, 64, 4096, 100000])
            out += f.feed(stream[at:at + n])
            at += n
        assert out == want


def test_a_malformed_symlink_passes_unchanged() -> None:
    bad = packet(20, struct.pack(">I", 1) + struct.pack(">I", 999) + b"short")
    assert SymlinkOrder().feed(bad) == bad
