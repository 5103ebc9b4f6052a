"""Revocation and session end reach every process of a login: detached sessions, and
children that left the process group (`setsid`), on a real `meshsshd serve` with OpenSSH.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.integration.detachkit import SUBSYSTEM, audit_events, kill_holders, wait_for
from tests.integration.serverkit import ClientKey, ServerKit, client_key, install_key
from tests.support import process_alive as _alive

pytestmark = [pytest.mark.root, pytest.mark.openssh]


class World:
    def __init__(self, tmp: Path, user: Any, keep: ClientKey, lose: ClientKey) -> None:
        self.tmp, self.user, self.keep, self.lose = tmp, user, keep, lose

    def rule(self, *keys: ClientKey) -> list[dict[str, Any]]:
        return [{"sources": ["127.0.0.1/32"], "identities": [k.identity for k in keys],
                 "local_users": [self.user.pw_name]}]

    def server(self, daemon_prefix: Sequence[str] = ()) -> ServerKit:
        return ServerKit(self.tmp / "srv", {"authorized_keys": True, "access": self.rule(self.keep, self.lose),
                                            "limits": {"penalty_failures": 10_000}}, daemon_prefix=daemon_prefix)

    def start_detached(self, srv: ServerKit, key: ClientKey, command: str) -> dict[str, Any]:
        doc = {"op": "start", "command": command, "pty": False}
        r = srv.ssh(self.user.pw_name, key, SUBSYSTEM, opts=["-s"], input=json.dumps(doc).encode() + b"\n")
        answer = json.loads(r.stdout.partition(b"\n")[0])
        assert answer["ok"], answer
        return json.loads((srv.state_dir / "sessions" / f"{answer['id']}.json").read_text())

    def meta(self, srv: ServerKit, sid: str) -> dict[str, Any]:
        return json.loads((srv.state_dir / "sessions" / f"{sid}.json").read_text())


@pytest.fixture
def world(tmp_path: Path, make_user: Callable[..., Any]) -> Iterator[World]:
    user = make_user("mrv")
    keep, lose = client_key(tmp_path, "id_keep"), client_key(tmp_path, "id_lose")
    install_key(user, keep, lose)
    try:
        yield World(tmp_path, user, keep, lose)
    finally:
        kill_holders(tmp_path)


def _pids_of(uid: int, marker: str) -> list[int]:
    """Live processes of uid whose command line contains marker."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and _alive(int(entry)):
            out.append(int(entry))
    return out


def test_policy_change_ends_detached_sessions_it_no_longer_allows(world: World) -> None:
    with world.server() as srv:
        lost = world.start_detached(srv, world.lose, "sleep 301")
        kept = world.start_detached(srv, world.keep, "sleep 302")
        assert _alive(lost["pid"]) and _alive(kept["pid"])
        srv.reload(access=world.rule(world.keep))
        wait_for(lambda: world.meta(srv, lost["id"])["state"] == "exited", what="the revoked session to end")
        assert not _alive(lost["pid"])
        assert world.meta(srv, kept["id"])["state"] == "running" and _alive(kept["pid"])
        revoked = wait_for(lambda: audit_events(srv.output(), "detached.revoked"), what="the audit event")
        assert [(e["session_id"], e["reason"], e["identity"]) for e in revoked] == [
            (lost["id"], "identity", world.lose.identity)]


def test_restart_with_narrower_rules_ends_detached_sessions(world: World) -> None:
    """A holder outlives the daemon; the daemon that comes back applies its own rules."""
    srv = world.server()
    with srv:
        lost = world.start_detached(srv, world.lose, "sleep 303")
    assert _alive(lost["pid"])   # survived the daemon
    srv.config["access"] = world.rule(world.keep)
    with srv:
        wait_for(lambda: world.meta(srv, lost["id"])["state"] == "exited", what="the session to end")
        assert not _alive(lost["pid"])
        assert [e["session_id"] for e in audit_events(srv.output(), "detached.revoked")] == [lost["id"]]


# The daemon in a mount namespace where cgroup v2 is read-only: the /proc session scan.
_NO_CGROUP = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'for m in $(awk \'$3 == "cgroup2" {print $2}\' /proc/mounts); do '
              'mount --bind "$m" "$m" && mount -o remount,bind,ro "$m" || exit 1; done; exec "$@"', "sh"]

# How a child leaves the session's process group: `setsid` leaves its session too (only
# the cgroup holds it); job control gives `cmd &` a group of its own, in the same session.
ESCAPES = [
    pytest.param("setsid -f sleep {marker} </dev/null >/dev/null 2>&1;", [], id="setsid-cgroup"),
    pytest.param("set -m; sleep {marker} </dev/null >/dev/null 2>&1 &", [], id="job-cgroup"),
    pytest.param("set -m; sleep {marker} </dev/null >/dev/null 2>&1 &", _NO_CGROUP, id="job-session-scan"),
]


def _marker() -> str:
    return f"{4000 + int.from_bytes(os.urandom(2), 'big') % 5000}.{os.getpid()}"


def _gone(world: World, marker: str, what: str) -> None:
    wait_for(lambda: not _pids_of(world.user.pw_uid, f"sleep {marker}"), timeout=10, what=what)


@pytest.mark.parametrize("escape, prefix", ESCAPES)
def test_session_end_kills_what_left_the_process_group(world: World, escape: str, prefix: list[str]) -> None:
    marker = _marker()
    with world.server(daemon_prefix=prefix) as srv:
        r = srv.ssh(world.user.pw_name, world.keep, f"{escape.format(marker=marker)} echo started")
        assert r.stdout == b"started\n", r.stderr
        _gone(world, marker, "the escaped child to die with its session")


@pytest.mark.parametrize("escape, prefix", ESCAPES)
def test_revocation_kills_what_left_the_process_group(world: World, escape: str, prefix: list[str]) -> None:
    marker, main = _marker(), _marker()
    with world.server(daemon_prefix=prefix) as srv:
        proc = subprocess.Popen(srv.ssh_argv(world.user.pw_name, world.lose,
                                             f"{escape.format(marker=marker)} sleep {main}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _pids_of(world.user.pw_uid, f"sleep {marker}") and
                     _pids_of(world.user.pw_uid, f"sleep {main}"), what="the session and its escaped child")
            srv.reload(access=world.rule(world.keep))
            _gone(world, main, "the revoked session to end")
            _gone(world, marker, "the escaped child to die with the revoked login")
        finally:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("escape, prefix", ESCAPES)
def test_detached_revocation_kills_what_left_the_process_group(world: World, escape: str,
                                                               prefix: list[str]) -> None:
    marker, main = _marker(), _marker()
    with world.server(daemon_prefix=prefix) as srv:
        world.start_detached(srv, world.lose, f"{escape.format(marker=marker)} sleep {main}")
        wait_for(lambda: _pids_of(world.user.pw_uid, f"sleep {marker}"), what="the escaped child")
        srv.reload(access=world.rule(world.keep))
        _gone(world, main, "the revoked session to end")
        _gone(world, marker, "the escaped child to die with the revoked detached session")
