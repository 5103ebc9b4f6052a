"""Public-key logins through the real server and OpenSSH `ssh`: StrictModes and options."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshsshd.config import find_sftp_server
from tests.integration.detachkit import wait_for
from tests.integration.serverkit import ClientKey, ServerKit, client_key, install_key

pytestmark = [pytest.mark.root, pytest.mark.openssh]


def events(srv: ServerKit, name: str) -> list[dict[str, Any]]:
    out = []
    for line in srv.output().splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


@pytest.fixture
def setup(tmp_path: Path, make_user: Callable[..., Any]) -> tuple[Any, ClientKey, dict[str, Any]]:
    user = make_user("mak")
    key = client_key(tmp_path)
    config = {
        "authorized_keys": True,
        "limits": {"penalty_failures": 10_000},
        "access": [{"sources": ["127.0.0.1/32"], "identities": [key.identity], "local_users": [user.pw_name]}],
    }
    return user, key, config


def test_strict_modes_then_fixed(tmp_path: Path, setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    user, key, config = setup
    install_key(user, key)
    ssh_dir = Path(user.pw_dir) / ".ssh"
    with ServerKit(tmp_path / "srv", config) as srv:
        r = srv.ssh(user.pw_name, key, "id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == user.pw_name

        os.chmod(ssh_dir, 0o770)
        r = srv.ssh(user.pw_name, key, "id -un")
        assert r.returncode == 255 and b"Permission denied" in r.stderr
        refused = events(srv, "authorized-keys.refused")
        assert len(refused) == 1
        assert refused[0]["why"] == f"bad modes for {ssh_dir}: drwxrwx--- is group-writable"

        os.chmod(ssh_dir, 0o700)  # read again at each login: fixed without a restart
        r = srv.ssh(user.pw_name, key, "id -un")
        assert r.returncode == 0, r.stderr


def test_forced_command_and_restrict(tmp_path: Path, setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    user, key, config = setup
    install_key(user, key, options='restrict,command="echo forced-$USER"')
    with ServerKit(tmp_path / "srv", config) as srv:
        r = srv.ssh(user.pw_name, key, "id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == f"forced-{user.pw_name}"
        # restrict implies no-pty (asserted on the parsed options in the unit tests); `pty`
        # after restrict gives it back (the file is read at each login).
        install_key(user, key, options='restrict,pty,command="echo forced-$USER"')
        r = srv.ssh(user.pw_name, key, "tty", opts=["-tt"])
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == f"forced-{user.pw_name}"


def _env(r: Any) -> dict[str, str]:
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.decode().splitlines() if "=" in line)


SEND = ["-o", "SetEnv=LANG=C.UTF-8 LC_MESH=yes EDITOR=vim"]


def test_forced_command_sees_the_original_command_and_no_client_env(
        tmp_path: Path, setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    """rrsync, borg --restrict-to-path and gitolite read SSH_ORIGINAL_COMMAND."""
    user, key, config = setup
    install_key(user, key, options='command="env"')
    config["sftp"] = True
    with ServerKit(tmp_path / "srv", config) as srv:
        env = _env(srv.ssh(user.pw_name, key, "rsync --server -vlogDtpre.iLsfxC . /backup", opts=SEND))
        assert env["SSH_ORIGINAL_COMMAND"] == "rsync --server -vlogDtpre.iLsfxC . /backup"
        assert not {"LANG", "LC_MESH", "EDITOR"} & set(env)
        # A shell request has no original command; a subsystem's is its command line.
        assert "SSH_ORIGINAL_COMMAND" not in _env(srv.ssh(user.pw_name, key, opts=["-T", *SEND], input=b""))
        r = srv.ssh(user.pw_name, key, "sftp", opts=["-s"], input=b"")
        assert _env(r)["SSH_ORIGINAL_COMMAND"] == srv.config.get("sftp_server", find_sftp_server())


def test_client_env_follows_accept_env_and_restrict(tmp_path: Path,
                                                   setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    user, key, config = setup
    install_key(user, key)
    with ServerKit(tmp_path / "srv", config) as srv:
        env = _env(srv.ssh(user.pw_name, key, "env", opts=SEND))
        assert env["LANG"] == "C.UTF-8" and env["LC_MESH"] == "yes" and "EDITOR" not in env
        install_key(user, key, options="restrict")
        assert not {"LANG", "LC_MESH", "EDITOR"} & set(_env(srv.ssh(user.pw_name, key, "env", opts=SEND)))
        install_key(user, key)
        # The admitting rule's accept_env replaces the server's.
        srv.reload(access=[{**config["access"][0], "accept_env": ["EDITOR", "LC_M?SH"]}])
        wait_for(lambda: "server.applied" in srv.output(), what="reload")
        env = _env(srv.ssh(user.pw_name, key, "env", opts=SEND))
        assert env["EDITOR"] == "vim" and env["LC_MESH"] == "yes" and "LANG" not in env


def test_unsupported_option_skips_only_that_entry(tmp_path: Path,
                                                  setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    user, key, config = setup
    other = client_key(tmp_path, "id_other")
    ak = install_key(user, key)
    ak.write_text(f'permitlisten="localhost:8080" {other.public}\n{key.public}\n')
    config["access"][0]["identities"] = [key.identity, other.identity]
    with ServerKit(tmp_path / "srv", config) as srv:
        assert srv.ssh(user.pw_name, other, "true").returncode == 255
        assert srv.ssh(user.pw_name, key, "true").returncode == 0
        skipped = events(srv, "authorized-keys.entries-skipped")
        assert skipped and skipped[0]["skipped"] == ["line 1: option permitlisten is not supported by meshsshd"]
