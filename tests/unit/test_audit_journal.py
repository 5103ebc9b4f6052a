"""The audit queue on disk (meshsshd/audit_journal.py) as the uplink drives it: every event
is in the file before it is sent, what a crash leaves is replayed, a torn line is skipped."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from meshsshd.audit import SessionStarted
from meshsshd.audit_journal import replay
from meshsshd.audit_uplink import ManagementAuditSink
from meshsshd.errors import StateError
from meshsshd.mgmt_client import ManagementUnavailable


def started(i: int) -> SessionStarted:
    return SessionStarted(session_id=f"s{i}", identity="alice@example.com")


class Management:
    def __init__(self) -> None:
        self.up = False
        self.got: list[dict[str, Any]] = []

    async def post(self, batch: list[dict[str, Any]]) -> None:
        if not self.up:
            raise ManagementUnavailable("connection refused")
        self.got.extend(batch)


async def until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_events_are_on_disk_before_they_are_sent_and_survive_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    mgmt = Management()
    sink = ManagementAuditSink(mgmt.post, interval=0.01, max_backoff=0.05)
    await sink.open(path)
    sink.start()
    for i in range(5):
        sink.emit(started(i))
    await until(lambda: path.stat().st_size > 0 and len(replay(path.read_bytes()).events) == 5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # "kill -9": the tasks vanish, nothing is saved at stop; a new run finds all five.
    for t in (sink._task, sink._writer):  # noqa: SLF001
        assert t is not None
        t.cancel()
    mgmt.up = True
    again = ManagementAuditSink(mgmt.post, interval=0.01)
    assert await again.open(path) == 5
    again.start()
    await until(lambda: len(mgmt.got) == 5)
    assert [d["session_id"] for d in mgmt.got] == [f"s{i}" for i in range(5)]
    # Delivered events are acknowledged in the file: the run after that sends none again.
    await until(lambda: path.stat().st_size == 0)
    await again.stop(flush_timeout=0.1)
    third = ManagementAuditSink(mgmt.post)
    assert await third.open(path) == 0
    await third.stop(flush_timeout=0.1)


async def test_acks_and_drop_markers_replay_to_the_queue_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    mgmt = Management()
    sink = ManagementAuditSink(mgmt.post, max_queue=4, batch_size=2)
    await sink.open(path)
    for i in range(6):   # s0, s1 dropped
        sink.emit(started(i))
    assert await sink.flush_once() == 0          # nothing is sent before it is on disk
    await sink._write_pending()  # noqa: SLF001 - the writer task's step, driven by hand
    mgmt.up = True
    assert await sink.flush_once() == 2          # s2, s3 delivered and acked
    await sink._write_pending()  # noqa: SLF001
    text = path.read_text()
    assert '{"dropped":1}' in text and '{"ack":2}' in text
    left = replay(path.read_bytes())
    assert [d["session_id"] for d in left.events] == ["s4", "s5"] == [d["session_id"] for d in sink.queue]
    assert left.dropped == 2
    await sink.stop(flush_timeout=0.1)


async def test_a_torn_last_line_is_skipped_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    whole = json.dumps(started(1).to_dict()) + "\n"
    path.write_text(whole + '{"ack":0}\n' + whole[: len(whole) // 2])
    os.chmod(path, 0o600)
    sink = ManagementAuditSink(None)
    assert await sink.open(path) == 1
    assert "audit.journal_torn" in caplog.text
    # The file was rewritten clean: the next append starts on a line of its own.
    assert path.read_text() == json.dumps(started(1).to_dict(), separators=(",", ":")) + "\n"
    await sink.stop(flush_timeout=0.1)


async def test_the_journal_is_not_opened_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "events.jsonl").symlink_to(target)
    sink = ManagementAuditSink(None)
    with pytest.raises(StateError, match="symlink"):
        await sink.open(tmp_path / "events.jsonl")


async def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    sink = ManagementAuditSink(None, max_bytes=1000)
    await sink.open(tmp_path / "events.jsonl")
    for i in range(50):
        sink.emit(started(i))
    assert sink._bytes <= 1000 and sink.dropped > 0  # noqa: SLF001
    await sink.stop(flush_timeout=0.1)
    assert len(replay((tmp_path / "events.jsonl").read_bytes()).events) == len(sink.queue)


async def test_a_journal_that_cannot_be_written_does_not_stop_delivery(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Failure injection (a full disk): events go out from memory, and the file is
    rewritten whole once writing works again."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "events.jsonl"
    mgmt = Management()
    mgmt.up = True
    sink = ManagementAuditSink(mgmt.post, interval=0.01)
    await sink.open(path)
    assert sink.journal is not None
    real_append = sink.journal.append
    fail = [True]

    def append(data: bytes) -> None:
        if fail[0]:
            raise StateError(f"cannot write {path}: the disk is full")
        real_append(data)

    sink.journal.append = append  # type: ignore[method-assign]
    sink.start()
    sink.emit(started(1))
    await until(lambda: len(mgmt.got) == 1)
    assert "audit.journal_failed" in caplog.text
    mgmt.up = False
    fail[0] = False
    sink.emit(started(2))
    await until(lambda: "audit.journal_recovered" in caplog.text)
    assert [d["session_id"] for d in replay(path.read_bytes()).events] == ["s2"]
    await sink.stop(flush_timeout=0.1)
