"""Pure parts of detached sessions: the holder's bounded spool and frames, who may see a
session, pruning, and the client's table and destination parsing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from meshssh_client.detach import format_table, split_destination
from meshsshd.detached import is_expired, may_see, summary
from meshsshd.detached._frames import frame, iter_frames

_HOLDER_PATH = Path(__file__).resolve().parents[2] / "meshsshd" / "session" / "_holder.py"
_spec = importlib.util.spec_from_file_location("_holder_under_test", _HOLDER_PATH)
assert _spec is not None and _spec.loader is not None
holder = importlib.util.module_from_spec(_spec)
sys.modules["_holder_under_test"] = holder
_spec.loader.exec_module(holder)


def frames_of(data: bytes) -> list[tuple[bytes, bytes]]:
    return iter_frames(bytearray(data))


def test_spool_keeps_everything_under_the_limit() -> None:
    s = holder.Spool(100)
    s.add(b"o", b"abc")
    s.add(b"e", b"err")
    s.add(b"o", b"def")
    assert (s.size, s.dropped) == (9, 0)
    assert frames_of(s.frames()) == [(b"o", b"abc"), (b"e", b"err"), (b"o", b"def")]


def test_spool_drops_oldest_bytes_and_marks_them() -> None:
    s = holder.Spool(10)
    s.add(b"o", b"0123456789")
    s.add(b"e", b"ab")
    s.add(b"o", b"XYZ")
    assert (s.size, s.dropped) == (10, 5)
    assert frames_of(s.frames()) == [(b"e", b"[meshsshd: 5 bytes dropped]\n"), (b"o", b"56789"),
                                     (b"e", b"ab"), (b"o", b"XYZ")]


def test_spool_one_chunk_larger_than_the_limit() -> None:
    s = holder.Spool(4)
    s.add(b"o", b"abcdefgh")
    assert (s.size, s.dropped) == (4, 4)
    assert frames_of(s.frames(marker_stream=b"o")) == [(b"o", b"[meshsshd: 4 bytes dropped]\r\n"), (b"o", b"efgh")]


def test_spool_tail_for_attach_counts_skipped_bytes() -> None:
    s = holder.Spool(100)
    for chunk in (b"aaaa", b"bbbb", b"cccc"):
        s.add(b"o", chunk)
    s.records.append([b"e", bytearray(b"dd")])
    s.size += 2
    assert frames_of(s.frames(tail=5, marker_stream=b"o")) == [
        (b"o", b"[meshsshd: 9 bytes dropped]\r\n"), (b"o", b"ccc"), (b"e", b"dd")]


def test_spool_memory_stays_bounded() -> None:
    s = holder.Spool(1000)
    for _ in range(10_000):
        s.add(b"o", b"x" * 333)
    assert s.size == 1000 and sum(len(r[1]) for r in s.records) == 1000
    assert s.dropped == 10_000 * 333 - 1000


def test_frames_round_trip_and_partial_frames_wait() -> None:
    data = frame(b"o", b"hello") + frame(b"x", b"{}")
    buf = bytearray(data[:7])
    assert iter_frames(buf) == [] and len(buf) == 7
    buf += data[7:]
    assert iter_frames(buf) == [(b"o", b"hello"), (b"x", b"{}")] and buf == b""
    assert holder.frame(b"o", b"hello") == frame(b"o", b"hello")


@pytest.mark.parametrize(("meta", "identity", "user", "allowed"), [
    pytest.param({"identity": "a@x", "local_user": "u"}, "a@x", "u", True, id="owner"),
    pytest.param({"identity": "a@x", "local_user": "u"}, "b@x", "u", False, id="other-identity"),
    pytest.param({"identity": "a@x", "local_user": "u"}, "a@x", "root", False, id="other-local-user"),
    pytest.param({"identity": "", "local_user": "u"}, "", "u", False, id="empty-identity"),
    pytest.param({"local_user": "u"}, "a@x", "u", False, id="no-owner-recorded"),
])
def test_may_see(meta: dict, identity: str, user: str, allowed: bool) -> None:
    assert may_see(meta, identity, user) is allowed


@pytest.mark.parametrize(("meta", "expired"), [
    pytest.param({"state": "running", "started": 0}, False, id="running-never"),
    pytest.param({"state": "exited", "started": 0, "finished": 950}, False, id="recent"),
    pytest.param({"state": "exited", "started": 0, "finished": 800}, True, id="old"),
    pytest.param({"state": "lost", "started": 0, "finished": 899}, True, id="lost-old"),
    pytest.param({"state": "starting", "started": 10}, True, id="stale-start"),
])
def test_is_expired(meta: dict, expired: bool) -> None:
    assert is_expired(meta, now=1000, keep_seconds=100) is expired


def test_summary_hides_pids_and_owner() -> None:
    meta = {"id": "a" * 12, "command": "x", "pty": False, "started": 1.0, "state": "running",
            "holder_pid": 5, "pid": 6, "identity": "a@x", "uid": 1000}
    out = summary(meta)
    assert "holder_pid" not in out and "pid" not in out and "identity" not in out
    assert out["id"] == "a" * 12 and out["state"] == "running"


def test_format_table() -> None:
    rows = format_table([
        {"id": "0123456789ab", "state": "exited", "exit_status": 3, "started": 0, "command": "make", "pty": False},
        {"id": "ba9876543210", "state": "exited", "exit_signal": "HUP", "started": 0, "command": None, "pty": True},
        {"id": "ffffffffffff", "state": "running", "exit_status": None, "started": 0, "command": "sleep 9"},
    ])
    assert rows[0].split() == ["ID", "STATE", "EXIT", "STARTED", "(UTC)", "COMMAND"]
    assert rows[1].split() == ["0123456789ab", "exited", "3", "1970-01-01", "00:00:00", "make"]
    assert rows[2].split() == ["ba9876543210", "exited", "SIGHUP", "1970-01-01", "00:00:00", "(login", "shell)",
                               "[pty]"]
    assert rows[3].split() == ["ffffffffffff", "running", "1970-01-01", "00:00:00", "sleep", "9"]


@pytest.mark.parametrize(("dest", "user", "expected"), [
    pytest.param("db-1", None, ("db-1", None), id="host"),
    pytest.param("ann@db-1", None, ("db-1", "ann"), id="user-at-host"),
    pytest.param("ann@db-1", "bob", ("db-1", "bob"), id="dash-l-wins"),
    pytest.param("a@b@db-1", None, ("db-1", "a@b"), id="last-at-separates"),
])
def test_split_destination(dest: str, user: str | None, expected: tuple) -> None:
    assert split_destination(dest, user) == expected


def test_systemd_scope_only_under_a_systemd_service() -> None:
    from meshsshd.detached._launch import systemd_scope

    service = {"INVOCATION_ID": "abc"}
    assert systemd_scope("0123456789ab", {}, booted=True, systemd_run="/bin/systemd-run") == []
    assert systemd_scope("0123456789ab", service, booted=False, systemd_run="/bin/systemd-run") == []
    assert systemd_scope("0123456789ab", service, booted=True, systemd_run="") == []  # not installed
    argv = systemd_scope("0123456789ab", service, booted=True, systemd_run="/bin/systemd-run")
    assert argv[:2] == ["/bin/systemd-run", "--scope"] and argv[-1] == "--"
    assert "--unit=meshsshd-session-0123456789ab" in argv
