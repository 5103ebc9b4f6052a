"""`meshssh` detached-session commands against a real single-machine mesh: management,
a server peer and a laptop peer, two users who log in through the device flow.

exec --detach / -d, sessions, receive [--follow], attach from a real terminal (Ctrl-\\
detaches, a second client process re-attaches with the screen replayed and its own
size), sessions --kill, another identity seeing nothing, audit events in the peer's log.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.detachkit import audit_events, kill_holders, wait_for
from tests.integration.meshkit import Mesh
from tests.integration.serverkit import read_until
from tests.support import console_script, require_root, require_tool

pytestmark = [pytest.mark.root, pytest.mark.openssh]

ALICE = ("alice@example.com", "alice-password-1")
BOB = ("bob@example.com", "bob-password-12")


class World:
    def __init__(self, mesh: Mesh, user: str, alice: Path, bob: Path) -> None:
        self.mesh, self.user, self.alice, self.bob = mesh, user, alice, bob

    @property
    def dest(self) -> str:
        return f"{self.user}@db-1"

    def ms(self, *args: str, cfg: Path | None = None, **kw) -> subprocess.CompletedProcess:
        return self.mesh.meshssh(cfg or self.alice, *args, **kw)

    def audit(self, name: str) -> list[dict]:
        return audit_events(self.mesh.peers["db-1"].output(), name)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_user) -> Iterator[World]:
    require_root()
    require_tool("ssh")
    mesh = Mesh(tmp_path_factory.mktemp("dmesh")).start()
    try:
        for email, pw in (ALICE, BOB):
            mesh.add_user(email, pw)
        mesh.add_group("devs", [ALICE[0], BOB[0]])
        mesh.add_group("servers", [])
        mesh.add_group("laptops", [])
        mesh.add_ssh_policy("devs-ssh", ["devs", "laptops"], ["servers"])
        mesh.add_peer("db-1", mesh.setup_key("servers"), "--allow-server-ssh", wait=None)
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait=None)
        mesh.wait_status("db-1", "serving")
        mesh.wait_status("laptop", None)
        alice = mesh.login(*ALICE)
        bob = mesh.login(*BOB)
        yield World(mesh, session_user.pw_name, alice, bob)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        kill_holders(mesh.dir)
        mesh.stop()


def _started_id(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    assert len(sid) == 12 and int(sid, 16) >= 0, r.stdout
    return sid


def _row(world: World, sid: str, cfg: Path | None = None) -> str | None:
    r = world.ms("sessions", world.dest, cfg=cfg)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.decode().splitlines() if line.startswith(sid)]
    return rows[0] if rows else None


def test_exec_detach_receive_list_and_other_identity(world: World) -> None:
    sid = _started_id(world.ms("exec", "--detach", world.dest, "--",
                               "echo hi; echo oops >&2; sleep 1; echo done; exit 3"))
    r = world.ms("receive", "--follow", world.dest, sid)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"hi\ndone\n", b"oops\n")
    row = _row(world, sid)
    assert row is not None and row.split()[1:3] == ["exited", "3"], row
    r = world.ms("receive", world.dest, sid)   # again, from the finished session's spool
    assert (r.returncode, r.stdout) == (3, b"hi\ndone\n")

    # Bob may log in as the same local user on the same peer, but not see Alice's session.
    assert _row(world, sid, cfg=world.bob) is None
    for args in (("receive", world.dest, sid), ("attach", world.dest, sid),
                 ("sessions", world.dest, "--kill", sid)):
        r = world.ms(*args, cfg=world.bob)
        assert r.returncode == 255 and f"no such session: {sid}".encode() in r.stderr, (args, r.stderr)
    started = [e for e in world.audit("detached.started") if e["session_id"] == sid]
    assert len(started) == 1 and started[0]["identity"] == ALICE[0]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    return read_until(fd, re.escape(needle), timeout)[1]


class Terminal:
    """`meshssh attach` in a real pseudo-terminal of a given size."""

    def __init__(self, world: World, sid: str, rows: int, cols: int) -> None:
        self.master, slave = pty.openpty()
        _set_size(slave, rows, cols)
        self.before = termios.tcgetattr(slave)
        self.slave = slave
        self.proc = subprocess.Popen(
            [console_script("meshssh"), "attach", world.dest, sid], stdin=slave, stdout=slave, stderr=slave,
            env=world.mesh.client_env(world.alice), start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_detached_shell_attach_detach_reattach(world: World) -> None:
    sid = _started_id(world.ms("-d", world.dest))
    row = _row(world, sid)
    assert row is not None and "running" in row and "(login shell)" in row and "[pty]" in row

    t1 = Terminal(world, sid, 30, 100)
    try:
        # The replayed prompt shows the terminal is in raw mode (typeahead before that is
        # flushed, as with ssh), then type.
        _read_until(t1.master, b"$ ")
        os.write(t1.master, b"echo one-$((2+3)); stty size\r")
        _read_until(t1.master, b"30 100")
        os.write(t1.master, b"\x1c")   # Ctrl-\: detach
        out = _read_until(t1.master, b"keeps running")
        assert b"[detached from session " + sid.encode() in out
        assert t1.proc.wait(15) == 0
        assert termios.tcgetattr(t1.slave) == t1.before   # the terminal is given back as it was
    finally:
        t1.close()
    assert "running" in (_row(world, sid) or "")

    t2 = Terminal(world, sid, 40, 120)   # another client process, another window size
    try:
        replay = _read_until(t2.master, b"one-5")   # the screen's tail is replayed
        assert b"one-5" in replay
        os.write(t2.master, b"stty size\r")
        _read_until(t2.master, b"40 120")
        _set_size(t2.master, 50, 130)   # SIGWINCH → window-change → the session's terminal
        seen = b""
        deadline = time.monotonic() + 20
        while b"50 130" not in seen and time.monotonic() < deadline:
            os.write(t2.master, b"stty size\r")
            try:
                seen += _read_until(t2.master, b"50 130", timeout=1.0)
            except AssertionError:
                continue
        assert b"50 130" in seen
        os.write(t2.master, b"exit 4\r")
        assert t2.proc.wait(20) == 4
    finally:
        t2.close()
    row = wait_for(lambda: (r := _row(world, sid)) and "exited" in r and r, what="exited row")
    assert row.split()[1:3] == ["exited", "4"], row

    r = world.ms("sessions", world.dest, "--kill", sid)
    assert r.returncode == 0 and f"{sid}: forgotten".encode() in r.stderr, r.stderr
    assert _row(world, sid) is None
    attached = [e for e in world.audit("detached.attached") if e["session_id"] == sid]
    detached = [e for e in world.audit("detached.detached") if e["session_id"] == sid]
    assert len(attached) == 2 and all(e["identity"] == ALICE[0] for e in attached)
    assert sorted(e["reason"] for e in detached) == ["client-left", "ended"]


def test_kill_running_session(world: World) -> None:
    sid = _started_id(world.ms("exec", "--detach", world.dest, "--", "sleep 300"))
    r = world.ms("sessions", world.dest, "--kill", sid)
    assert r.returncode == 0 and f"{sid}: killed".encode() in r.stderr, r.stderr
    row = wait_for(lambda: (r := _row(world, sid)) and "exited" in r and r, what="killed session to end")
    assert row.split()[1:3] == ["exited", "SIGHUP"], row
    r = world.ms("receive", world.dest, sid)
    assert r.returncode == 255
    killed = [e for e in world.audit("detached.killed") if e["session_id"] == sid]
    assert [e["reason"] for e in killed] == ["killed"]
