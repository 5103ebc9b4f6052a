"""A session's metadata record (`<id>.json`) read as policy: who may see it, when it is
pruned, what `list` shows. Pure, so the owner fence and the expiry are tested as tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def may_see(meta: Mapping[str, Any], identity: str, local_user: str) -> bool:
    """Only the identity that started a session, as the same local user."""
    return bool(identity) and meta.get("identity") == identity and meta.get("local_user") == local_user


def is_expired(meta: Mapping[str, Any], now: float, keep_seconds: float) -> bool:
    """A finished (or lost) session is pruned `keep_seconds` after it ended."""
    if meta.get("state") == "running":
        return False
    return now - float(meta.get("finished") or meta.get("started") or 0) > keep_seconds


def summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What `list` shows a client (no pids, no paths)."""
    keys = ("id", "command", "pty", "started", "state", "exit_status", "exit_signal", "finished", "dropped")
    return {k: meta.get(k) for k in keys}
