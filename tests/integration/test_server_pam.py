"""PAM sessions: with /etc/pam.d/<service> present, every session runs under the PAM
helper, which opens the session (tty, rhost set), applies session modules to the user's
process (pam_limits here) and closes it at the end. A throwaway service name keeps other
daemons on this machine unaffected."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from tests.support import require_root

from .serverkit import ServerKit

pytestmark = [pytest.mark.openssh, pytest.mark.root]

HOOK = """#!/bin/sh
echo "$PAM_TYPE $PAM_USER tty=$PAM_TTY rhost=$PAM_RHOST" >> {log}
"""


@pytest.fixture
def pam_service(tmp_path, make_user):
    require_root()
    user = make_user("msp")
    shared = Path("/tmp") / f"meshsshd-pam-{secrets.token_hex(4)}"   # readable by PAM as root
    shared.mkdir(mode=0o755)
    log = shared / "pam.log"
    hook = shared / "hook.sh"
    hook.write_text(HOOK.format(log=log))
    hook.chmod(0o755)
    limits = shared / "limits.conf"
    limits.write_text(f"{user.pw_name} hard nofile 777\n{user.pw_name} soft nofile 777\n")
    name = f"meshsshd-test-{secrets.token_hex(4)}"
    service = Path("/etc/pam.d") / name
    service.write_text("account required pam_permit.so\n"
                       f"session required pam_exec.so {hook}\n"
                       f"session required pam_limits.so conf={limits}\n")
    try:
        yield name, user, log
    finally:
        service.unlink()
        for f in shared.iterdir():
            f.unlink()
        shared.rmdir()


def _wait_lines(log: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"PAM log has {log.read_text() if log.exists() else 'nothing'}")


def test_pam_session_wraps_exec_and_pty(tmp_path, pam_service):
    name, user, log = pam_service
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": [user.pw_name]}
    with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [rule]},
                   env={"MESHSSHD_PAM_SERVICE": name}) as srv:
        r = srv.ssh(user.pw_name, None, "id -u; ulimit -n; exit 7")
        assert r.returncode == 7, r.stderr
        assert r.stdout.decode().split() == [str(user.pw_uid), "777"]
        assert "server.pam-missing" not in srv.output()
        assert _wait_lines(log, 2)[:2] == [f"open_session {user.pw_name} tty= rhost=127.0.0.1",
                                           f"close_session {user.pw_name} tty= rhost=127.0.0.1"]
        # A signal-killed command is still reported as exit-signal through the helper.
        assert srv.ssh(user.pw_name, None, "kill -TERM $$").returncode == 255
        r = srv.ssh(user.pw_name, None, "tty; ulimit -n; exit 3", opts=["-tt"])
        assert r.returncode == 3
        tty, nofile = r.stdout.decode().split()
        assert tty.startswith("/dev/pts/") and nofile == "777"
        lines = _wait_lines(log, 6)
        assert f"open_session {user.pw_name} tty={tty} rhost=127.0.0.1" in lines
        assert f"close_session {user.pw_name} tty={tty} rhost=127.0.0.1" in lines


def test_no_pam_file_means_no_helper(tmp_path, make_user):
    require_root()
    user = make_user("msp")
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": [user.pw_name]}
    with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [rule]},
                   env={"MESHSSHD_PAM_SERVICE": f"absent-{secrets.token_hex(3)}"}) as srv:
        r = srv.ssh(user.pw_name, None, "ps -o args= -p $PPID")
        assert r.returncode == 0
        assert b"_pam_helper" not in r.stdout
        assert b"meshsshd serve" in r.stdout   # the shell is the daemon's own child
        warnings = [json.loads(line) for line in srv.output().splitlines() if '"server.pam-missing"' in line]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning"
        assert warnings[0]["fix"] == "install deploy/pam.d/meshsshd as /etc/pam.d/meshsshd"


EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "pam.d" / "meshsshd"


def test_example_pam_file_runs_sessions(tmp_path, make_user):
    """deploy/pam.d/meshsshd as shipped, under a throwaway service name."""
    require_root()
    user = make_user("msp")
    name = f"meshsshd-example-{secrets.token_hex(4)}"
    service = Path("/etc/pam.d") / name
    service.write_text(EXAMPLE.read_text())
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": [user.pw_name]}
    try:
        with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [rule]},
                       env={"MESHSSHD_PAM_SERVICE": name}) as srv:
            r = srv.ssh(user.pw_name, None, "id -un; ps -o args= -p $PPID")
            assert r.returncode == 0, r.stderr
            out = r.stdout.decode().splitlines()
            assert out[0] == user.pw_name and "_pam_helper" in out[1]
            r = srv.ssh(user.pw_name, None, "tty", opts=["-tt"])
            assert r.returncode == 0 and r.stdout.startswith(b"/dev/pts/"), r.stderr
    finally:
        service.unlink()
