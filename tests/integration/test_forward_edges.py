"""Forwarding edge cases: no byte lost, no listener leaked.

Targets that talk first: nothing the target sends before the channel is open, nor its
early FIN, may be lost (`ssh -L`, `-D` and `-W` are all direct-tcpip).

The daemon dials as the user and only then opens the channel; bytes and an EOF that
arrive in between used to be written to a channel that could not take them yet. The
client here is asyncssh (many channels over one login, so 100 runs take seconds); the
`-W` case is OpenSSH's own client reaching the daemon's SSH port through itself.

`ssh -R`: no listener outlives its connection, the reply comes before session data, and
`forward.opened` means a port is really bound.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import asyncssh
import pytest

from tests.support import free_port, os_user, require_root, require_tool

from .detachkit import audit_events
from .serverkit import ClientKey, ServerKit, Talker, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

RUNS = 100
BULK = os.urandom(480 * 1024)
GREETING = b"220 hello from a target that talks first\r\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[ServerKit, str, ClientKey]]:
    require_root()
    require_tool("ssh")
    tmp = tmp_path_factory.mktemp("early")
    key = client_key(tmp)
    with os_user("msr") as user:
        install_key(user, key)
        config = {"authorized_keys": True, "local_port_forwarding": True, "remote_port_forwarding": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp / "server", config) as srv:
            yield srv, user.pw_name, key


async def _whole_arrivals(srv: ServerKit, user: str, key: str, port: int, payload: bytes) -> int:
    """How many of RUNS direct-tcpip channels got `payload` and then EOF, nothing else."""
    async with asyncssh.connect(srv.host, srv.port, username=user, known_hosts=None,
                                client_keys=[key], agent_path=None) as conn:
        async def one() -> bool:
            reader, writer = await conn.open_connection("127.0.0.1", port)
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except asyncio.TimeoutError:
                return False
            finally:
                writer.close()
            return got == payload

        gate = asyncio.Semaphore(4)

        async def bounded() -> bool:
            async with gate:
                return await one()
        results = await asyncio.gather(*(bounded() for _ in range(RUNS)))
    return sum(results)


@pytest.mark.parametrize("payload", [GREETING, BULK], ids=["greeting", "480KB-and-FIN"])
def test_early_data_and_fin_arrive_whole(world, payload):
    srv, user, key = world
    talker = Talker(payload)
    try:
        whole = asyncio.run(asyncio.wait_for(_whole_arrivals(srv, user, str(key.path), talker.port, payload), 120))
    finally:
        talker.close()
    assert whole == RUNS, f"only {whole}/{RUNS} forwards arrived whole"


def test_ssh_W_to_the_daemons_own_port_sees_its_banner(world):
    srv, user, key = world
    argv = srv.ssh_argv(user, None, "-W", f"{srv.host}:{srv.port}", opts=["-i", str(key.path), "-o", "IdentitiesOnly=yes"])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        timer = threading.Timer(15, proc.kill)
        timer.start()
        try:
            line = proc.stdout.readline()
        finally:
            timer.cancel()
        assert line.startswith(b"SSH-2.0-"), f"no banner through -W: {line!r} {proc.stderr.read1() if proc.poll() else b''!r}"
    finally:
        proc.kill()
        proc.wait(5)


def _bound(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def _request_and_drop(srv: ServerKit, user: str, key: str, ports: list[int]) -> None:
    """Ask for every port, and drop the connection before the replies can come."""
    conn = await asyncssh.connect(srv.host, srv.port, username=user, known_hosts=None,
                                  client_keys=[key], agent_path=None)
    for port in ports:
        asyncio.ensure_future(conn.forward_remote_port("localhost", port, "127.0.0.1", 9))
    await asyncio.sleep(0)
    conn.close()   # the disconnect follows the requests in the same flight
    await asyncio.sleep(0.1)


def test_listeners_pending_when_the_client_drops_are_closed(world):
    srv, user, key = world
    ports = [free_port() for _ in range(20)]
    for _ in range(5):
        asyncio.run(asyncio.wait_for(_request_and_drop(srv, user, str(key.path), ports), 30))
    time.sleep(1.0)
    leaked = [p for p in ports if _bound(p)]
    assert not leaked, f"-R listeners survived their dropped connection: {leaked}"


def test_exit_on_forward_failure_exits_255_before_the_command_runs(world):
    srv, user, key = world
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        runs = [srv.ssh(user, key, "echo ran; exit 3",
                        opts=["-o", "ExitOnForwardFailure=yes", "-R", f"localhost:{port}:127.0.0.1:9"])
                for _ in range(10)]
    finally:
        busy.close()
    assert [r.returncode for r in runs] == [255] * 10, [(r.returncode, r.stderr) for r in runs]
    assert all(b"remote port forwarding failed" in r.stderr for r in runs)


def test_forward_opened_only_after_a_successful_bind(world):
    srv, user, key = world
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        srv.ssh(user, key, "true", opts=["-R", f"127.0.0.1:{port}:127.0.0.1:9"])
    finally:
        busy.close()
    free = free_port()
    srv.ssh(user, key, "true", opts=["-R", f"127.0.0.1:{free}:127.0.0.1:9"])
    opened = [doc["forward"] for doc in audit_events(srv.output(), "forward.opened")]
    assert f"remote 127.0.0.1:{free}" in opened
    assert f"remote 127.0.0.1:{port}" not in opened, "forward.opened for a port that was never bound"


def test_ssh_W_ends_when_the_target_closed_first(world):
    """The target greets and sends FIN before the client's EOF: `ssh -W` gets the greeting
    and exits, as with sshd (the forward used to stay half-open for ever)."""
    srv, user, key = world
    talker = Talker(GREETING)
    try:
        r = subprocess.run(srv.ssh_argv(user, key, "-W", f"127.0.0.1:{talker.port}"), input=b"",
                           capture_output=True, timeout=8)
    finally:
        talker.close()
    assert (r.returncode, r.stdout) == (0, GREETING), r
