"""The SSH agent protocol's framing (draft-miller-ssh-agent), as the token broker uses it.

Pure functions over bytes: frames, SSH strings, SSH_AGENTC_EXTENSION requests whose one
argument is a JSON object, and the answers to them (client/broker.py, client/broker_client.py,
docs/delegation.md).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

# draft-miller-ssh-agent message numbers
AGENT_FAILURE = 5
AGENT_SUCCESS = 6
AGENTC_REQUEST_IDENTITIES = 11
AGENT_IDENTITIES_ANSWER = 12
AGENTC_EXTENSION = 27
AGENT_EXTENSION_FAILURE = 28

MAX_MESSAGE = 1 << 20  # an agent message larger than this is a protocol error

# the broker's two extension requests (client/broker.py answers them, client/broker_client.py asks)
EXT_TOKEN = "ssh-token@meshsshd"
EXT_PEERS = "peers@meshsshd"


def put_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def get_string(buf: bytes, off: int = 0) -> tuple[bytes, int]:
    if off + 4 > len(buf):
        raise ValueError("truncated string")
    (n,) = struct.unpack_from(">I", buf, off)
    end = off + 4 + n
    if end > len(buf):
        raise ValueError("truncated string")
    return buf[off + 4:end], end


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def extension_request(name: str, doc: dict[str, Any] | None = None) -> bytes:
    """The payload (unframed) of SSH_AGENTC_EXTENSION `name` with a JSON document."""
    body = put_string(name.encode())
    if doc is not None:
        body += put_string(json.dumps(doc, separators=(",", ":")).encode())
    return bytes([AGENTC_EXTENSION]) + body


def parse_extension(payload: bytes) -> tuple[str, bytes] | None:
    """(extension name, the rest) for an SSH_AGENTC_EXTENSION payload, else None."""
    if not payload or payload[0] != AGENTC_EXTENSION:
        return None
    try:
        name, off = get_string(payload, 1)
        return name.decode("utf-8"), payload[off:]
    except (ValueError, UnicodeDecodeError):
        return None


def parse_json_arg(rest: bytes) -> dict[str, Any]:
    """The JSON document that follows our extension names; ValueError if malformed."""
    raw, off = get_string(rest, 0)
    if off != len(rest):
        raise ValueError("trailing bytes")
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


def reply(ok: bool, doc: dict[str, Any]) -> bytes:
    """SUCCESS or EXTENSION_FAILURE, each followed by a JSON string (the reason too)."""
    code = AGENT_SUCCESS if ok else AGENT_EXTENSION_FAILURE
    return bytes([code]) + put_string(json.dumps(doc, separators=(",", ":")).encode())


def parse_reply(payload: bytes) -> tuple[int, dict[str, Any]]:
    """(message code, JSON document or {}) of an answer to one of our extensions."""
    if not payload:
        raise ValueError("empty reply")
    code = payload[0]
    if code == AGENT_FAILURE or len(payload) == 1:
        return code, {}
    raw, _ = get_string(payload, 1)
    doc = json.loads(raw)
    return code, doc if isinstance(doc, dict) else {}


def query_reply(names: Iterable[str]) -> bytes:
    return bytes([AGENT_SUCCESS]) + b"".join(put_string(n.encode()) for n in names)


def parse_query_reply(payload: bytes) -> list[str]:
    if not payload or payload[0] != AGENT_SUCCESS:
        return []
    out, off = [], 1
    try:
        while off < len(payload):
            name, off = get_string(payload, off)
            out.append(name.decode("utf-8", "replace"))
    except ValueError:
        pass
    return out
