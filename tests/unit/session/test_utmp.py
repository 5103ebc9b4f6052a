"""meshsshd.session._utmp through the real glibc utmpx calls, on files of the test's own:
a logout that overtakes its login (an executor may run them in either order) leaves no
live entry behind, and wtmp keeps login before logout."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from meshsshd.session import _utmp
from meshsshd.session._utmp import DEAD_PROCESS, USER_PROCESS, LoginRecord, Utmpx


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    utmp, wtmp = tmp_path / "utmp", tmp_path / "wtmp"
    monkeypatch.setattr(_utmp, "UTMP_FILE", str(utmp))
    monkeypatch.setattr(_utmp, "WTMP_FILE", str(wtmp))
    return utmp, wtmp


def entries(path: Path) -> list[tuple[int, int, str]]:
    data = path.read_bytes()
    size = ctypes.sizeof(Utmpx)
    assert len(data) % size == 0, "a torn record"
    out = []
    for off in range(0, len(data), size):
        ut = Utmpx.from_buffer_copy(data, off)
        out.append((ut.ut_type, ut.ut_pid, ut.ut_line.decode()))
    return out


def test_a_logout_that_overtakes_its_login_leaves_no_live_entry(files: tuple[Path, Path]) -> None:
    utmp, wtmp = files
    rec = LoginRecord(pid=4242, tty="/dev/pts/42", user="alice", host="100.64.0.3")
    _utmp.write_logout(rec)   # the session ended before the executor got to its login
    _utmp.write_login(rec)
    assert [e[0] for e in entries(utmp) if e[1] == 4242] == [DEAD_PROCESS]
    assert [e[0] for e in entries(wtmp) if e[1] == 4242] == [USER_PROCESS, DEAD_PROCESS]
