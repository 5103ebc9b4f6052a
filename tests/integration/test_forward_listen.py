"""`ssh -R` listeners: bound as the user, answered before the session, fenced by permit_listen.

The system `ssh` asks; the kernel's view of the listening socket (the uid column of
/proc/net/tcp, which is the uid of whoever created the socket) says who bound it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support import free_port, os_user, require_root, require_tool

from .serverkit import ServerKit, Talker, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

LISTEN = "0A"   # TCP_LISTEN in /proc/net/tcp
# Failure injection: every -R bind takes half a second longer (a slow helper start).
SLOW_BIND = (
    "import asyncio, sys; import meshsshd.forwarding as f; real = f.listen_as_user\n"
    "async def slow(*a):\n    await asyncio.sleep(0.5)\n    return await real(*a)\n"
    "f.listen_as_user = slow; sys.argv = sys.argv[1:]\n"
    "from meshsshd.cli import main; main()"
)


def _listener_uids(port: int) -> list[int]:
    """uids of the sockets listening on `port` (IPv4 and IPv6)."""
    uids = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == LISTEN:
                    uids.append(int(cols[7]))
    return uids


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (uids := _listener_uids(port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {port}: {proc.stderr.read() if proc.poll() else b''!r}")
        time.sleep(0.05)
    return uids


def _forward(srv: ServerKit, user: str, key, spec: str) -> subprocess.Popen:
    opts = ["-N", "-o", "ExitOnForwardFailure=yes", "-R", spec]
    return subprocess.Popen(srv.ssh_argv(user, key, opts=opts), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


GREETING = b"hello through -R\r\n"


def _talk(port: int) -> bytes:
    """What arrives through the forward from the far end (a Talker), up to its FIN."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(10)
        got = b""
        while chunk := s.recv(100):
            got += chunk
        return got


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[ServerKit, object, object, Talker]]:
    require_root()
    require_tool("ssh")
    tmp = tmp_path_factory.mktemp("listen")
    key = client_key(tmp)
    echo = Talker(GREETING)
    with os_user("mrl") as user:
        install_key(user, key)
        config = {"authorized_keys": True, "remote_port_forwarding": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp / "server", config) as srv:
            yield srv, user, key, echo
    echo.close()


def test_remote_listener_is_bound_as_the_user(world):
    srv, user, key, echo = world
    port = free_port()
    proc = _forward(srv, user.pw_name, key, f"localhost:{port}:127.0.0.1:{echo.port}")
    try:
        uids = _wait_listening(port, proc)
        assert uids and set(uids) == {user.pw_uid}, f"listener of -R owned by {uids}, not {user.pw_uid}"
        assert _talk(port) == GREETING
    finally:
        _stop(proc)


def test_privileged_port_only_for_root(tmp_path, make_user):
    """A user's -R below 1024 is refused (ExitOnForwardFailure: 255); a root login (root
    login on, mapped) still binds it, as root, as with sshd."""
    user = make_user("mrp")
    port = next(p for p in range(1023, 899, -1) if not _listener_uids(p))
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": ["*", "root"]}
    config = {"disable_auth": True, "root_login": True, "remote_port_forwarding": True, "access": [rule]}
    with ServerKit(tmp_path / "srv", config) as srv:
        refused = _forward(srv, user.pw_name, None, f"127.0.0.1:{port}:127.0.0.1:9")
        assert refused.wait(20) == 255
        assert b"remote port forwarding failed" in refused.stderr.read()
        proc = _forward(srv, "root", None, f"127.0.0.1:{port}:127.0.0.1:9")
        try:
            assert _wait_listening(port, proc) == [0]
        finally:
            _stop(proc)


def test_exit_on_forward_failure_when_the_bind_is_slow(tmp_path):
    """The reply to a refused -R reaches the client before anything of the session, even
    when the bind takes longer than the command (here: 0.5 s more, injected)."""
    with os_user("mrs") as user:
        key = client_key(tmp_path)
        install_key(user, key)
        config = {"authorized_keys": True, "remote_port_forwarding": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        busy = socket.create_server(("127.0.0.1", 0))
        with busy, ServerKit(tmp_path / "srv", config, daemon_prefix=[sys.executable, "-c", SLOW_BIND]) as srv:
            port = busy.getsockname()[1]
            runs = [srv.ssh(user.pw_name, key, "echo ran; exit 3",
                            opts=["-o", "ExitOnForwardFailure=yes", "-R", f"localhost:{port}:127.0.0.1:9"])
                    for _ in range(3)]
            ok = srv.ssh(user.pw_name, key, "echo ran; exit 3",
                         opts=["-o", "ExitOnForwardFailure=yes", "-R", f"localhost:{free_port()}:127.0.0.1:9"])
    assert [(r.returncode, r.stdout) for r in runs] == [(255, b"")] * 3, [(r.returncode, r.stderr) for r in runs]
    assert (ok.returncode, ok.stdout) == (3, b"ran\n"), ok.stderr


def test_permit_listen_allows_and_denies(tmp_path):
    with os_user("mrq") as user:
        key = client_key(tmp_path)
        install_key(user, key)
        allowed, other = free_port(), free_port()
        config = {"authorized_keys": True, "remote_port_forwarding": True,
                  "permit_listen": [f"localhost:{allowed}", "127.0.0.*:*"],
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        echo = Talker(GREETING)
        with ServerKit(tmp_path / "srv", config) as srv:
            proc = _forward(srv, user.pw_name, key, f"localhost:{allowed}:127.0.0.1:{echo.port}")
            try:
                _wait_listening(allowed, proc)
                assert _talk(allowed) == GREETING
                # `localhost` and ::1 are different entries (OpenSSH's rule); another port too
                for spec in (f"[::1]:{allowed}:127.0.0.1:9", f"localhost:{other}:127.0.0.1:9"):
                    refused = _forward(srv, user.pw_name, key, spec)
                    assert refused.wait(20) == 255, spec
                    assert b"remote port forwarding failed" in refused.stderr.read()
                wild = _forward(srv, user.pw_name, key, f"127.0.0.1:{other}:127.0.0.1:{echo.port}")
                try:
                    _wait_listening(other, wild)   # 127.0.0.*:* matches
                finally:
                    _stop(wild)
                # narrowing the list closes what it no longer allows
                srv.reload(permit_listen=["none"])
                deadline = time.monotonic() + 10
                while _listener_uids(allowed):
                    assert time.monotonic() < deadline, "-R listener outlived permit_listen = none"
                    time.sleep(0.1)
            finally:
                _stop(proc)
                echo.close()
            log = srv.output()
    assert f"localhost port {other} is not in this peer's permit_listen list" in log
    assert "permit_listen none" in log
