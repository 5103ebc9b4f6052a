"""Detached sessions on a real `meshsshd serve`, driven with OpenSSH through the reserved
subsystem: output kept and received after the client left, exit status, the spool bound
and its marker, kill, owner-only access, audit events, and sessions that survive a
restart of meshsshd itself (holder processes) with attach and screen replay.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.detachkit import SUBSYSTEM, audit_events, holders_under, kill_holders, wait_for
from tests.integration.serverkit import ClientKey, ServerKit, client_key, install_key
from tests.integration.test_server_pam import pam_service  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.openssh]

SPOOL = 4096


class Setup:
    def __init__(self, tmp: Path, user: Any, owner: ClientKey, other: ClientKey) -> None:
        self.tmp, self.user, self.owner, self.other = tmp, user, owner, other
        self.config = {
            "authorized_keys": True,
            "limits": {"penalty_failures": 10_000, "detached_spool_bytes": SPOOL},
            "access": [{"sources": ["127.0.0.1/32"], "identities": [owner.identity, other.identity],
                        "local_users": [user.pw_name]}],
        }

    def server(self, name: str = "srv") -> ServerKit:
        return ServerKit(self.tmp / name, {**self.config, "state_dir": str(self.tmp / "state")})

    def request(self, srv: ServerKit, doc: dict[str, Any], key: ClientKey | None = None,
                extra: bytes = b"", timeout: float = 30) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
        r = srv.ssh(self.user.pw_name, key or self.owner, SUBSYSTEM, opts=["-s"],
                    input=json.dumps(doc).encode() + b"\n" + extra, timeout=timeout)
        first, _, _ = r.stdout.partition(b"\n")
        return json.loads(first), r

    def body(self, r: subprocess.CompletedProcess) -> bytes:
        return r.stdout.partition(b"\n")[2]


@pytest.fixture
def setup(tmp_path: Path, make_user: Callable[..., Any]) -> Iterator[Setup]:
    user = make_user("mdt")
    owner = client_key(tmp_path, "id_owner")
    other = client_key(tmp_path, "id_other")
    install_key(user, owner, other)
    try:
        yield Setup(tmp_path, user, owner, other)
    finally:
        kill_holders(tmp_path)


def test_detach_receive_exit_status_and_owner_only(setup: Setup) -> None:
    with setup.server() as srv:
        answer, r = setup.request(srv, {"op": "start", "command": "echo out-1; echo err-1 >&2; sleep 0.5; "
                                        "echo out-2; exit 7", "pty": False})
        assert answer["ok"] and r.returncode == 0, r.stderr
        sid = answer["id"]
        # The client is gone; the session runs on. --follow streams until it ends.
        answer, r = setup.request(srv, {"op": "receive", "id": sid, "follow": True})
        assert answer["ok"]
        assert setup.body(r) == b"out-1\nout-2\n"
        assert r.stderr == b"err-1\n"
        assert r.returncode == 7
        answer, _ = setup.request(srv, {"op": "list"})
        (s,) = answer["sessions"]
        assert (s["id"], s["state"], s["exit_status"], s["pty"]) == (sid, "exited", 7, False)
        # Finished: receive again from the spool file.
        answer, r = setup.request(srv, {"op": "receive", "id": sid})
        assert setup.body(r) == b"out-1\nout-2\n" and r.returncode == 7

        # Another identity, same local user: sees nothing, may touch nothing.
        answer, _ = setup.request(srv, {"op": "list"}, key=setup.other)
        assert answer == {"ok": True, "sessions": []}
        for op in ("receive", "attach", "kill"):
            answer, r = setup.request(srv, {"op": op, "id": sid}, key=setup.other)
            assert answer == {"ok": False, "error": f"no such session: {sid}"}, op
            assert r.returncode == 1
        # ... and the session is still there for its owner.
        answer, _ = setup.request(srv, {"op": "list"})
        assert [s["id"] for s in answer["sessions"]] == [sid]

        started = audit_events(srv.output(), "detached.started")
        assert [(e["session_id"], e["identity"], e["local_user"]) for e in started] == [
            (sid, setup.owner.identity, setup.user.pw_name)]
        assert started[0]["command"].startswith("echo out-1")
    meta = setup.tmp / "state" / "sessions" / f"{sid}.json"
    spool = meta.with_suffix(".spool")
    for p in (meta, spool, meta.parent):
        st = p.stat()
        assert st.st_uid == 0 and st.st_mode & 0o077 == 0, (p, oct(st.st_mode))


def test_spool_is_bounded_and_marks_what_was_dropped(setup: Setup) -> None:
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    with setup.server() as srv:
        answer, _ = setup.request(srv, {"op": "start", "command": "seq 1 20000", "pty": False})
        sid = answer["id"]
        answer, r = setup.request(srv, {"op": "receive", "id": sid, "follow": True})
        assert r.returncode == 0
        assert setup.body(r) == expected[-SPOOL:]
        dropped = len(expected) - SPOOL
        assert r.stderr == f"[meshsshd: {dropped} bytes dropped]\n".encode()
        answer, _ = setup.request(srv, {"op": "list"})
        assert answer["sessions"][0]["dropped"] == dropped


def test_kill_then_forget(setup: Setup) -> None:
    with setup.server() as srv:
        answer, _ = setup.request(srv, {"op": "start", "command": "sleep 300", "pty": False})
        sid = answer["id"]
        answer, _ = setup.request(srv, {"op": "kill", "id": sid})
        assert answer == {"ok": True, "id": sid, "result": "killed"}

        def ended() -> dict[str, Any] | None:
            s = setup.request(srv, {"op": "list"})[0]["sessions"][0]
            return s if s["state"] == "exited" else None
        s = wait_for(ended, what="the killed session to end")
        assert s["exit_signal"] == "HUP" and s["exit_status"] is None
        answer, _ = setup.request(srv, {"op": "kill", "id": sid})
        assert answer["result"] == "forgotten"
        assert setup.request(srv, {"op": "list"})[0]["sessions"] == []
        killed = audit_events(srv.output(), "detached.killed")
        assert [(e["session_id"], e["reason"]) for e in killed] == [(sid, "killed"), (sid, "forgotten")]
    assert not (setup.tmp / "state" / "sessions" / f"{sid}.json").exists()


def _read_until(proc: subprocess.Popen, needle: bytes, timeout: float = 15.0) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {buf[-500:]!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {needle!r}: {buf[-500:]!r}"
            buf += chunk
    return buf


def test_pty_session_survives_client_and_daemon_restart(setup: Setup) -> None:
    srv = setup.server("srv1").start()
    try:
        answer, _ = setup.request(srv, {"op": "start", "command": None, "pty": True, "term": "xterm",
                                        "cols": 100, "rows": 30})
        sid = answer["id"]
        # Attach, type, then the client dies (kill -9: no goodbye).
        attach = {"op": "attach", "id": sid, "cols": 100, "rows": 30}
        proc = subprocess.Popen(srv.ssh_argv(setup.user.pw_name, setup.owner, SUBSYSTEM, opts=["-s"]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(attach).encode() + b"\necho before-$((40+2)); stty size\n")
        proc.stdin.flush()
        _read_until(proc, b"30 100")
        proc.kill()
        proc.wait()
        wait_for(lambda: audit_events(srv.output(), "detached.detached"), what="detached event")
        assert audit_events(srv.output(), "detached.detached")[0]["reason"] == "client-left"
        assert [e["session_id"] for e in audit_events(srv.output(), "detached.attached")] == [sid]
    finally:
        srv.stop()
    # meshsshd is gone; the holder and the shell are not.
    assert holders_under(setup.tmp)
    srv2 = setup.server("srv2").start()
    try:
        answer, _ = setup.request(srv2, {"op": "list"})
        (s,) = answer["sessions"]
        assert (s["id"], s["state"], s["pty"]) == (sid, "running", True)
        assert '"detached.recovered"' in srv2.output()
        # Reattach with another size: the tail of the screen is replayed, the size applies.
        answer, r = setup.request(srv2, {"op": "attach", "id": sid, "cols": 120, "rows": 40},
                                  extra=b"stty size; exit 5\n")
        body = setup.body(r)
        assert answer["ok"] and r.returncode == 5, r.stderr
        assert b"before-42" in body          # replayed from before the restart
        assert b"40 120" in body
        answer, _ = setup.request(srv2, {"op": "list"})
        assert answer["sessions"][0]["exit_status"] == 5
        assert wait_for(lambda: not holders_under(setup.tmp), what="holder to exit")
    finally:
        srv2.stop()


def test_key_restrictions_bind_detached_sessions(setup: Setup) -> None:
    with setup.server() as srv:
        install_key(setup.user, setup.owner, options="no-pty")
        answer, r = setup.request(srv, {"op": "start", "command": None, "pty": True})
        assert answer == {"ok": False, "error": "PTY not permitted for this login (no-pty)"}
        answer, _ = setup.request(srv, {"op": "start", "command": "true", "pty": False})
        assert answer["ok"]
        # A forced command replaces the subsystem request itself: nothing is started.
        install_key(setup.user, setup.owner, options='command="echo forced"')
        r = srv.ssh(setup.user.pw_name, setup.owner, SUBSYSTEM, opts=["-s"],
                    input=b'{"op": "start", "command": "touch /tmp/never", "pty": false}\n')
        assert r.stdout == b"forced\n"
        install_key(setup.user, setup.owner)
        answer, _ = setup.request(srv, {"op": "list"})
        assert [s["command"] for s in answer["sessions"]] == ["true"]


def test_slow_follower_skips_ahead_instead_of_buffering(setup: Setup) -> None:
    total = 64_000_000
    with setup.server() as srv:
        answer, _ = setup.request(srv, {"op": "start", "command": f"sleep 1; head -c {total} /dev/zero; "
                                        "echo; echo the-end", "pty": False})
        sid = answer["id"]
        proc = subprocess.Popen(srv.ssh_argv(setup.user.pw_name, setup.owner, SUBSYSTEM, opts=["-s"]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"op": "receive", "id": sid, "follow": True}).encode() + b"\n")
        proc.stdin.flush()
        time.sleep(3)   # a reader that does not read while output is produced
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        body = out.partition(b"\n")[2]
        markers = [int(line.split()[1]) for line in err.decode().splitlines()
                   if line.startswith("[meshsshd: ") and line.endswith(" bytes dropped]")]
        assert markers and err.count(b"\n") == len(markers), err[-500:]
        # Every byte is either received or counted as dropped; the end is never lost.
        assert body.endswith(b"\nthe-end\n")
        assert len(body) + sum(markers) == total + len(b"\nthe-end\n")
        assert len(body) < total


def test_detached_command_runs_inside_a_pam_session(tmp_path: Path, pam_service: Any) -> None:
    name, user, log = pam_service
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": [user.pw_name]}
    try:
        with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [rule]},
                       env={"MESHSSHD_PAM_SERVICE": name}) as srv:
            def request(doc: dict[str, Any]) -> subprocess.CompletedProcess:
                return srv.ssh(user.pw_name, None, SUBSYSTEM, opts=["-s"], input=json.dumps(doc).encode() + b"\n")
            r = request({"op": "start", "command": "id -u; ulimit -n; exit 3", "pty": False})
            sid = json.loads(r.stdout.partition(b"\n")[0])["id"]
            r = request({"op": "receive", "id": sid, "follow": True})
            assert r.returncode == 3, r.stderr
            assert r.stdout.partition(b"\n")[2].decode().split() == [str(user.pw_uid), "777"]
            lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2 and
                             log.read_text().splitlines(), what="PAM log")
            assert lines[:2] == [f"open_session {user.pw_name} tty= rhost=127.0.0.1",
                                 f"close_session {user.pw_name} tty= rhost=127.0.0.1"]
    finally:
        kill_holders(tmp_path)
