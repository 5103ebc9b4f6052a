"""Ending every process of a login (meshsshd/session/_cgroup.py), with real processes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from meshsshd.session import _cgroup
from meshsshd.session._cgroup import LoginCgroup, kill_login, kill_session
from tests.support import os_user, require, require_root
from tests.support import process_alive as _alive


def _wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _start(user, script: str) -> tuple[subprocess.Popen, list[int]]:
    """A new session as `user` running script; the pids it prints, one a line."""
    proc = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                             "--", "bash", "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    pids = [int(proc.stdout.readline()) for _ in range(script.count("echo $!"))]
    return proc, pids


def test_session_scan_kills_jobs_that_left_the_process_group():
    """Job control puts `cmd &` in a group of its own: killpg misses it, the sid scan not."""
    require_root()
    with os_user("mcg") as user:
        proc, jobs = _start(user, "set -m; sleep 611 & echo $!; sleep 612 & echo $!; wait")
        try:
            assert all(os.getpgid(p) != proc.pid for p in jobs)   # really out of the leader's group
            assert kill_session(proc.pid, uid=user.pw_uid + 1) == 0   # wrong uid: nothing is touched
            assert all(_alive(p) for p in jobs)
            assert kill_session(proc.pid, uid=user.pw_uid) >= 3
            assert _wait_gone(jobs)
        finally:
            proc.kill()
            proc.wait(5)


def test_cgroup_holds_what_escaped_the_session():
    require_root()
    require(_cgroup.cgroup2_root() is not None, "needs a writable cgroup v2 hierarchy")
    cg = LoginCgroup.create(f"test-{os.getpid()}")
    assert cg is not None
    with os_user("mcg") as user:
        argv = cg.join_argv(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                             "--", "bash", "-c", "setsid -f sleep 613 </dev/null >/dev/null 2>&1; "
                                                 "pgrep -u $(id -u) -f 'sleep 613'"])
        out = subprocess.run(argv, capture_output=True, check=True, timeout=10).stdout
        escaped = [int(p) for p in out.split()]
        assert escaped and all(_alive(p) for p in escaped)
        assert set(escaped) <= set(cg.members())
        kill_login(cg, sid=0, uid=user.pw_uid)
        assert _wait_gone(escaped)
        assert not cg.path.exists()


def test_cgroup_join_fails_closed():
    """A cgroup that cannot be joined stops the start instead of running outside it."""
    require_root()
    require(_cgroup.cgroup2_root() is not None, "needs a writable cgroup v2 hierarchy")
    cg = LoginCgroup.create(f"test-gone-{os.getpid()}")
    assert cg is not None
    assert cg.remove()
    r = subprocess.run(cg.join_argv(["echo", "ran"]), capture_output=True, timeout=10)
    assert r.returncode != 0 and b"ran" not in r.stdout


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b"])
def test_cgroup_names_stay_inside(name):
    assert LoginCgroup.create(name) is None
