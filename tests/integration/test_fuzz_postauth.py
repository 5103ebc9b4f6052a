"""A bounded post-authentication fuzzer: an authenticated asyncssh client sends, with a
fixed seed, a few thousand malformed and extreme channel and global requests to a real
`meshsshd serve`, in batches. After each batch: the daemon is alive, its fd count and
RSS are back near the baseline, nothing in its log is a traceback, and a real OpenSSH
login still runs a command and returns its exit status.

A request that wants a reply must get one (success or failure) or the server must close
the connection; one that hangs fails the batch. Cases that end a connection by design
(data for a channel that was never opened) come last in their batch. The seed is in
every failure message, so a case reproduces with `FUZZ_SEED=... pytest -k fuzz`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.packet import Boolean, String, UInt32

from tests.support import require_root

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

SEED = int(os.environ.get("FUZZ_SEED", "1212"))
BATCHES = 12
CASES_PER_BATCH = 250
REPLY_TIMEOUT = 10.0
FD_SLACK = 8
RSS_SLACK_KIB = 48 * 1024

NAMES = [b"pty-req", b"env", b"exec", b"shell", b"subsystem", b"window-change", b"signal", b"x11-req",
         b"auth-agent-req@openssh.com", b"eow@openssh.com", b"keepalive@openssh.com", b"xon-xoff",
         b"break", b"exit-status", b"unknown-request", b"", b"\x00", b"a" * 300, "ü".encode()]
GLOBAL_NAMES = [b"tcpip-forward", b"cancel-tcpip-forward", b"streamlocal-forward@openssh.com",
                b"no-more-sessions@openssh.com", b"hostkeys-prove-00@openssh.com", b"keepalive@openssh.com",
                b"bogus", b""]
U32 = [0, 1, 80, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]


def _text(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\x00", b"a\x00b", b"\xff\xfe", os.urandom(rng.randint(1, 64)),
                       b"x" * rng.choice([1, 255, 4096, 70000]), b"echo ok", b"TERM", b"LANG", b"../../etc"])


def _payload(rng: random.Random, name: bytes) -> bytes:
    """Well-formed for the name as often as not, else truncated or random."""
    shape = rng.random()
    if shape < 0.2:
        return os.urandom(rng.randint(0, 40))   # garbage
    if name == b"pty-req":
        body = String(_text(rng)) + b"".join(UInt32(rng.choice(U32)) for _ in range(4)) + String(_text(rng))
    elif name == b"window-change":
        body = b"".join(UInt32(rng.choice(U32)) for _ in range(4))
    elif name == b"env":
        body = String(_text(rng)) + String(_text(rng))
    elif name in (b"exec", b"subsystem"):
        body = String(_text(rng) if rng.random() < 0.7 else b"true" + b"\x00" * rng.randint(1, 3))
    elif name == b"signal":
        body = String(rng.choice([b"TERM", b"KILL", b"HUP", b"NOPE", b"", b"\x00", b"9"]))
    elif name == b"x11-req":
        body = Boolean(rng.random() < 0.5) + String(_text(rng)) + String(_text(rng)) + UInt32(rng.choice(U32))
    else:
        body = os.urandom(rng.randint(0, 16))
    return body[: rng.randint(0, len(body))] if shape > 0.9 else body   # truncated now and then


def _global_payload(rng: random.Random) -> bytes:
    return String(rng.choice([b"127.0.0.1", b"localhost", b"", b"0.0.0.0", b"::1", b"\x00", b"h" * 300,
                              b"10.255.255.1"])) + UInt32(rng.choice([0, 1, 22, 1023, 65535, 65536, 2**32 - 1]))


class _Quiet(asyncssh.SSHClientSession):
    """A session that swallows whatever the server sends back."""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _run_batch(srv: ServerKit, user: str, key_path: str, rng: random.Random, batch: int) -> tuple[int, int]:
    """CASES_PER_BATCH cases, on a new connection whenever the server closed one (an env
    flood past the cap, a malformed packet); returns (cases sent, connections used)."""
    sent = connections = 0
    while sent < CASES_PER_BATCH:
        connections += 1
        sent += await _one_connection(srv, user, key_path, rng, batch, sent)
    return sent, connections


async def _one_connection(srv: ServerKit, user: str, key_path: str, rng: random.Random, batch: int,
                          done: int) -> int:
    sent = 0
    async with asyncssh.connect(srv.host, srv.port, username=user, client_keys=[key_path], known_hosts=None,
                                agent_path=None, config=None) as conn:
        while done + sent < CASES_PER_BATCH:
            if conn.is_closed():   # the server ended it (the env cap, a malformed packet)
                return sent
            kind = rng.random()
            where = f"seed {SEED} batch {batch} case {done + sent}"
            try:
                if kind < 0.55:   # a request on a fresh session channel
                    chan, _ = await conn.create_session(_Quiet)
                    for _ in range(rng.randint(1, 3)):
                        name = rng.choice(NAMES)
                        args = _payload(rng, name)
                        if rng.random() < 0.6:
                            await asyncio.wait_for(chan._make_request(name, args), REPLY_TIMEOUT)
                        else:
                            chan._send_request(name, args)
                    if rng.random() < 0.3:
                        chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(rng.choice(U32)))
                    chan.close()
                elif kind < 0.7:   # env flood, then a command
                    chan, _ = await conn.create_session(_Quiet)
                    for i in range(rng.choice([10, 130, 400])):
                        chan._send_request(b"env", String(f"FUZZ_{i}".encode()) + String(b"x" * rng.randint(0, 64)))
                    chan._send_request(b"exec", String(b"true"))
                    chan.close()
                elif kind < 0.8:   # exec strings: NUL, 1 MiB, not UTF-8
                    chan, _ = await conn.create_session(_Quiet)
                    command = rng.choice([b"echo a\x00b", b"x" * (1 << 20), b"\xff\xfeecho", b"exit 3"])
                    await asyncio.wait_for(chan._make_request(b"exec", String(command)), REPLY_TIMEOUT)
                    chan.close()
                elif kind < 0.9:   # direct-tcpip edge cases
                    host = rng.choice(["127.0.0.1", "localhost", "", "h" * 300, "a\x00b", "::1", "256.1.1.1"])
                    port = rng.choice([0, 1, 9, 65535])
                    with pytest.raises((asyncssh.ChannelOpenError, asyncssh.Error, OSError, ValueError)):
                        await asyncio.wait_for(conn.open_connection(host, port), REPLY_TIMEOUT)
                else:              # global requests: forwards, cancels, odd names
                    await asyncio.wait_for(conn._make_global_request(rng.choice(GLOBAL_NAMES), _global_payload(rng)),
                                           REPLY_TIMEOUT)
            except asyncio.TimeoutError:
                raise AssertionError(f"{where}: no answer within {REPLY_TIMEOUT} s (a hung request)") from None
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError, ConnectionResetError):
                return sent + 1   # the server closed this connection, as it may for a protocol error
            except (asyncssh.ChannelOpenError, pytest.fail.Exception):
                pass
            sent += 1
        # last: data for channels that were never opened (the server may well hang up)
        for number in rng.sample(range(1000, 1 << 31), 3):
            conn.send_packet(MSG_CHANNEL_DATA, UInt32(number) + String(b"stray"))
        await asyncio.sleep(0.05)
    return sent


def _settled(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_fuzz_after_login_leaves_the_daemon_whole(tmp_path, make_user) -> None:
    require_root()
    key = client_key(tmp_path)
    user = make_user("msz")
    install_key(user, key)
    rule = {"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}
    config = {"authorized_keys": True, "access": [rule], "local_port_forwarding": True,
              "remote_port_forwarding": True, "limits": {"max_sessions": 1000}}
    rng = random.Random(SEED)
    with ServerKit(tmp_path / "srv", config, log_level="warning") as srv:
        assert srv.proc is not None
        pid = srv.proc.pid
        asyncio.run(_run_batch(srv, user.pw_name, str(key.path), random.Random(0), -1))   # warm-up
        assert srv.ssh(user.pw_name, key, "true").returncode == 0
        time.sleep(0.5)
        base_fds, base_rss = _fds(pid), _rss_kib(pid)
        total = connections = 0
        for batch in range(BATCHES):
            sent, used = asyncio.run(_run_batch(srv, user.pw_name, str(key.path), rng, batch))
            total, connections = total + sent, connections + used
            where = f"after batch {batch} (seed {SEED})"
            assert srv.proc.popen.poll() is None, f"{where}: the daemon died\n{srv.output()[-3000:]}"
            assert _settled(lambda: _fds(pid) <= base_fds + FD_SLACK), f"{where}: fds {_fds(pid)} vs {base_fds}"
            assert _rss_kib(pid) <= base_rss + RSS_SLACK_KIB, f"{where}: RSS {_rss_kib(pid)} KiB vs {base_rss}"
            r = srv.ssh(user.pw_name, key, "exit 3")
            assert r.returncode == 3, f"{where}: a real login got {r.returncode}: {r.stderr[-500:]!r}"
        assert "Traceback" not in srv.output(), srv.output()[-4000:]
        print(f"fuzzed {total} cases in {BATCHES} batches over {connections} connections; "
              f"fds {base_fds}->{_fds(pid)}, RSS {base_rss}->{_rss_kib(pid)} KiB")
