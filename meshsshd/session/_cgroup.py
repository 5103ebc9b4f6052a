"""Every process of one login, so that ending the login ends all of them.

A session's children can leave its process group and its session (`setsid`, a double
fork, `nohup ... &` under job control): `killpg` on the session's group misses them, and
they would outlive a revocation. Two mechanisms, the better one where it exists:

- cgroup v2, where the unified hierarchy is writable (`LoginCgroup`): each login gets
  `<cgroup2 mount>/meshsshd/<name>`; the child joins it before it execs anything of the
  user's (`join_argv`: a root `sh` writes itself into `cgroup.procs` and execs the
  privilege drop), so nothing can fork out in between, and membership is inherited by
  every descendant whatever it does with sessions and groups. `kill()` is the kernel's
  `cgroup.kill` (5.14+; before that each member is killed through a pidfd).
- otherwise `kill_session`: a scan of /proc for processes with the login's uid AND its
  session id. It catches what left the process group but not the session (job-control
  jobs, `nohup`); `setsid` escapes it, which is why the cgroup comes first.

Kills never hit another user's process through pid reuse: `cgroup.kill` acts on members
only, and every signal by pid goes through a pidfd opened before the process is checked
(a pidfd names one process; if it died, the signal fails instead of reaching a new owner
of the pid).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

SH = "/bin/sh"
# Run as root in front of the privilege drop: join the cgroup, then become the session.
_JOIN = 'echo 0 > "$1" && shift && exec "$@"'
BASE = "meshsshd"


@functools.cache
def cgroup2_root() -> Path | None:
    """The writable cgroup v2 mount (pure v2 at /sys/fs/cgroup, or hybrid's `unified`)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) > 4:
            mount = Path(fields[4])
            if os.access(mount, os.W_OK) and (mount / "cgroup.procs").exists():
                return mount
    return None


def _pidfd_kill(pid: int, sig: int, *, uid: int | None = None, sid: int | None = None) -> bool:
    """Signal pid if it (still) is a process with that uid and session; True if sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if uid is not None and os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        if sid is not None and _session_of(pid) != sid:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def _pids() -> Iterable[int]:
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                yield int(entry)


def kill_session(sid: int, uid: int, sig: int = signal.SIGKILL) -> int:
    """The /proc fallback: signal every process of `uid` in session `sid` (blocking)."""
    if sid <= 1:
        return 0
    return sum(_pidfd_kill(pid, sig, uid=uid, sid=sid) for pid in _pids() if pid != os.getpid())


class LoginCgroup:
    """One login's cgroup directory (blocking file operations: use the executor)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> LoginCgroup | None:
        """A fresh cgroup for a login, or None where cgroup v2 is not writable."""
        root = cgroup2_root()
        if root is None or "/" in name or name.startswith("."):
            return None
        try:
            base = root / BASE
            base.mkdir(mode=0o755, exist_ok=True)
            path = base / name
            path.mkdir(mode=0o755)
        except OSError:
            return None
        return cls(path)

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def join_argv(self, argv: list[str]) -> list[str]:
        """argv that first moves the process into this cgroup (as root), then execs argv."""
        return [SH, "-c", _JOIN, "meshsshd-join", self.procs, *argv]

    def add(self, pid: int) -> bool:
        """Move a started process in (for children not started through join_argv)."""
        try:
            with open(self.procs, "w") as f:
                f.write(str(pid))
            return True
        except OSError:
            return False

    def members(self) -> list[int]:
        try:
            with open(self.procs) as f:
                return [int(line) for line in f.read().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        """SIGKILL to every member, atomically where the kernel has cgroup.kill."""
        try:
            with open(self.path / "cgroup.kill", "w") as f:
                f.write("1")
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EINVAL):
                return
        for _ in range(3):   # members may fork while we go; a few rounds catch them
            pids = self.members()
            if not pids:
                return
            for pid in pids:
                _pidfd_kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir once empty; False while members are still exiting."""
        try:
            self.path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


def kill_login(cgroup: LoginCgroup | None, sid: int, uid: int) -> None:
    """End every process of a login and drop its cgroup (blocking, up to a second while
    the killed members exit): its cgroup where it has one, else its session."""
    if cgroup is None:
        kill_session(sid, uid)
        return
    cgroup.kill()
    deadline = time.monotonic() + 1.0
    while not cgroup.remove() and time.monotonic() < deadline:
        time.sleep(0.02)
