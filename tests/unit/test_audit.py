"""Audit events: wire form per docs/protocol.md, sinks never break sessions."""

from __future__ import annotations

import json
import logging

from meshsshd.audit import (AuditEvent, CommandExecuted, FanoutAuditSink, ForwardOpened, LoggingAuditSink,
                            SessionEnded, SessionRevoked)


def test_wire_form_omits_empty_fields_and_uses_protocol_type_names():
    ev = SessionEnded(session_id="s1", identity="alice@example.com", source_ip="100.64.0.7", local_user="alice",
                      exit_status=0, time=1700000000.0)
    assert ev.to_dict() == {"type": "session.ended", "time": "2023-11-14T22:13:20Z", "session_id": "s1",
                            "identity": "alice@example.com", "source_ip": "100.64.0.7", "local_user": "alice",
                            "exit_status": 0, "bytes_in": 0, "bytes_out": 0}
    assert CommandExecuted(command="ls").to_dict()["type"] == "exec"
    assert ForwardOpened(forward="local 127.0.0.1:80").to_dict()["forward"] == "local 127.0.0.1:80"
    assert "via" not in SessionRevoked(reason="source").to_dict()


def test_logging_sink_writes_one_structured_line(caplog):
    caplog.set_level(logging.INFO, logger="meshsshd.audit")
    LoggingAuditSink().emit(CommandExecuted(session_id="s2", command="id"))
    [record] = caplog.records
    assert record.getMessage() == "audit.exec"
    assert record.fields["command"] == "id" and record.fields["session_id"] == "s2"
    json.dumps(record.fields)


def test_fanout_survives_a_broken_sink():
    got: list[AuditEvent] = []

    class Broken:
        def emit(self, event: AuditEvent) -> None:
            raise RuntimeError("down")

    class Keep:
        def emit(self, event: AuditEvent) -> None:
            got.append(event)

    FanoutAuditSink(Broken(), Keep()).emit(SessionRevoked(reason="identity"))
    assert [e.type for e in got] == ["session.revoked"]
