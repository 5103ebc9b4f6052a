"""Login records for PTY sessions, as sshd writes them: utmp (`who`) and wtmp (`last`).

glibc's utmpx API through ctypes: `pututxline` for /var/run/utmp, `updwtmpx` for
/var/log/wtmp. Both are small blocking file writes, so callers run them in an executor.
Failures are logged and ignored: a missing utmp file must not break logins.

The utmpx calls work on one process-wide file position (`utmpxname`/`setutxent`/
`endutxent`), so writes from several executor threads are serialised by one lock. An
executor may also run a short session's logout before its login; then the logout writes
both, in order, and the late login is dropped — `who` must not keep a session that ended.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from ..logs import event

log = logging.getLogger("meshsshd.utmp")

UTMP_FILE = "/var/run/utmp"
WTMP_FILE = "/var/log/wtmp"
USER_PROCESS = 7
DEAD_PROCESS = 8


class _ExitStatus(ctypes.Structure):
    _fields_ = [("e_termination", ctypes.c_short), ("e_exit", ctypes.c_short)]


class _TimeVal32(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int32), ("tv_usec", ctypes.c_int32)]


class Utmpx(ctypes.Structure):
    """glibc `struct utmpx` on 64-bit Linux (384 bytes, 32-bit time fields)."""

    _fields_ = [
        ("ut_type", ctypes.c_short),
        ("ut_pid", ctypes.c_int32),
        ("ut_line", ctypes.c_char * 32),
        ("ut_id", ctypes.c_char * 4),
        ("ut_user", ctypes.c_char * 32),
        ("ut_host", ctypes.c_char * 256),
        ("ut_exit", _ExitStatus),
        ("ut_session", ctypes.c_int32),
        ("ut_tv", _TimeVal32),
        ("ut_addr_v6", ctypes.c_int32 * 4),
        ("_unused", ctypes.c_char * 20),
    ]


_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.pututxline.argtypes = [ctypes.POINTER(Utmpx)]
        lib.pututxline.restype = ctypes.c_void_p
        lib.updwtmpx.argtypes = [ctypes.c_char_p, ctypes.POINTER(Utmpx)]
        lib.utmpxname.argtypes = [ctypes.c_char_p]
        _libc = lib
    return _libc


@dataclass(frozen=True)
class LoginRecord:
    pid: int
    tty: str          # /dev/pts/3
    user: str
    host: str


def build_record(rec: LoginRecord, ut_type: int, now: float | None = None) -> Utmpx:
    """Pure: the utmpx entry for a login (USER_PROCESS) or logout (DEAD_PROCESS)."""
    now = time.time() if now is None else now
    line = rec.tty.removeprefix("/dev/")
    ut = Utmpx()
    ut.ut_type = ut_type
    ut.ut_pid = rec.pid
    ut.ut_line = line.encode()[:32]
    ut.ut_id = line.removeprefix("pts/").encode()[-4:]
    if ut_type == USER_PROCESS:
        ut.ut_user = rec.user.encode()[:32]
        ut.ut_host = rec.host.encode()[:256]
        try:
            if ":" in rec.host:
                packed = socket.inet_pton(socket.AF_INET6, rec.host)
            else:
                packed = socket.inet_pton(socket.AF_INET, rec.host) + bytes(12)
            ctypes.memmove(ut.ut_addr_v6, packed, 16)
        except OSError:
            pass
    ut.ut_session = rec.pid
    ut.ut_tv.tv_sec = int(now)
    ut.ut_tv.tv_usec = int((now % 1) * 1_000_000)
    return ut


def _write(ut: Utmpx) -> None:
    lib = _lib()
    for path in (UTMP_FILE, WTMP_FILE):   # glibc does not create them; minimal containers lack them
        if not os.path.exists(path):
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o664)
            os.close(fd)
    lib.utmpxname(UTMP_FILE.encode())
    lib.setutxent()
    ok = lib.pututxline(ctypes.byref(ut))
    lib.endutxent()
    if not ok:
        raise OSError(ctypes.get_errno(), "pututxline failed")
    lib.updwtmpx(WTMP_FILE.encode(), ctypes.byref(ut))


_lock = threading.Lock()
_on_record: set[LoginRecord] = set()  # logins written, their logout still to come
_overtaken: set[LoginRecord] = set()  # logouts that ran before their login


def _record(rec: LoginRecord, ut_type: int) -> None:
    try:
        _write(build_record(rec, ut_type))
    except OSError as exc:
        event(log, "utmp.failed", level=logging.WARNING, tty=rec.tty, error=str(exc))


def write_login(rec: LoginRecord) -> None:
    with _lock:
        if rec in _overtaken:
            _overtaken.discard(rec)  # its logout already wrote both
            return
        _record(rec, USER_PROCESS)
        _on_record.add(rec)


def write_logout(rec: LoginRecord) -> None:
    with _lock:
        if rec in _on_record:
            _on_record.discard(rec)
        else:
            _record(rec, USER_PROCESS)  # keep wtmp's order: a login, then its logout
            _overtaken.add(rec)
        _record(rec, DEAD_PROCESS)
