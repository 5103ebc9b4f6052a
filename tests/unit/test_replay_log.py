"""meshsshd.replay_log on real files: what a starting server reads back, and that the log
stays private and bounded. The restart itself is tested through the real server in
tests/integration/test_jwt_login.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshsshd import replay_log
from meshsshd.replay_log import ReplayLog


def test_live_entries_come_back_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    log = ReplayLog(tmp_path / "jti-replay.log")
    log.append(("iss", "old", 100.0), list)
    log.append(("iss", "live", 300.0), list)
    with open(log.path, "ab") as f:
        f.write(b'["iss","torn",3')  # a crash in the middle of a write
    assert log.path.stat().st_mode & 0o777 == 0o600
    assert ReplayLog(log.path).load(now=200.0) == [("iss", "live", 300.0)]
    assert log.path.read_text() == '["iss","live",300.0]\n'  # compacted at load


def test_the_log_is_compacted_to_the_live_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_log, "COMPACT_SLACK", 3)
    log = ReplayLog(tmp_path / "jti-replay.log")
    live = [("iss", "keep", 9e9)]
    for i in range(10):
        log.append(("iss", f"j{i}", 1.0), lambda: live)
    assert len(log.path.read_text().splitlines()) <= 2 * len(live) + 3 + 1


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, tmp_path / "jti-replay.log")
    with pytest.raises(OSError):
        ReplayLog(tmp_path / "jti-replay.log").append(("iss", "j", 1.0), list)
    with pytest.raises(OSError):
        ReplayLog(tmp_path / "jti-replay.log").load(now=0.0)
    assert target.read_text() == ""
