"""Clients other than OpenSSH against `meshsshd serve`: dropbear's dbclient (a guessed
first key-exchange packet), Debian 12's curl/libssh2 (no -etm MACs) with and without
`strict_algorithms`, and SHA-1 user-auth signatures, which are refused."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from tests.support import require_tool

from .serverkit import ClientKey, ServerKit, install_key
from .test_server_limits import keyed  # noqa: F401  (a pytest fixture: a user, its key, a rule)

pytestmark = [pytest.mark.openssh, pytest.mark.root]


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


def test_libssh2_curl_fetches_over_sftp_unless_strict_algorithms(tmp_path, keyed):
    """Debian 12's libssh2 1.10 knows no -etm MAC: it needs hmac-sha2-256/512, which
    `strict_algorithms = true` drops again (reloadable)."""
    user, key, rule = keyed
    target = f"{user.pw_dir}/hello.txt"
    subprocess.run(["runuser", "-u", user.pw_name, "--", "sh", "-c", f"echo over-sftp > {target}"], check=True)
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "sftp": True, "access": [rule]}) as srv:
        r = srv.curl_sftp(user.pw_name, key, target)
        assert (r.returncode, r.stdout) == (0, b"over-sftp\n"), r.stderr
        srv.reload(strict_algorithms=True)
        for _ in range(50):   # the reload lands within a few hundred ms
            r = srv.curl_sftp(user.pw_name, key, target)
            if r.returncode != 0:
                break
        assert r.returncode != 0 and r.stdout == b"", r.stdout
        deadline = time.monotonic() + 10   # curl can be gone before the peer writes its line
        while not (failed := _events(srv, "handshake.failed")) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert failed and "libssh2" in failed[-1]["client_version"], failed
    assert set(failed[-1]["unmatched"]) == {"mac_cs", "mac_sc"}, failed
    assert "hmac-sha2-256" in failed[-1]["unmatched"]["mac_cs"], failed


def _events(srv: ServerKit, name: str) -> list[dict]:
    return [e for e in map(json.loads, srv.output().splitlines()) if e.get("event") == name]


def test_failed_handshakes_are_logged_with_version_and_reason(tmp_path, keyed):
    """No common key exchange (info) and a hang-up during key exchange (debug) each leave
    one line naming the client and why; a finished handshake leaves none."""
    user, key, rule = keyed
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}, log_level="debug") as srv:
        r = srv.ssh(user.pw_name, key, "true", opts=["-o", "KexAlgorithms=diffie-hellman-group14-sha256"])
        assert r.returncode == 255
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"SSH-2.0-HangsUp_1.0\r\n")
            s.recv(4096)   # the server's version and KEXINIT
        assert srv.ssh(user.pw_name, key, "true").returncode == 0
        for _ in range(50):   # the hang-up is noticed asynchronously
            failed = _events(srv, "handshake.failed")
            if len(failed) >= 2:
                break
            time.sleep(0.1)
    # The ServerKit's readiness probe sends no version at all: logged, without one.
    by_client = {e["client_version"].split("-", 2)[2].split("_")[0]: e for e in failed if e["client_version"]}
    assert sorted(by_client) == ["HangsUp", "OpenSSH"], failed
    openssh, hangs_up = by_client["OpenSSH"], by_client["HangsUp"]
    assert openssh["level"] == "info", openssh
    # Only the key exchange had nothing in common, and the client's offer is named.
    assert list(openssh["unmatched"]) == ["kex"], openssh
    assert openssh["unmatched"]["kex"].startswith("diffie-hellman-group14-sha256,"), openssh
    assert hangs_up["level"] == "debug" and hangs_up["source"] == "127.0.0.1", hangs_up
    assert hangs_up["unmatched"] is None, hangs_up


def _key_of(path: Path) -> ClientKey:
    public = Path(f"{path}.pub").read_text().strip()
    return ClientKey(path, public, asyncssh.import_public_key(public).get_fingerprint("sha256"))


def _asyncssh_login(port: int, user: str, key_path: Path, sig_alg: str) -> str:
    """Log in with asyncssh signing with `sig_alg`; the command's output, or the failure."""
    async def main() -> str:
        try:
            async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=[str(key_path)],
                                        known_hosts=None, signature_algs=[sig_alg], agent_path=None,
                                        login_timeout=20) as conn:
                return (await conn.run("echo in", check=False)).stdout
        except asyncssh.PermissionDenied:
            return "denied"
    return asyncio.run(main())


def test_sha1_user_auth_signatures_are_refused_and_sha2_ones_work(tmp_path, keyed):
    """An RSA key logs in with rsa-sha2-512/256, never with ssh-rsa (SHA-1); a DSA key never."""
    user, ed_key, rule = keyed
    rsa_path = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", str(rsa_path)], check=True)
    dsa_path = tmp_path / "id_dsa"
    dsa = asyncssh.generate_private_key("ssh-dss")
    dsa.write_private_key(str(dsa_path))
    dsa.write_public_key(f"{dsa_path}.pub")
    keys = [_key_of(rsa_path), _key_of(dsa_path)]
    install_key(user, *keys)
    rule = {**rule, "identities": [k.identity for k in keys]}
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}) as srv:
        rsa = keys[0]
        sha1 = srv.ssh(user.pw_name, rsa, "echo in", opts=["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"])
        sha2 = srv.ssh(user.pw_name, rsa, "echo in", opts=["-o", "PubkeyAcceptedAlgorithms=rsa-sha2-256"])
        assert (sha2.returncode, sha2.stdout) == (0, b"in\n"), sha2.stderr
        assert sha1.returncode == 255 and sha1.stdout == b"", sha1.stderr
        assert _asyncssh_login(srv.port, user.pw_name, rsa_path, "rsa-sha2-512") == "in\n"
        assert _asyncssh_login(srv.port, user.pw_name, rsa_path, "ssh-rsa") == "denied"
        assert _asyncssh_login(srv.port, user.pw_name, dsa_path, "ssh-dss") == "denied"
        refused = [json.loads(line) for line in srv.output().splitlines() if "auth.signature-refused" in line]
    # OpenSSH 9.2 does not even send ssh-rsa (it is not in server-sig-algs); asyncssh does.
    assert sorted(e["algorithm"] for e in refused) == ["ssh-dss", "ssh-rsa"], refused
