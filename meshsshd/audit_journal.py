"""The audit queue on disk (events.jsonl): every event is appended before it is sent.

The file is a journal of the in-memory queue's changes, one JSON object a line:

    {"type": "session.started", ...}   an event joins the tail of the queue
    {"ack": N}                         the N oldest events were delivered
    {"dropped": N}                     the N oldest events were dropped (the queue was full)

Replaying the lines in order rebuilds the queue exactly as it was in memory, so a kill -9
loses nothing that reached the file, and after a crash the events not yet acknowledged
are sent again. Delivery is therefore at-least-once: the batch in flight when the daemon
died (posted, acknowledgement not yet written) is posted a second time; management has
no event id to de-duplicate by (docs/mesh.md, "Audit").

Durability: `append` is a `write()` (in the page cache at once, so a kill -9 of the
daemon cannot lose it); `sync` is an `fsync`, which the uplink calls at most once per
`fsync_interval` while there is something unsynced, so a power loss loses at most the
events of the last interval. A crash in the middle of a write leaves a torn last line:
replay skips it with a log line and the file is rewritten clean at start.

The file lives in the root-only state directory, mode 0600, and is opened with
`O_NOFOLLOW`; a file there that is not a regular file owned by us is refused. All of this
blocks: the uplink calls it through the executor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StateError
from .logs import event
from .state import SECRET_MODE, atomic_write

log = logging.getLogger("meshsshd.audit_journal")

_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def encode(doc: dict[str, Any]) -> bytes:
    """One journal line."""
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


@dataclass
class Replayed:
    """What the previous run left: the queue it had, and how many it had dropped."""

    events: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0
    skipped: int = 0


def replay(data: bytes) -> Replayed:
    """Apply the journal's lines in order; a line that does not parse is skipped."""
    out = Replayed()
    lines = data.split(b"\n")
    if lines[-1]:
        event(log, "audit.journal_torn", logging.WARNING, bytes=len(lines[-1]),
              effect="the last line was cut off by a crash and is skipped")
        out.skipped += 1
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("type"), str):
            out.events.append(doc)
        elif isinstance(doc, dict) and _count(doc, "ack") is not None:
            _pop(out.events, _count(doc, "ack") or 0)
        elif isinstance(doc, dict) and _count(doc, "dropped") is not None:
            n = _count(doc, "dropped") or 0
            out.dropped += _pop(out.events, n)
        else:
            out.skipped += 1
            event(log, "audit.journal_bad_line", logging.WARNING, bytes=len(line))
    return out


def _count(doc: dict[str, Any], key: str) -> int | None:
    v = doc.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _pop(queue: deque[dict[str, Any]], n: int) -> int:
    popped = 0
    while queue and popped < n:
        queue.popleft()
        popped += 1
    return popped


class AuditJournal:
    """The open events.jsonl (blocking methods: call them through the executor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.size = 0

    def open(self) -> Replayed:
        """Read what the previous run left, rewrite it as a clean file of only the events
        still queued, and open that for appending."""
        replayed = replay(self._read())
        self.rewrite(list(replayed.events))
        return replayed

    def _read(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | _FLAGS)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise StateError(f"cannot open {self.path}: {exc.strerror} (a symlink is refused)") from exc
        try:
            self._check(fd)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise StateError(f"{self.path} is not a regular file owned by uid {os.geteuid()}; remove it")

    def rewrite(self, events: list[dict[str, Any]]) -> None:
        """Replace the file with just these events (atomic) and append from there on."""
        data = b"".join(encode(d) for d in events)
        atomic_write(self.path, data, SECRET_MODE)
        self.close()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _FLAGS)
        except OSError as exc:
            raise StateError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            self._check(fd)
        except StateError:
            os.close(fd)
            raise
        self.fd, self.size = fd, len(data)

    def append(self, data: bytes) -> None:
        """Write whole lines at the end (one `write` each time the kernel takes it all)."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
        self.size += len(data)

    def truncate(self) -> None:
        """Everything was delivered: the queue is empty, so is the file."""
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            raise StateError(f"cannot truncate {self.path}: {exc.strerror}") from exc
        self.size = 0

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise StateError(f"cannot sync {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
