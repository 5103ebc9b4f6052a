"""A refused `ssh -L`/`-R` says why and what to change, on the client and in the peer's log.

The system `ssh` against a real `meshsshd serve`. A refused direct-tcpip channel carries
its reason (OpenSSH prints "open failed: administratively prohibited: ..." at its default
log level); a refused tcpip-forward has no reason field in SSH, so the peer sends it as a
debug message, which `ssh -v` prints as "Remote: ...". Each refusal is one
`forward.refused` log line, within a per-source budget so a flood costs a few lines.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tests.support import free_port, require_root, require_tool, stop_group, wait_for_port

from .serverkit import ServerKit

pytestmark = [pytest.mark.openssh, pytest.mark.root]

RULE = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": ["*"]}
LOCAL_OFF = "local port forwarding is disabled on this peer (local_port_forwarding = true in meshsshd.toml)"
PROBE = 1   # the connection that saw a -L listener listen
REMOTE_OFF = "remote port forwarding is disabled on this peer (remote_port_forwarding = true in meshsshd.toml)"


def _refusals(srv: ServerKit) -> list[dict]:
    lines = [json.loads(line) for line in srv.output().splitlines() if line.startswith("{")]
    return [d for d in lines if d.get("event") == "forward.refused"]


def _local_forward(srv: ServerKit, user: str, dest: str) -> tuple[subprocess.Popen, int]:
    """`ssh -N -L port:dest` at OpenSSH's default log level, listening. Seeing it listen
    takes one connection, which the peer refuses too (`PROBE`)."""
    port = free_port()
    proc = subprocess.Popen(srv.ssh_argv(user, None, opts=["-N", "-o", "LogLevel=INFO", "-L", f"{port}:{dest}"]),
                            stderr=subprocess.PIPE, start_new_session=True)
    wait_for_port("127.0.0.1", port, proc=proc)
    return proc, port


def _poke(port: int) -> None:
    """One connection into a -L listener; returns once ssh closed it (the channel failed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(10) == b""


def _stderr_of(proc: subprocess.Popen) -> str:
    stop_group(proc)
    return proc.stderr.read().decode(errors="replace")


def _remote_forward(srv: ServerKit, user: str, listen: str) -> subprocess.CompletedProcess:
    opts = ["-v", "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{listen}:127.0.0.1:9"]
    return subprocess.run(srv.ssh_argv(user, None, opts=opts), capture_output=True, text=True, timeout=30)


@pytest.fixture
def off(tmp_path, make_user):
    """A peer with both forwardings off (the default) and a user who may log in."""
    require_root()
    require_tool("ssh")
    user = make_user("mfr")
    with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [RULE]}) as srv:
        yield srv, user.pw_name


def test_local_forward_off_names_the_setting(off):
    srv, user = off
    proc, port = _local_forward(srv, user, "127.0.0.1:9")
    _poke(port)
    err = _stderr_of(proc)
    assert f"open failed: administratively prohibited: {LOCAL_OFF}" in err, err
    lines = _refusals(srv)
    assert len(lines) == 1 + PROBE, lines
    line = lines[-1]
    assert (line["kind"], line["setting"], line["host"], line["port"]) == ("local", "local_port_forwarding",
                                                                          "127.0.0.1", 9), line
    assert line["reason"] == "local port forwarding is disabled on this peer"


def test_remote_forward_off_names_the_setting(off):
    srv, user = off
    port = free_port()
    r = _remote_forward(srv, user, f"127.0.0.1:{port}")
    assert r.returncode == 255, r.stderr
    assert f"Error: remote port forwarding failed for listen port {port}" in r.stderr
    assert f"Remote: meshsshd: {REMOTE_OFF}" in r.stderr, r.stderr
    [line] = _refusals(srv)
    assert (line["kind"], line["setting"], line["port"]) == ("remote", "remote_port_forwarding", port), line


@pytest.mark.parametrize("kind", [pytest.param("local", id="permit-open"), pytest.param("remote", id="permit-listen")])
def test_a_narrowing_list_names_itself(tmp_path, make_user, kind):
    """Forwarding on, but permit_open / permit_listen leave the request out."""
    require_root()
    require_tool("ssh")
    user = make_user("mfn").pw_name
    config = {"disable_auth": True, "access": [RULE], "local_port_forwarding": True,
              "remote_port_forwarding": True, "permit_open": ["127.0.0.1:1"], "permit_listen": ["127.0.0.1:1"]}
    with ServerKit(tmp_path / "srv", config) as srv:
        if kind == "local":
            proc, port = _local_forward(srv, user, "127.0.0.1:9")
            _poke(port)
            err = _stderr_of(proc)
            _, line = _refusals(srv)
            assert ("administratively prohibited: 127.0.0.1 port 9 is not in this peer's permit_open list "
                    "(permit_open in meshsshd.toml)") in err, err
        else:
            port = free_port()
            r = _remote_forward(srv, user, f"127.0.0.1:{port}")
            assert r.returncode == 255, r.stderr
            assert (f"Remote: meshsshd: 127.0.0.1 port {port} is not in this peer's permit_listen list "
                    "(permit_listen in meshsshd.toml)") in r.stderr, r.stderr
            [line] = _refusals(srv)
        assert line["setting"] == ("permit_open" if kind == "local" else "permit_listen"), line


def test_a_remote_forward_that_cannot_bind_says_why(tmp_path, make_user):
    """Forwarding on and allowed, but the port is taken: the client hears the kernel's
    reason (as sshd logs "bind ... Address already in use") and the peer logs it."""
    require_root()
    require_tool("ssh")
    user = make_user("mfb").pw_name
    config = {"disable_auth": True, "access": [RULE], "remote_port_forwarding": True}
    with ServerKit(tmp_path / "srv", config) as srv, socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = _remote_forward(srv, user, f"127.0.0.1:{port}")
        assert r.returncode == 255, r.stderr
        why = f"cannot listen on 127.0.0.1 port {port}: Address already in use"
        assert f"Remote: meshsshd: {why}" in r.stderr, r.stderr
        [line] = _refusals(srv)
        assert (line["kind"], line["reason"], line["port"]) == ("remote", why, port), line


def test_a_flood_of_refusals_costs_a_few_lines(off):
    """40 refused channels at once: every one is refused, the log keeps the budget's
    burst (10), and the next line after a pause counts what it held back."""
    srv, user = off
    proc, port = _local_forward(srv, user, "127.0.0.1:9")
    for _ in range(40):
        _poke(port)
    time.sleep(1.5)   # the budget refills one line a second
    _poke(port)
    err = _stderr_of(proc)
    assert err.count("administratively prohibited") == 41 + PROBE, err
    lines = _refusals(srv)
    assert 10 <= len(lines) <= 14, lines   # the burst, plus what refilled while poking
    held = sum(line.get("suppressed", 0) for line in lines)
    assert len(lines) + held == 41 + PROBE, lines
    assert lines[-1].get("suppressed", 0) > 0, lines[-1]
