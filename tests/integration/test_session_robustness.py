"""Session channels that fail to start or carry odd sizes: never a leak, never a hang.

A start that fails (a NUL byte in the command or in TERM makes exec raise ValueError)
must close every pipe and PTY it opened and answer the channel; a terminal size above
what the kernel stores (65535) is clamped, in `pty-req` and in `window-change`.
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncssh
import pytest

from tests.support import require_root

from .serverkit import ServerKit, key_login_config

pytestmark = [pytest.mark.openssh, pytest.mark.root]


@pytest.fixture
def server(tmp_path, make_user):
    """A key login for a throwaway user on a running `meshsshd serve`."""
    require_root()
    user = make_user("msr")
    key, config = key_login_config(tmp_path, user)
    with ServerKit(tmp_path / "srv", config) as srv:
        yield srv, user, key


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_fds(pid: int, at_most: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    count = _fd_count(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = _fd_count(pid)
    return count


async def _connect(srv: ServerKit, user, key) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", srv.port, username=user.pw_name, known_hosts=None,
                                  client_keys=[str(key.path)], agent_path=None, password=None)


async def _failing_starts(srv: ServerKit, user, key, rounds: int) -> list[tuple[int | None, bytes]]:
    """Sessions whose start fails: NUL in exec without and with a PTY, NUL in TERM."""
    results = []
    async with await _connect(srv, user, key) as conn:
        for _ in range(rounds):
            for kwargs in ({"command": "echo a\0b"}, {"command": "echo a\0b", "term_type": "xterm"},
                           {"command": "true", "term_type": "xterm\0x"}):
                r = await asyncio.wait_for(conn.run(encoding=None, **kwargs), 15)
                results.append((r.exit_status, r.stderr or r.stdout))
    return results


def test_failed_session_start_closes_its_fds_and_answers(server):
    srv, user, key = server
    pid = srv.proc.pid
    assert srv.ssh(user.pw_name, key, "true").returncode == 0
    baseline = _wait_fds(pid, 0, timeout=1.0)
    results = asyncio.run(_failing_starts(srv, user, key, rounds=10))
    assert len(results) == 30
    for status, message in results:
        assert status == 1, results
        assert b"cannot start session" in message, results
    after = _wait_fds(pid, baseline)
    assert after <= baseline, f"daemon fds {baseline} -> {after}"
    assert '"session.spawn-failed"' in srv.output() and "ValueError" in srv.output()
    r = srv.ssh(user.pw_name, key, "echo still-works")
    assert r.returncode == 0 and r.stdout == b"still-works\n", r


async def _huge_sizes(srv: ServerKit, user, key) -> tuple[int | None, bytes]:
    async with await _connect(srv, user, key) as conn:
        proc = await conn.create_process("stty size; read line; stty size", term_type="xterm",
                                         term_size=(70000, 100000), encoding=None)
        await asyncio.sleep(0.3)
        proc.change_terminal_size(1 << 31, 4294967295, 70000, 70000)
        await asyncio.sleep(0.3)
        proc.stdin.write(b"\n")
        await asyncio.wait_for(proc.wait_closed(), 15)
        return proc.exit_status, await proc.stdout.read()


def test_terminal_sizes_beyond_16_bits_are_clamped(server):
    srv, user, key = server
    status, out = asyncio.run(_huge_sizes(srv, user, key))
    assert status == 0, out
    assert out.count(b"65535 65535") == 2, out


async def _close_then_wait(srv: ServerKit, user, key, command: str) -> tuple[int | None, float]:
    """Close the channel right after the command started, then wait for the server's
    CLOSE, as OpenSSH's ControlMaster does when its mux client goes first."""
    async with await _connect(srv, user, key) as conn:
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, command, encoding=None)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        chan.close()
        await asyncio.wait_for(chan.wait_closed(), 15)
        return chan.get_exit_status(), time.monotonic() - t0


