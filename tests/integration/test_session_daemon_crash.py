"""Logins of a daemon that was killed (kill -9) are ended when it starts again, as the user
they ran as, with a `session.ended` (reason `daemon-restart`) for each; another daemon's
logins on the same host and detached sessions are left alone (session/_leftovers.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshsshd.session._cgroup import cgroup2_root
from tests.integration.detachkit import audit_events, wait_for
from tests.integration.serverkit import ServerKit
from tests.integration.test_detached_server import Setup, setup  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.openssh, pytest.mark.timeout(180)]


def sleeps_of(uid: int, seconds: str) -> list[int]:
    """Pids of `sleep <seconds>` running as uid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                if Path(f"/proc/{entry}/cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                    out.append(int(entry))
            except OSError:
                continue
    return out


def test_logins_of_a_killed_daemon_end_at_restart_detached_ones_do_not(setup: Setup) -> None:
    if cgroup2_root() is None:
        pytest.skip("needs a writable cgroup v2 hierarchy (login cgroups)")
    uid = setup.user.pw_uid
    srv = setup.server("srv1").start()
    clients: list[subprocess.Popen] = []
    try:
        answer, _ = setup.request(srv, {"op": "start", "command": None, "pty": True, "term": "xterm",
                                        "cols": 80, "rows": 24})
        detached = answer["id"]
        for opts, secs in (([], "600"), (["-tt"], "599")):   # a plain exec and a PTY session
            clients.append(subprocess.Popen(srv.ssh_argv(setup.user.pw_name, setup.owner, f"exec sleep {secs}",
                                                         opts=opts),
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        wait_for(lambda: sleeps_of(uid, "600") and sleeps_of(uid, "599"), what="both sleeps")
        started = {e["session_id"] for e in audit_events(srv.output(), "session.started")
                   if e.get("kind") == "exec"}
        assert len(started) == 2
        assert srv.proc is not None
        srv.proc.stop(signal.SIGKILL)
    finally:
        for c in clients:
            c.kill()
            c.wait()
        srv.stop()
    # Another daemon (another state directory) starting meanwhile leaves them alone.
    with ServerKit(setup.tmp / "other", {**setup.config}):
        time.sleep(0.3)
        assert sleeps_of(uid, "600"), "another daemon's start-up killed this daemon's login"
    srv2 = setup.server("srv2").start()
    try:
        wait_for(lambda: not sleeps_of(uid, "600") and not sleeps_of(uid, "599"), timeout=10,
                 what="the crashed run's sleeps to be gone")
        ended = [e for e in audit_events(srv2.output(), "session.ended") if e.get("reason") == "daemon-restart"]
        assert {e["session_id"] for e in ended} == started
        assert setup.user.pw_name in {e.get("local_user") for e in ended}   # from the live member
        # The detached shell survived both the crash and the sweep, and still answers.
        answer, r = setup.request(srv2, {"op": "attach", "id": detached, "cols": 80, "rows": 24},
                                  extra=b"echo still-$((40+2)); exit 5\n")
        assert answer["ok"] and r.returncode == 5, r.stderr
        assert b"still-42" in setup.body(r)
    finally:
        srv2.stop()
