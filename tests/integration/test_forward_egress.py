"""`ssh -L`/`-W` destinations: dialled as the user, and fenced by permit_open.

Everything runs in a network namespace the test creates: the daemon, the OpenSSH client
(`ssh -W`, a direct-tcpip channel like `-L` and `-D`), echo servers on addresses of the
namespace's loopback, and an nftables rule with `meta skuid` (iptables `--uid-owner`), so
only one uid may reach one address. The daemon runs as root: a dial it made itself would
carry uid 0 and break that rule in both directions.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.support import free_port, netns, os_user, require_root, require_tool, wait_for_port

from .detachkit import audit_events
from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root, pytest.mark.netns]

GUARDED = "192.0.2.10"        # only user A's uid may connect here
METADATA = "169.254.169.254"  # link-local: refused unless permit_open names it
OTHER = "192.0.2.20"

ECHO = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    c, _ = srv.accept()
    c.sendall(b"echo:" + c.recv(100))
    c.close()
"""


def _echo(ns: str, address: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO, address, str(port)])
    probe = f"import socket; socket.create_connection(({address!r}, {port}), 0.5).close()"
    deadline = time.monotonic() + 10
    while subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"echo server on {address}:{port} did not start"
        time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    require_tool("ssh")
    nft = require_tool("nft")
    tmp = tmp_path_factory.mktemp("egress")
    key = client_key(tmp)
    port = free_port()
    with netns("mse") as ns, os_user("msa") as a, os_user("msb") as b:
        for address in (GUARDED, METADATA, OTHER):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        echoes = [_echo(ns, address, port) for address in (GUARDED, METADATA, OTHER)]   # before the rule
        ruleset = (f"table inet egress {{\n chain out {{\n type filter hook output priority 0; policy accept;\n"
                   f" ip daddr {GUARDED} tcp dport {port} meta skuid != {a.pw_uid} reject with tcp reset\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", ns, nft, "-f", "-"], input=ruleset.encode(), check=True)
        for user in (a, b):
            install_key(user, key)
        config = {
            "authorized_keys": True,
            "local_port_forwarding": True,
            "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                        "local_users": [a.pw_name, b.pw_name]}],
        }
        try:
            with ServerKit(tmp / "server", config, netns=ns) as srv:
                yield srv, key, a, b, port
        finally:
            for proc in echoes:
                proc.kill()
                proc.wait(5)


def _via(srv: ServerKit, key, user, address: str, port: int) -> subprocess.CompletedProcess:
    """`ssh -W address:port` with "hi" on stdin: b"echo:hi" back when the channel opened."""
    return srv.ssh(user.pw_name, key, opts=["-o", "LogLevel=INFO", "-W", f"{address}:{port}"], input=b"hi",
                   timeout=30)


def test_local_forward_dials_with_the_users_uid(world):
    srv, key, a, b, port = world
    allowed = _via(srv, key, a, GUARDED, port)
    assert allowed.stdout == b"echo:hi", allowed.stderr
    refused = _via(srv, key, b, GUARDED, port)
    assert refused.stdout == b"" and refused.returncode == 255
    assert b"refused" in refused.stderr.lower(), refused.stderr
    assert _via(srv, key, b, OTHER, port).stdout == b"echo:hi"   # B's forwards work elsewhere


def test_link_local_is_refused_unless_listed(world):
    srv, key, a, _b, port = world
    refused = _via(srv, key, a, METADATA, port)
    assert refused.stdout == b"", "a local forward reached the metadata address"
    assert b"link-local" in refused.stderr, refused.stderr
    srv.reload(permit_open=[f"{METADATA}:{port}", f"{OTHER}:*"])
    try:
        deadline = time.monotonic() + 10
        while (r := _via(srv, key, a, METADATA, port)).stdout != b"echo:hi":
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.2)
        assert _via(srv, key, a, OTHER, port).stdout == b"echo:hi"
        outside = _via(srv, key, a, GUARDED, port)   # not in the list now
        assert outside.stdout == b"" and b"permit_open" in outside.stderr, outside.stderr
    finally:
        srv.reload(permit_open=[])


def test_apply_closes_forwards_the_new_settings_refuse(tmp_path):
    """Turning forwarding off (or narrowing permit_open) ends forwards already open."""
    require_root()
    require_tool("ssh")
    key = client_key(tmp_path)
    hold = socket.create_server(("127.0.0.1", 0))
    hold.settimeout(15)
    hport = hold.getsockname()[1]
    with os_user("msf") as user, hold:
        install_key(user, key)
        config = {"authorized_keys": True, "local_port_forwarding": True, "remote_port_forwarding": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp_path / "srv", config) as srv:
            local = subprocess.Popen(srv.ssh_argv(user.pw_name, key, opts=["-W", f"127.0.0.1:{hport}"]),
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rport = free_port()
            remote = subprocess.Popen(srv.ssh_argv(user.pw_name, key, opts=[
                "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{rport}:127.0.0.1:{hport}"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                held, _ = hold.accept()   # the -W forward stands
                wait_for_port("127.0.0.1", rport, proc=remote)
                time.sleep(0.5)
                assert local.poll() is None and remote.poll() is None
                srv.reload(local_port_forwarding=False, remote_port_forwarding=False)
                local.wait(15)   # its channel was closed by the daemon
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", rport), timeout=1).close()
                    except OSError:
                        break
                    assert time.monotonic() < deadline, "the -R listener survived remote forwarding turned off"
                    time.sleep(0.2)
                assert remote.poll() is None   # the connection stays; only its forwards went
                closed = {e["forward"]: e["reason"] for e in audit_events(srv.output(), "forward.closed")}
                assert closed == {f"local 127.0.0.1:{hport}": "local port forwarding is disabled",
                                  f"remote localhost:{rport}": "remote port forwarding is disabled"}
                held.close()
            finally:
                for proc in (local, remote):
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait(5)
