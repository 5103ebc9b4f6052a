"""The privilege drop of session children, seen from inside the children.

Children started by `spawn` itself (through setpriv, and through the Popen(user=)
fallback used where setpriv is missing) and by real `ssh` logins to a running meshsshd
(an exec session and a no-PTY login shell both go through setpriv, the latter with the
Python step that enters the home directory and sets argv[0] `-bash`) must
all look the same: the user's uid, gid and groups (one of them a supplementary group),
the home directory, umask 022, no capabilities, the bounding set untouched and
no_new_privs off (sudo and su must work, as under sshd).
"""

from __future__ import annotations

import grp
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from meshsshd.session import _spawn
from meshsshd.session._spawn import ConnectionInfo, build_child_argv, build_child_env, spawn
from meshsshd.users import lookup_user_sync
from tests.support import REPO, os_user, require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.root]

PROBE = ('echo "$0"; id -u; id -g; id -G; pwd; umask; '
         'grep -E "^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):" /proc/self/status')
NO_CAPS = "0000000000000000"


@pytest.fixture(scope="module")
def member():
    """A throwaway user who is also in a throwaway supplementary group."""
    require_root()
    with os_user("msp") as user:
        group = f"msg{secrets.token_hex(3)}"
        subprocess.run(["groupadd", group], check=True)
        try:
            subprocess.run(["usermod", "-aG", group, user.pw_name], check=True)
            yield user, grp.getgrnam(group).gr_gid
        finally:
            subprocess.run(["groupdel", group], check=False)


def _own_status(field: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/self/status")


def _check_probe(output: str, user, extra_gid: int, argv0: str) -> None:
    got_argv0, uid, gid, groups, cwd, umask, *status = output.splitlines()
    fields = dict(line.split(":", 1) for line in status)
    fields = {k: v.strip() for k, v in fields.items()}
    assert got_argv0 == argv0
    assert (int(uid), int(gid)) == (user.pw_uid, user.pw_gid)
    want_groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    assert extra_gid in want_groups
    assert set(map(int, groups.split())) == want_groups
    assert cwd == user.pw_dir and umask == "0022"
    assert [fields[f"Cap{s}"] for s in ("Inh", "Prm", "Eff", "Amb")] == [NO_CAPS] * 4
    assert fields["CapBnd"] == _own_status("CapBnd")   # as sshd: sudo needs the bounding set
    assert fields["NoNewPrivs"] == "0"


def _run_spawned(user) -> str:
    local = lookup_user_sync(user.pw_name)
    assert local is not None
    executable, argv = build_child_argv(local.shell, PROBE, pty=False)
    env = build_child_env(local, ConnectionInfo("127.0.0.1", 1, "127.0.0.1", 2), {}, accept_env=())
    r, w = os.pipe()
    with open(os.devnull, "rb") as devnull:
        try:
            proc = spawn(local, executable, argv, env, stdin=devnull.fileno(), stdout=w, stderr=w,
                         new_session=True)
        finally:
            os.close(w)
    with os.fdopen(r, "rb") as out:
        output = out.read().decode()
    assert proc.wait(15) == 0, output
    return output


def test_spawn_drops_privileges_through_setpriv(member, tmp_path, monkeypatch):
    user, extra_gid = member
    real = require_tool("setpriv")
    mark = tmp_path / "setpriv-used"
    wrapper = tmp_path / "setpriv"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {mark}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(_spawn, "SETPRIV", str(wrapper))
    _check_probe(_run_spawned(user), user, extra_gid, argv0="bash")
    assert mark.read_text().startswith(f"--reuid={user.pw_uid} --regid={user.pw_gid} --groups=")


def test_spawn_without_setpriv_falls_back_to_popen_user(member, monkeypatch, caplog):
    user, extra_gid = member
    monkeypatch.setattr(_spawn, "SETPRIV", None)
    _spawn._warn_no_setpriv.cache_clear()
    with caplog.at_level(logging.WARNING, logger="meshsshd.session"):
        output = _run_spawned(user)
    _check_probe(output, user, extra_gid, argv0="bash")
    assert "session.setpriv-missing" in caplog.text


def test_daemon_capabilities_do_not_reach_the_user(member):
    """A daemon given inheritable and ambient capabilities (systemd AmbientCapabilities=)
    still starts the user with none: setpriv --inh-caps=-all."""
    user, extra_gid = member
    setpriv = require_tool("setpriv")
    script = ("import sys; sys.path.insert(0, %r); from tests.integration.test_session_spawn import _run_spawned; "
              "import pwd; print(_run_spawned(pwd.getpwnam(%r)), end='')" % (str(REPO), user.pw_name))
    r = subprocess.run([setpriv, "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", "--",
                        sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _check_probe(r.stdout, user, extra_gid, argv0="bash")


@pytest.fixture(scope="module")
def server(member, tmp_path_factory):
    require_tool("ssh")
    user, _ = member
    tmp = tmp_path_factory.mktemp("spawn")
    key = client_key(tmp)
    install_key(user, key)
    config = {"authorized_keys": True,
              "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}]}
    with ServerKit(tmp / "server", config) as srv:
        yield srv, key


def test_exec_session_over_ssh(member, server):
    user, extra_gid = member
    srv, key = server
    r = srv.ssh(user.pw_name, key, PROBE)
    assert r.returncode == 0, r.stderr
    _check_probe(r.stdout.decode(), user, extra_gid, argv0="bash")


def test_pty_exec_session_over_ssh(member, server):
    """With a PTY the drop wraps `setsid --ctty`, which execs the shell by its path."""
    user, extra_gid = member
    srv, key = server
    r = srv.ssh(user.pw_name, key, "-tt", PROBE)
    assert r.returncode == 0, r.stderr
    _check_probe(r.stdout.decode(), user, extra_gid, argv0=user.pw_shell)


def test_login_shell_without_pty_over_ssh(member, server):
    """`ssh -T host` (VS Code Remote): a login shell, argv[0] `-bash`."""
    user, extra_gid = member
    srv, key = server
    r = srv.ssh(user.pw_name, key, opts=["-T"], input=(PROBE + "\n").encode())
    assert r.returncode == 0, r.stderr
    _check_probe(r.stdout.decode(), user, extra_gid, argv0="-bash")
