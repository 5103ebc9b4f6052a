"""Clients other than OpenSSH against `meshsshd serve`: dropbear's dbclient (a guessed
first key-exchange packet), Debian 12's curl/libssh2 (no -etm MACs) with and without
`strict_algorithms`, and SHA-1 user-auth signatures, which are refused."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]


@pytest.fixture
def keyed(tmp_path, make_user):
    """A user with an installed client key and a rule letting that key in."""
    require_root()
    key = client_key(tmp_path)
    user = make_user("mcp")
    install_key(user, key)
    rule = {"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}
    return user, key, rule


def test_dropbear_client_logs_in_and_runs_a_command(tmp_path, keyed):
    """dbclient sends its curve25519 guess after KEXINIT; with ML-KEM first on our side the
    guess is wrong and must be ignored, not answered (it was: "Key exchange not in progress")."""
    dbclient = require_tool("dbclient")
    convert = require_tool("dropbearconvert")
    user, key, rule = keyed
    db_key = tmp_path / "id_dropbear"
    subprocess.run([convert, "openssh", "dropbear", str(key.path), str(db_key)], check=True, capture_output=True)
    env = {**os.environ, "HOME": str(tmp_path)}
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}) as srv:
        r = subprocess.run([dbclient, "-y", "-y", "-T", "-i", str(db_key), "-p", str(srv.port),
                            f"{user.pw_name}@127.0.0.1", "echo in; id -un"],
                           capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    # Only the output: whether dbclient gets the exit status is issue 12's item 10.
    assert r.stdout == f"in\n{user.pw_name}\n".encode(), r.stderr


def _curl_sftp(curl: str, key, user, port: int, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([curl, "-sS", "-k", "--key", str(key.path), "--pubkey", f"{key.path}.pub",
                           f"sftp://{user.pw_name}@127.0.0.1:{port}/{path}"], capture_output=True, timeout=60)


def test_libssh2_curl_fetches_over_sftp_unless_strict_algorithms(tmp_path, keyed):
    """Debian 12's libssh2 1.10 knows no -etm MAC: it needs hmac-sha2-256/512, which
    `strict_algorithms = true` drops again (reloadable)."""
    curl = require_tool("curl")
    user, key, rule = keyed
    target = f"{user.pw_dir}/hello.txt"
    subprocess.run(["runuser", "-u", user.pw_name, "--", "sh", "-c", f"echo over-sftp > {target}"], check=True)
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "sftp": True, "access": [rule]}) as srv:
        r = _curl_sftp(curl, key, user, srv.port, target)
        assert (r.returncode, r.stdout) == (0, b"over-sftp\n"), r.stderr
        srv.reload(strict_algorithms=True)
        for _ in range(50):   # the reload lands within a few hundred ms
            r = _curl_sftp(curl, key, user, srv.port, target)
            if r.returncode != 0:
                break
        assert r.returncode != 0 and r.stdout == b"", r.stdout
