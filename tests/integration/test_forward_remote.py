"""`ssh -R` listeners: none outlives its connection, the reply comes before session
data, and `forward.opened` means a port is really bound."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import asyncssh
import pytest

from tests.support import free_port, os_user, require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[ServerKit, str, object]]:
    require_root()
    require_tool("ssh")
    tmp = tmp_path_factory.mktemp("rfwd")
    key = client_key(tmp)
    with os_user("msf") as user:
        install_key(user, key)
        config = {"authorized_keys": True, "remote_port_forwarding": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp / "server", config) as srv:
            yield srv, user.pw_name, key


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
    opened = []
    for line in srv.output().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "audit.forward.opened":
            opened.append(doc["forward"])
    assert f"remote 127.0.0.1:{free}" in opened
    assert f"remote 127.0.0.1:{port}" not in opened, "forward.opened for a port that was never bound"
