"""Limits, algorithms and policy of `meshsshd serve`, from the outside.

ssh-audit, a connection flood that must not lock a real user out, MaxAuthTries,
per-source penalties, login grace, MaxSessions, root login, disable_auth and live
revocation through a config reload.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time

import asyncssh
import pytest

from tests.support import require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

PQ_WARNING = "does not provide protection against post-quantum attacks"


@pytest.fixture
def keyed(tmp_path, make_user):
    """A user with an installed client key and a rule letting that key in."""
    require_root()
    key = client_key(tmp_path)
    user = make_user("msl")
    install_key(user, key)
    rule = {"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}
    return user, key, rule


def test_ssh_audit_reports_no_failures_or_warnings(tmp_path, keyed):
    audit = require_tool("ssh-audit")
    user, key, rule = keyed
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}) as srv:
        r = subprocess.run([audit, "-n", "-p", str(srv.port), "127.0.0.1"], capture_output=True, text=True, timeout=120)
        srv.reload(strict_algorithms=True)
        time.sleep(0.5)
        strict = subprocess.run([audit, "-n", "-p", str(srv.port), "127.0.0.1"], capture_output=True, text=True,
                                timeout=120).stdout
    out = r.stdout
    assert r.returncode in (0, 2), out   # 2 = warnings only; which ones is checked below
    assert "[fail]" not in out, out
    warnings = [line for line in out.splitlines() if "[warn]" in line]
    # Encrypt-and-MAC is noted for the two SHA-2 MACs libssh2 < 1.11 needs, as for stock sshd.
    assert all(PQ_WARNING in w or re.match(r"\(mac\) hmac-sha2-(256|512) +-- \[warn\] using encrypt-and-MAC", w)
               for w in warnings), warnings
    assert re.findall(r"^\(mac\) (\S+)", out, re.M)[-2:] == ["hmac-sha2-256", "hmac-sha2-512"]
    assert "[fail]" not in strict and "encrypt-and-MAC" not in strict, strict
    assert all(m.endswith("-etm@openssh.com") for m in re.findall(r"^\(mac\) (\S+)", strict, re.M)), strict
    assert "mlkem768x25519-sha256" in out
    assert "kex-strict-s-v00@openssh.com" in out
    kex = re.findall(r"^\(kex\) (\S+)", out, re.M)
    assert kex.index("curve25519-sha256") <= 1
    hostkey_algs = re.findall(r"^\(key\) (\S+)", out, re.M)
    assert sorted(hostkey_algs) == ["rsa-sha2-256", "rsa-sha2-512", "ssh-ed25519"]
    assert "(gen) compression: disabled" in out


def test_flood_of_unauthenticated_connections_does_not_lock_out_a_login(tmp_path, keyed):
    user, key, rule = keyed
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}, log_level="warning") as srv:
        flood = []
        try:
            for _ in range(400):
                s = socket.socket()
                s.settimeout(5)
                s.connect(("127.0.0.1", srv.port))
                flood.append(s)
            time.sleep(1.2)   # the flood is now "stalled" (no userauth) and evictable
            t0 = time.monotonic()
            r = srv.ssh(user.pw_name, key, "echo in", timeout=30)
            elapsed = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"in\n"
            assert elapsed < 2.0, f"login took {elapsed:.2f}s under the flood"
            # The server did not keep 400 pre-auth connections: most were dropped.
            time.sleep(0.3)
            closed = 0
            for s in flood:
                s.setblocking(False)
                try:
                    data = s.recv(4096)
                    while data and not data.endswith(b"\n"):
                        data = s.recv(4096)
                    if data == b"" or s.recv(4096) == b"":
                        closed += 1
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            assert closed >= 250, closed
        finally:
            for s in flood:
                s.close()


def test_too_many_auth_failures_disconnects(tmp_path, keyed):
    user, key, rule = keyed
    wrong = [client_key(tmp_path, f"wrong{i}") for i in range(7)]
    limits = {"max_auth_tries": 3, "penalty_failures": 1000}
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule], "limits": limits}) as srv:
        argv = srv.ssh_argv(user.pw_name, None, "true", opts=["-o", "IdentitiesOnly=yes", "-v"])
        for k in wrong:
            argv[1:1] = ["-i", str(k.path)]
        r = subprocess.run(argv, capture_output=True, timeout=30)
        assert r.returncode == 255
        err = r.stderr.decode()
        assert "too many authentication failures" in err.lower(), err[-3000:]
        assert err.count("Offering public key") == 3 or "Received disconnect" in err
        assert '"auth.too-many-tries"' in srv.output()


def test_repeated_failures_penalize_the_source(tmp_path, keyed):
    user, key, rule = keyed
    stranger = client_key(tmp_path, "stranger")
    limits = {"penalty_failures": 2, "penalty_seconds": 60.0}
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule], "limits": limits}) as srv:
        assert srv.ssh(user.pw_name, stranger, "true").returncode == 255
        assert srv.ssh(user.pw_name, stranger, "true").returncode == 255
        # Even the right key is now turned away at the door for a while.
        r = srv.ssh(user.pw_name, key, "true")
        assert r.returncode == 255
        assert b"Permission denied" not in r.stderr
        assert '"source.penalized"' in srv.output()


def test_login_grace_closes_idle_connections(tmp_path, keyed):
    user, key, rule = keyed
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule], "limits": {"login_grace": 1.0}}) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            t0 = time.monotonic()
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert time.monotonic() - t0 < 8
            assert data.startswith(b"SSH-2.0-meshsshd_0.1")


async def _open_sessions(port: int, user: str, count: int) -> tuple[int, str]:
    async with asyncssh.connect("127.0.0.1", port, username=user, known_hosts=None, client_keys=None,
                                agent_path=None, password=None) as conn:
        opened = []
        try:
            for _ in range(count):
                chan, _session = await conn.create_session(asyncssh.SSHClientSession, "sleep 30")
                opened.append(chan)
        except asyncssh.ChannelOpenError as exc:
            return len(opened), exc.reason
        finally:
            for chan in opened:
                chan.close()
        return len(opened), ""


def test_max_sessions_per_connection(tmp_path, make_user):
    require_root()
    user = make_user("msl")
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": ["*"]}
    with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [rule]}) as srv:
        opened, reason = asyncio.run(_open_sessions(srv.port, user.pw_name, 11))
    assert opened == 10
    assert reason


def test_root_login_needs_flag_and_rule(tmp_path, make_user):
    require_root()
    rule = {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": ["*", "root"]}
    with ServerKit(tmp_path / "off", {"disable_auth": True, "access": [rule]}) as srv:
        r = srv.ssh("root", None, "id -u", opts=["-o", "LogLevel=INFO"])
        assert r.returncode == 255
        assert b"root login is disabled" in r.stderr
    with ServerKit(tmp_path / "on", {"disable_auth": True, "root_login": True, "access": [rule]}) as srv:
        r = srv.ssh("root", None, "id -u")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"0\n"
        # `*` never means root: with root allowed but not named, root is refused.
        srv.reload(access=[{**rule, "local_users": ["*"]}])
        time.sleep(0.5)
        assert srv.ssh("root", None, "true").returncode == 255


def test_disable_auth_identity_is_the_source_peer(tmp_path, make_user):
    require_root()
    user = make_user("msl")
    allow = {"sources": ["127.0.0.0/8"], "identities": ["peer:127.0.0.1"], "local_users": [user.pw_name]}
    with ServerKit(tmp_path / "srv", {"disable_auth": True, "access": [allow]}) as srv:
        r = srv.ssh(user.pw_name, None, "whoami")
        assert r.stdout.decode().strip() == user.pw_name
        assert '"identity":"peer:127.0.0.1"' in srv.output()
        # Access rules still apply: another user is not mapped.
        r = srv.ssh("nobody", None, "true")
        assert r.returncode == 255


def test_reload_revokes_live_sessions_no_longer_allowed(tmp_path, keyed):
    user, key, rule = keyed
    with ServerKit(tmp_path / "srv", {"authorized_keys": True, "access": [rule]}) as srv:
        proc = subprocess.Popen(srv.ssh_argv(user.pw_name, key, "echo started; sleep 60"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline() == b"started\n"
        srv.reload(access=[{**rule, "local_users": ["someone-else"]}])
        t0 = time.monotonic()
        rc = proc.wait(15)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read().decode()
        assert rc == 255 or rc != 0
        assert "access revoked" in err, err
        assert elapsed < 3
        assert '"audit.session.revoked"' in srv.output()
        # New logins are refused with the reason in the banner.
        r = srv.ssh(user.pw_name, key, "true", opts=["-o", "LogLevel=INFO"])
        assert r.returncode == 255
        assert b"you may not log in as" in r.stderr


def test_jwt_marker_and_keyboard_interactive_bridge(tmp_path, make_user):
    """With [jwt] on, the identification string carries the marker, and a token typed at
    a keyboard-interactive "Password:" prompt logs in just like the password method."""
    import json
    import secrets

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ed25519

    require_root()
    user = make_user("msj")
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = {**json.loads(jwt.get_algorithm_by_name("EdDSA").to_jwk(key.public_key())), "kid": "k1", "alg": "EdDSA"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    config = {
        "jwt": {"issuer": "https://iss.test", "audience": ["peer-1"], "jwks_file": str(tmp_path / "jwks.json"),
                "user_claim": "email"},
        "access": [{"sources": ["127.0.0.0/8"], "identities": ["bob@example.com"], "local_users": [user.pw_name]}],
    }

    def token() -> str:
        now = int(time.time())
        claims = {"iss": "https://iss.test", "aud": "peer-1", "sub": "u2", "email": "bob@example.com",
                  "iat": now, "nbf": now, "exp": now + 60, "jti": secrets.token_hex(8)}
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "k1"})

    async def login(method: str) -> str:
        async with asyncssh.connect("127.0.0.1", srv.port, username=user.pw_name, known_hosts=None,
                                    client_keys=None, agent_path=None, password=token(),
                                    preferred_auth=method) as conn:
            result = await conn.run("id -un", check=True)
            return result.stdout

    with ServerKit(tmp_path / "srv", config) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            assert s.recv(256).split(b"\r\n")[0] == b"SSH-2.0-meshsshd_0.1 meshsshd-jwt"
        assert asyncio.run(login("keyboard-interactive")).strip() == user.pw_name
        assert asyncio.run(login("password")).strip() == user.pw_name
        assert srv.output().count('"method":"jwt"') >= 2
        assert "eyJ" not in srv.output()   # the token is never logged


def test_metrics_listen_works_in_serve_mode(tmp_path, keyed):
    """README lists `metrics_listen` for `meshsshd serve`; it used to be read and ignored."""
    import urllib.request

    from tests.support import free_port, wait_for_port

    user, key, rule = keyed
    port = free_port()
    config = {"authorized_keys": True, "access": [rule], "metrics_listen": f"127.0.0.1:{port}"}
    with ServerKit(tmp_path / "srv", config) as srv:
        wait_for_port("127.0.0.1", port)
        r = srv.ssh(user.pw_name, key, "true")
        assert r.returncode == 0, r.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = resp.read().decode()
        assert re.search(r"^meshsshd_ssh_serving 1$", text, re.M), text
        assert re.search(r'^meshsshd_auth_successes_total\{method="publickey"\} [1-9]', text, re.M), text
        started = re.search(r"^meshsshd_sessions_started_total (\d+)", text, re.M)
        assert started and int(started.group(1)) >= 1, text   # audit events reach the counters


def test_a_sighup_while_starting_is_a_reload_not_a_kill(tmp_path, keyed):
    """A HUP that races the start (a config tool reloading at once) used to meet the
    default action and end the daemon; now it is a reload once the server runs."""
    import os
    import signal

    from tests.integration.serverkit import to_toml
    from tests.support import console_script, free_port, wait_for_port

    user, key, rule = keyed
    port = free_port()
    cfg = tmp_path / "meshsshd.toml"
    cfg.write_text(to_toml({"listen": [f"127.0.0.1:{port}"], "state_dir": str(tmp_path / "state"),
                            "authorized_keys": True, "access": [rule]}))
    log = tmp_path / "serve.log"
    with open(log, "w") as out_file:
        proc = subprocess.Popen([console_script("meshsshd"), "serve", "--config", str(cfg)],
                                stdout=out_file, stderr=subprocess.STDOUT, text=True)
    try:
        # The moment the daemon catches HUP (its first act in `serve`, before the server's
        # imports and start): before it, no program can help the default action.
        deadline = time.monotonic() + 30
        while not catches(proc.pid, signal.SIGHUP) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        while '"event":"config.reloaded"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)   # the HUP was not lost either: the reload follows the start
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = log.read_text()
    assert proc.returncode == 0, out[-2000:]
    assert '"event":"config.reloaded"' in out, out[-2000:]


def catches(pid: int, sig: int) -> bool:
    """Has process `pid` a handler for `sig` (SigCgt in /proc/PID/status)?"""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask & (1 << (sig - 1)))
