"""sshd options meshsshd now has (issue 12 items 19 and 21), each seen through the system
OpenSSH client: Banner, ForceCommand, RekeyLimit and UpdateHostKeys (hostkeys-00)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import require_tool

from .serverkit import ServerKit
from .test_server_limits import keyed  # noqa: F401  (a pytest fixture: a user, its key, a rule)

pytestmark = [pytest.mark.openssh, pytest.mark.root]


@pytest.fixture
def login(keyed):
    """test_server_limits' user, key and rule, as a config that lets that key log in."""
    user, key, rule = keyed
    return user, key, {"authorized_keys": True, "access": [rule]}


def test_banner_is_shown_before_login_with_control_characters_escaped(tmp_path: Path, login) -> None:
    user, key, config = login
    banner = tmp_path / "banner.txt"
    banner.write_text("Authorised use only.\n\x1b[2J(the screen is not cleared)\n")
    with ServerKit(tmp_path / "srv", {**config, "banner": str(banner)}) as srv:
        r = srv.ssh(user.pw_name, key, "true", opts=["-o", "LogLevel=INFO"])
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Authorised use only." in err and "\\x1b[2J(the screen is not cleared)" in err, err
    assert "\x1b" not in err


def test_force_command_runs_instead_of_the_asked_one(tmp_path: Path, login) -> None:
    user, key, config = login
    forced = 'echo "forced, asked: $SSH_ORIGINAL_COMMAND"; exit 7'
    with ServerKit(tmp_path / "srv", {**config, "force_command": forced}) as srv:
        r = srv.ssh(user.pw_name, key, "echo mine")
        assert (r.returncode, r.stdout) == (7, b"forced, asked: echo mine\n"), r.stderr
        sftp = subprocess.run([require_tool("sftp"), *srv.tool_opts(key), "-b", "-",
                               f"{user.pw_name}@{srv.host}"], input=b"ls\n", capture_output=True, timeout=30)
        assert sftp.returncode != 0   # subsystems are forced too, as with sshd's ForceCommand


def test_rekey_limit_rekeys_after_the_data_limit(tmp_path: Path, login) -> None:
    user, key, config = login
    with ServerKit(tmp_path / "srv", {**config, "rekey_limit": "256K none"}) as srv:
        r = srv.ssh(user.pw_name, key, "head -c 2000000 /dev/zero", opts=["-o", "LogLevel=DEBUG1"])
    assert r.returncode == 0 and len(r.stdout) == 2_000_000, r.stderr[-2000:]
    kexes = r.stderr.decode().count("SSH2_MSG_KEXINIT received")
    assert kexes >= 4, kexes   # the first key exchange and one per 256 KiB the server sent


@pytest.mark.parametrize("text, message", [
    ("lots", "rekey_limit data 'lots'"), ("1G soon", "rekey_limit time 'soon'"), ("1 2 3", r"DATA \[TIME\]"),
])
def test_bad_rekey_limits_are_named(tmp_path: Path, text: str, message: str) -> None:
    from meshsshd.config import settings_from_dict
    from meshsshd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings_from_dict({"listen": ["127.0.0.1:0"], "authorized_keys": True, "rekey_limit": text})


def test_update_host_keys_teaches_the_client_our_other_keys(tmp_path: Path, login) -> None:
    user, key, config = login
    with ServerKit(tmp_path / "srv", config) as srv:
        scan = subprocess.run([require_tool("ssh-keyscan"), "-t", "ed25519", "-p", str(srv.port), srv.host],
                              capture_output=True, text=True, timeout=30)
        known = tmp_path / "known_hosts"
        known.write_text(scan.stdout)   # the ed25519 key only
        assert " ssh-ed25519 " in scan.stdout and "ssh-rsa" not in scan.stdout, scan
        r = srv.ssh(user.pw_name, key, "true", opts=[
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "UpdateHostKeys=yes", "-o", "LogLevel=DEBUG1"])
        assert r.returncode == 0, r.stderr
    lines = known.read_text().splitlines()
    debug = [ln for ln in r.stderr.decode().splitlines() if "hostkey" in ln.lower() or "known" in ln.lower()]
    assert any(" ssh-rsa " in f" {line} " for line in lines), (lines, debug)   # learnt, and proven


def test_channel_timeout_closes_an_idle_session_and_spares_a_busy_one(tmp_path: Path, login) -> None:
    user, key, config = login
    with ServerKit(tmp_path / "srv", {**config, "channel_timeout": "session=2s"}) as srv:
        idle = srv.ssh(user.pw_name, key, "sleep 20; echo never", timeout=30)
        busy = srv.ssh(user.pw_name, key, "for i in 1 2 3 4 5 6; do echo tick; sleep 1; done", timeout=30)
        assert b"never" not in idle.stdout and b"no traffic for 2 s (channel_timeout)" in idle.stderr, idle
        assert busy.returncode == 0 and busy.stdout.count(b"tick") == 6, busy
        assert '"session.idle_closed"' in srv.output()


def test_unused_connection_timeout_closes_a_connection_without_channels(tmp_path: Path, login) -> None:
    import asyncio
    import time

    import asyncssh

    user, key, config = login

    async def hold() -> tuple[float, bool]:
        async with asyncssh.connect(srv.host, srv.port, username=user.pw_name, client_keys=[str(key.path)],
                                    known_hosts=None, agent_path=None, config=None) as conn:
            result = await conn.run("sleep 3", check=True)   # an open channel keeps it
            assert result.exit_status == 0
            t0 = time.monotonic()
            await asyncio.wait_for(conn.wait_closed(), 15)
            return time.monotonic() - t0, conn.is_closed()

    with ServerKit(tmp_path / "srv", {**config, "unused_connection_timeout": "2s"}) as srv:
        waited, closed = asyncio.run(hold())
        assert closed and 1.5 <= waited <= 4.5, waited
        assert '"connection.unused_closed"' in srv.output()


@pytest.mark.parametrize("key_, value, message", [
    ("channel_timeout", "direct-tcpip=1h", "only session channels"),
    ("channel_timeout", "session=0", "a duration"),
    ("unused_connection_timeout", "soon", "a duration"),
])
def test_bad_timeouts_are_named(key_: str, value: str, message: str) -> None:
    from meshsshd.config import settings_from_dict
    from meshsshd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings_from_dict({"listen": ["127.0.0.1:0"], "authorized_keys": True, key_: value})
