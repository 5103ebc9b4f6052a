"""The holder's wire frames (1 type byte, 4-byte big-endian length, payload), as the daemon
reads and writes them. The holder (`session/_holder.py`) keeps its own copy: it imports
nothing of the daemon."""

from __future__ import annotations

import struct

_HEADER = struct.Struct(">cI")


def iter_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Complete frames at the head of buf (consumed); partial ones stay."""
    out = []
    while len(buf) >= _HEADER.size:
        kind, size = _HEADER.unpack_from(buf)
        if len(buf) < _HEADER.size + size:
            break
        out.append((kind, bytes(buf[_HEADER.size:_HEADER.size + size])))
        del buf[:_HEADER.size + size]
    return out


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload
