"""Audit events of detached sessions, in one place: the store, the channel and the
policy re-check each emit some, and management lists them together (`management/events.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..audit import AuditEvent


@dataclass(frozen=True)
class DetachedStarted(AuditEvent):
    type: ClassVar[str] = "detached.started"
    command: str = ""       # "" for a login shell


@dataclass(frozen=True)
class DetachedAttached(AuditEvent):
    type: ClassVar[str] = "detached.attached"


@dataclass(frozen=True)
class DetachedDetached(AuditEvent):
    type: ClassVar[str] = "detached.detached"
    reason: str = ""        # client-left | attached-elsewhere | ended


@dataclass(frozen=True)
class DetachedKilled(AuditEvent):
    type: ClassVar[str] = "detached.killed"
    reason: str = ""        # killed | forgotten (already finished)



@dataclass(frozen=True)
class DetachedRevoked(AuditEvent):
    type: ClassVar[str] = "detached.revoked"
    reason: str = ""        # the access-rule reason code (source, identity, local-user, method, ...)