def test_channel_closed_by_client_keeps_the_command_and_its_exit_status(server):
    srv, user, key = server
    marker = f"{user.pw_dir}/done"
    status, waited = asyncio.run(_close_then_wait(srv, user, key, f"sleep 0.5; seq 100000; echo ok > {marker}; exit 3"))
    assert status == 3 and waited >= 0.2, (status, waited)
    with open(marker) as f:
        assert f.read() == "ok\n"
    r = srv.ssh(user.pw_name, key, "echo still-works")
    assert r.returncode == 0 and r.stdout == b"still-works\n", r


async def _env_flood(srv: ServerKit, user, key, count: int) -> str:
    """Send `count` env requests on one channel, then a command; what became of it."""
    async with await _connect(srv, user, key) as conn:
        env = {f"MSR_{i}": "x" * 100 for i in range(count)}
        try:
            r = await asyncio.wait_for(conn.run("echo ran", env=env), 15)
        except (asyncssh.Error, OSError) as exc:
            return f"closed: {exc}"
        return r.stdout.strip()


def test_env_flood_closes_the_connection(server):
    srv, user, key = server
    assert asyncio.run(_env_flood(srv, user, key, 128)) == "ran"
    outcome = asyncio.run(_env_flood(srv, user, key, 5000))
    assert outcome.startswith("closed"), outcome
    assert '"too-many-env"' in srv.output()
    r = srv.ssh(user.pw_name, key, "echo still-works")
    assert r.returncode == 0 and r.stdout == b"still-works\n", r


async def _hold_sessions(srv: ServerKit, user, key, connections: int, per_connection: int,
                         ) -> tuple[list[asyncssh.SSHClientConnection], int, list[str]]:
    """Open up to `connections` × `per_connection` `sleep` sessions; what was refused."""
    conns, opened, refused = [], 0, []
    for _ in range(connections):
        try:
            conn = await asyncio.wait_for(_connect(srv, user, key), 10)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            refused.append(f"connect: {exc!r}")
            continue
        conns.append(conn)
        for _ in range(per_connection):
            try:
                await conn.create_session(asyncssh.SSHClientSession, "sleep 30")
                opened += 1
            except (asyncssh.Error, OSError) as exc:
                refused.append(f"session: {exc!r}")
    return conns, opened, refused


async def _sessions_then_close(srv: ServerKit, user, key, connections: int, per_connection: int,
                               ) -> tuple[int, list[str]]:
    conns, opened, refused = await _hold_sessions(srv, user, key, connections, per_connection)
    for conn in conns:
        conn.close()
    return opened, refused


def test_sessions_per_identity_are_capped_across_connections(tmp_path, make_user):
    require_root()
    user = make_user("msr")
    key, config = key_login_config(tmp_path, user, limits={"max_sessions_per_identity": 5})
    with ServerKit(tmp_path / "srv", config) as srv:
        opened, refused = asyncio.run(_sessions_then_close(srv, user, key, 3, 3))
        assert opened == 5 and len(refused) == 4, refused
        assert '"max-sessions-per-identity"' in srv.output()


def test_low_fds_refuse_new_connections_not_the_daemon(tmp_path, make_user):
    """At a 200-fd limit, sessions eat the headroom; new connections are refused with a
    log line, the daemon stays up, and logins work again once the sessions end."""
    require_root()
    user = make_user("msr")
    key, config = key_login_config(tmp_path, user, limits={"max_sessions_per_identity": 1000})
    with ServerKit(tmp_path / "srv", config, daemon_prefix=["prlimit", "--nofile=200:200", "--"]) as srv:
        opened, refused = asyncio.run(_sessions_then_close(srv, user, key, 12, 10))
        assert any(r.startswith("connect") for r in refused), (opened, refused)
        assert '"fds-low"' in srv.output()
        assert srv.proc.popen.poll() is None
        assert _wait_fds(srv.proc.pid, 60) <= 60
        r = srv.ssh(user.pw_name, key, "echo still-works")
        assert r.returncode == 0 and r.stdout == b"still-works\n", r
