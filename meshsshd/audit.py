"""Audit events: what happened on the SSH server, as values, and where they go.

Events are frozen dataclasses named in the past tense. `connection.py` and the session code
emit them through an `AuditSink`; the standalone daemon logs them, the managed daemon
also posts them to management (`type` and fields follow docs/protocol.md AuditEvent).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from .logs import event as log_event

log = logging.getLogger("meshsshd.audit")


@dataclass(frozen=True)
class AuditEvent:
    type: ClassVar[str] = "event"
    session_id: str = ""
    identity: str = ""
    source_ip: str = ""
    local_user: str = ""
    via: str | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """Wire form (docs/protocol.md): iso8601 time, absent fields omitted."""
        doc = {k: v for k, v in asdict(self).items() if v not in (None, "")}
        doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        doc["type"] = self.type
        return doc


@dataclass(frozen=True)
class SessionStarted(AuditEvent):
    type: ClassVar[str] = "session.started"
    kind: str = ""          # shell | exec | subsystem


@dataclass(frozen=True)
class SessionEnded(AuditEvent):
    type: ClassVar[str] = "session.ended"
    exit_status: int | None = None
    exit_signal: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str = ""        # daemon-restart: ended at start-up, left by a crashed run


@dataclass(frozen=True)
class CommandExecuted(AuditEvent):
    type: ClassVar[str] = "exec"
    command: str = ""


@dataclass(frozen=True)
class SubsystemStarted(AuditEvent):
    type: ClassVar[str] = "subsystem"
    subsystem: str = ""


@dataclass(frozen=True)
class ForwardOpened(AuditEvent):
    type: ClassVar[str] = "forward.opened"
    forward: str = ""       # "local 127.0.0.1:80", "remote 127.0.0.1:8080", "agent"


@dataclass(frozen=True)
class ForwardClosed(AuditEvent):
    """A forward a settings change no longer allows was closed (forwarding.py recheck)."""
    type: ClassVar[str] = "forward.closed"
    forward: str = ""       # as in ForwardOpened
    reason: str = ""


@dataclass(frozen=True)
class AuthRefused(AuditEvent):
    type: ClassVar[str] = "auth.refused"
    reason: str = ""


@dataclass(frozen=True)
class SessionRevoked(AuditEvent):
    type: ClassVar[str] = "session.revoked"
    reason: str = ""


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Must not block or raise; queue if delivery is slow."""


class LoggingAuditSink:
    """Writes each event as one structured log line."""

    def emit(self, event: AuditEvent) -> None:
        doc = event.to_dict()
        name = doc.pop("type")
        log_event(log, f"audit.{name}", **doc)


class FanoutAuditSink:
    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = list(sinks)

    def emit(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:  # a broken sink must not break sessions
                log.exception("audit sink failed")
