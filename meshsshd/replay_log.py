"""The JWT replay cache's memory across restarts: one line per accepted token.

The validator (meshsshd/auth.py) remembers each accepted (issuer, jti) until the token
could no longer be accepted anyway; in memory only, a restart would make every token
used in the last minutes good again. So each accepted token is appended here before its
login is let in, and a starting server reads the still-live entries back.

`<state_dir>/jti-replay.log`, mode 0600, opened with O_NOFOLLOW; one JSON array per
line, `[issuer, jti, until]`. Appends are single small writes with O_APPEND; the file
is rewritten with only the live entries when it starts, and whenever it has grown to
more than twice the live entries (plus a slack). A torn last line (a crash while
writing) is skipped. Blocking: callers use an executor.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .state import SECRET_MODE, atomic_write

Entry = tuple[str, str, float]  # issuer, jti, until (epoch seconds)

FILE_NAME = "jti-replay.log"
COMPACT_SLACK = 1000


def _line(entry: Entry) -> bytes:
    return json.dumps(list(entry), separators=(",", ":")).encode() + b"\n"


def _parse(raw: bytes) -> Entry | None:
    try:
        iss, jti, until = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(iss, str) and isinstance(jti, str) and isinstance(until, (int, float)):
        return iss, jti, float(until)
    return None


class ReplayLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._lines = 0

    def load(self, now: float) -> list[Entry]:
        """The live entries; the file is compacted to them. OSError if it cannot be read
        (then the caller must assume the worst about older tokens)."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return []
            with os.fdopen(fd, "rb") as f:
                entries = [e for raw in f if (e := _parse(raw)) is not None and e[2] >= now]
            self._rewrite(entries)
            return entries

    def append(self, entry: Entry, live: Callable[[], Iterable[Entry]]) -> None:
        """Record one accepted token; compact when the file has grown well past `live`."""
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         SECRET_MODE)
            try:
                os.write(fd, _line(entry))
            finally:
                os.close(fd)
            self._lines += 1
            if self._lines > COMPACT_SLACK:
                current = list(live())
                if self._lines > 2 * len(current) + COMPACT_SLACK:
                    self._rewrite(current)

    def _rewrite(self, entries: list[Entry]) -> None:
        atomic_write(self.path, b"".join(_line(e) for e in entries), SECRET_MODE)
        self._lines = len(entries)
