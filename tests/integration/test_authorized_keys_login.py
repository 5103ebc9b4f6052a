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


def test_a_key_only_offered_lends_no_options_to_a_jwt_login(tmp_path: Path, make_user: Callable[..., Any]) -> None:
    """OpenSSH offers key A (a query: A's private half is not there, so no signature),
    meshsshd says it would accept it, then the login succeeds with a JWT. A's
    authorized_keys options (here a forced command) belong to A alone: they must neither
    reach the JWT login nor stand in for a proof of A."""
    import secrets
    import subprocess
    import time

    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.support import require_tool

    user = make_user("mko")
    key = client_key(tmp_path)
    install_key(user, key, options='command="echo forced-by-key-A"')
    signer = ed25519.Ed25519PrivateKey.generate()
    jwk = {**__import__("json").loads(pyjwt.get_algorithm_by_name("EdDSA").to_jwk(signer.public_key())),
           "kid": "k1", "alg": "EdDSA", "use": "sig"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    config = {
        "authorized_keys": True,
        "jwt": {"issuer": "https://iss.test", "audience": "peer-1", "jwks_file": str(tmp_path / "jwks.json"),
                "user_claim": "email"},
        "access": [{"sources": ["127.0.0.1/32"], "identities": [key.identity, "bob@example.com"],
                    "local_users": [user.pw_name]}],
    }
    offered_only = tmp_path / "offered"
    offered_only.mkdir()
    (offered_only / "id_a.pub").write_text(key.public + "\n")  # the public half only
    with ServerKit(tmp_path / "srv", config) as srv:
        now = int(time.time())
        token = pyjwt.encode({"iss": "https://iss.test", "aud": "peer-1", "sub": "b", "email": "bob@example.com",
                              "iat": now, "nbf": now, "exp": now + 60, "jti": secrets.token_hex(8)},
                             signer, algorithm="EdDSA", headers={"kid": "k1"})
        (tmp_path / "token").write_text(token)
        askpass = tmp_path / "askpass.sh"
        askpass.write_text(f'#!/bin/sh\nexec cat {tmp_path / "token"}\n')
        askpass.chmod(0o700)
        argv = [require_tool("ssh"), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                "-o", f"IdentityFile={offered_only / 'id_a.pub'}",
                "-o", "PreferredAuthentications=publickey,password", "-o", "NumberOfPasswordPrompts=1",
                "-o", "BatchMode=no", "-v", "-p", str(srv.port), f"{user.pw_name}@127.0.0.1", "id -un"]
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0",
               "SSH_AUTH_SOCK": ""}
        r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        err = r.stderr.decode(errors="replace")
        assert "Server accepts key" in err, err[-3000:]  # A was offered and would have been taken
        assert r.returncode == 0, err[-3000:]
        assert r.stdout.decode().strip() == user.pw_name, (r.stdout, err[-2000:])
        accepted = events(srv, "auth.accepted")
        assert accepted[-1]["method"] == "jwt" and accepted[-1]["identity"] == "bob@example.com"


def test_cert_authority_line_is_skipped_and_says_so(tmp_path: Path,
                                                   setup: tuple[Any, ClientKey, dict[str, Any]]) -> None:
    """A real `ssh-keygen -s` certificate: refused, and the log names the cert-authority
    line as unsupported (it used to be listed as enforced and refused as `unknown-key`)."""
    import subprocess

    from tests.support import require_tool

    user, key, config = setup
    ca = client_key(tmp_path, "id_ca")
    subprocess.run([require_tool("ssh-keygen"), "-q", "-s", str(ca.path), "-I", "test", "-n", user.pw_name,
                    "-V", "-5m:+1h", str(key.path) + ".pub"], check=True, capture_output=True)
    ak = install_key(user, key)
    ak.write_text(f"cert-authority {ca.public}\n")
    with ServerKit(tmp_path / "srv", config) as srv:
        r = srv.ssh(user.pw_name, key, "true", opts=["-o", f"CertificateFile={key.path}-cert.pub"])
        assert r.returncode == 255
        skipped = events(srv, "authorized-keys.entries-skipped")
        assert skipped and skipped[0]["skipped"] == ["line 1: option cert-authority is not supported by meshsshd"]
