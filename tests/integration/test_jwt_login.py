"""JWT logins against the real `meshsshd serve`, driven by an asyncssh client.

One server for the module ([jwt] with a jwks_file written here, one access rule for a
throwaway user). Each bad token is refused with its own reason, visible to the client in
the auth banner and in the server log; the server stays up and a good token still works.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.integration.serverkit import ServerKit
from tests.support import require_tool

pytestmark = pytest.mark.root

ISSUER = "https://issuer.meshsshd.test"
AUDIENCE = "peer-jwt-test"


class Keys:
    def __init__(self) -> None:
        self.main = ed25519.Ed25519PrivateKey.generate()
        self.rotated = ec.generate_private_key(ec.SECP256R1())
        self.attacker = ed25519.Ed25519PrivateKey.generate()

    @staticmethod
    def jwk(key: Any, alg: str, kid: str) -> dict[str, Any]:
        jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key()))
        return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, session_user: Any, keys: Keys) -> Iterator[ServerKit]:
    tmp = tmp_path_factory.mktemp("jwt-login")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [Keys.jwk(keys.main, "EdDSA", "main")]}))
    config = {
        "jwt": {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_file": str(jwks_file), "user_claim": "email"},
        # Many refusals from 127.0.0.1 are the point of this module; do not penalise the source.
        "limits": {"penalty_failures": 10_000},
        "access": [{"sources": ["127.0.0.0/8"], "identities": ["alice@example.com", "carol@example.com"],
                    "local_users": [session_user.pw_name]}],
    }
    with ServerKit(tmp, config) as srv:
        yield srv


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-1", "email": "alice@example.com",
                         "iat": now, "nbf": now, "exp": now + 60, "jti": secrets.token_hex(12)}
    for k, v in over.items():
        if v is None:
            c.pop(k)
        else:
            c[k] = v
    return c


def sign(key: Any, c: dict[str, Any], alg: str = "EdDSA", kid: str = "main") -> str:
    return jwt.encode(c, key, algorithm=alg, headers={"kid": kid})


def sign_text(key: Any, payload: str) -> str:
    """A correctly signed token whose payload is exactly `payload` (JSON as an attacker
    writes it: `1e309`, `NaN`, which json.dumps would not spell that way)."""
    return jwt.PyJWS().encode(payload.encode(), key, algorithm="EdDSA", headers={"kid": "main"})


def claims_text(name: str, literal: str) -> str:
    text = json.dumps(claims(**{name: 0}))
    return text.replace(f'"{name}": 0', f'"{name}": {literal}')


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _BannerClient(asyncssh.SSHClient):
    def __init__(self, banners: list[str]) -> None:
        self.banners = banners

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banners.append(msg)


async def login(srv: ServerKit, user: str, token: str) -> tuple[str | None, str]:
    """(output of `id -un` or None if refused, the banner text the client saw)."""
    banners: list[str] = []
    try:
        async with asyncssh.connect(
            srv.host, srv.port, username=user, password=token, known_hosts=None,
            client_factory=lambda: _BannerClient(banners), preferred_auth=["password"],
            client_keys=None, agent_path=None, connect_timeout=15,
        ) as conn:
            result = await asyncio.wait_for(conn.run("id -un", check=True), 30)
            out = result.stdout
            return (out.decode() if isinstance(out, bytes) else str(out)).strip(), "".join(banners)
    except asyncssh.PermissionDenied:
        return None, "".join(banners)


def refusals(srv: ServerKit) -> list[dict[str, Any]]:
    out = []
    for line in srv.output().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "auth.refused":
            out.append(doc)
    return out


def _hs256_with_public_key(keys: Keys) -> str:
    pem = keys.main.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "kid": "main"}).encode())
    body = b64(json.dumps(claims()).encode())
    return f"{head}.{body}.{b64(hmac.new(pem, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


def _alg_none(keys: Keys) -> str:
    return f"{b64(json.dumps({'alg': 'none', 'kid': 'main'}).encode())}.{b64(json.dumps(claims()).encode())}."


BAD_TOKENS = [
    pytest.param(lambda k: sign(k.attacker, claims()), "bad-signature", "signature is invalid", id="forged"),
    pytest.param(_alg_none, "alg-not-allowed", "algorithm none", id="alg-none"),
    pytest.param(_hs256_with_public_key, "alg-not-allowed", "algorithm HS256", id="hs256-public-key"),
    pytest.param(lambda k: sign(k.main, claims(iss="https://evil.test")), "wrong-issuer", "from issuer",
                 id="wrong-issuer"),
    pytest.param(lambda k: sign(k.main, claims(aud="peer-other")), "wrong-audience", "token is for another peer",
                 id="wrong-audience"),
    pytest.param(lambda k: sign(k.main, claims(exp=int(time.time()) - 100, iat=int(time.time()) - 200,
                                               nbf=int(time.time()) - 200)),
                 "expired", "token expired", id="expired"),
    pytest.param(lambda k: sign(k.main, claims(nbf=int(time.time()) + 300)), "not-yet-valid",
                 "is not valid for another", id="nbf-future"),
    pytest.param(lambda k: sign(k.main, claims(iat=int(time.time()) + 300, nbf=int(time.time()) + 300,
                                               exp=int(time.time()) + 360)),
                 "issued-in-future", "this peer's clock is behind the issuer's", id="peer-clock-behind"),
    pytest.param(lambda k: sign(k.main, claims(iat=int(time.time()) - 300, nbf=int(time.time()) - 300,
                                               exp=int(time.time()) - 240)),
                 "expired", "this peer's clock is about 300 s ahead", id="peer-clock-ahead"),
    pytest.param(lambda k: sign(k.main, claims(iat=int(time.time()) - 1000, nbf=int(time.time()) - 1000)),
                 "too-old", "was issued", id="too-old"),
    pytest.param(lambda k: sign(k.main, claims(), kid="nobody-knows"), "unknown-kid", "unknown key id nobody-knows",
                 id="unknown-kid"),
    pytest.param(lambda k: sign(k.main, claims(jti=None)), "missing-claim", "lacks the `jti` claim",
                 id="missing-jti"),
    pytest.param(lambda k: sign(k.main, claims(pad="x" * 20_000)), "too-large", "larger than 16384",
                 id="too-large"),
    pytest.param(lambda k: "hunter2", "malformed", "not a token", id="plain-password"),
    # Time claims that are not whole finite seconds: NaN never expired, 1e309 crashed.
    *(pytest.param(lambda k, n=name, v=literal: sign_text(k.main, claims_text(n, v)), "malformed",
                   f"token claim `{name}` must be", id=f"{name}-{literal}")
      for name in ("exp", "iat", "nbf") for literal in ("NaN", "Infinity", "1e309", "1.5e9", "true")),
    pytest.param(lambda k: jwt.encode(claims(), k.main, algorithm="EdDSA",
                                      headers={"kid": "main", "crit": ["urn:x"], "urn:x": 1}),
                 "unsupported-crit", "does not implement", id="crit"),
    pytest.param(lambda k: sign(k.main, claims(email="bob@example.com")), "identity", "may not log in",
                 id="identity-not-in-rules"),
    pytest.param(lambda k: sign(k.main, claims(local_users=["someone-else"])), "token-users",
                 "your token does not allow", id="token-local-users"),
]


@pytest.mark.parametrize("make_token, reason, words", BAD_TOKENS)
async def test_bad_token_refused_with_reason(server: ServerKit, session_user: Any, keys: Keys,
                                             make_token: Any, reason: str, words: str) -> None:
    token = make_token(keys)
    before = len([r for r in refusals(server) if r.get("reason") == reason])
    out, banner = await login(server, session_user.pw_name, token)
    assert out is None
    assert words in banner, banner
    after = [r for r in refusals(server) if r.get("reason") == reason]
    assert len(after) == before + 1
    assert after[-1]["user"] == session_user.pw_name
    assert token not in server.output()
    # The server is still up and the next good login works.
    out, _ = await login(server, session_user.pw_name, sign(keys.main, claims()))
    assert out == session_user.pw_name


async def test_good_token_logs_in_once(server: ServerKit, session_user: Any, keys: Keys) -> None:
    token = sign(keys.main, claims(local_users=[session_user.pw_name]))
    out, banner = await login(server, session_user.pw_name, token)
    assert out == session_user.pw_name
    assert banner == ""
    out, banner = await login(server, session_user.pw_name, token)
    assert out is None
    assert "already used" in banner
    assert refusals(server)[-1]["reason"] == "replayed"


def own_server_config(tmp_path: Path, keys: Keys) -> tuple[Path, dict[str, Any]]:
    """A JWKS file with the main key, and a config for a server of the test's own."""
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [Keys.jwk(keys.main, "EdDSA", "main")]}))
    return jwks_file, {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file), "user_claim": "email"},
        "access": [{"sources": ["127.0.0.1/32"], "identities": ["*"], "local_users": ["localpart", "*"]}],
    }


async def test_key_rotation_in_the_jwks_file(tmp_path: Path, session_user: Any, keys: Keys) -> None:
    """A new kid appears in the file: the first token signed with it makes the server reload.
    (Its own server, so the unknown-kid cooldown of the shared one does not interfere.)"""
    jwks_file, config = own_server_config(tmp_path, keys)
    with ServerKit(tmp_path, config) as srv:
        out, banner = await login(srv, session_user.pw_name, sign(keys.main, claims()))
        assert out == session_user.pw_name, banner
        jwks_file.write_text(json.dumps({"keys": [Keys.jwk(keys.main, "EdDSA", "main"),
                                                  Keys.jwk(keys.rotated, "ES256", "rotated")]}))
        token = sign(keys.rotated, claims(email="carol@example.com"), alg="ES256", kid="rotated")
        out, banner = await login(srv, session_user.pw_name, token)
        assert out == session_user.pw_name, banner
        accepted = [json.loads(line) for line in srv.output().splitlines() if '"auth.accepted"' in line]
        assert [a["identity"] for a in accepted] == ["alice@example.com", "carol@example.com"]
        loaded = [json.loads(line) for line in srv.output().splitlines() if '"jwks.loaded"' in line]
        assert [d["kids"] for d in loaded] == [["main"], ["main", "rotated"]]


async def test_a_token_used_before_a_restart_is_not_accepted_after_it(tmp_path: Path, session_user: Any,
                                                                   keys: Keys) -> None:
    """The replay cache survives a restart (meshsshd/replay_log.py): a token used before
    is still refused after it, while one fetched before and not used yet still works
    (a client may hold it through a management outage)."""
    jwks_file, config = own_server_config(tmp_path, keys)
    with ServerKit(tmp_path, config) as srv:
        used, unused = sign(keys.main, claims()), sign(keys.main, claims())
        out, banner = await login(srv, session_user.pw_name, used)
        assert out == session_user.pw_name, banner
        srv.stop()
        log_file = srv.state_dir / "jti-replay.log"
        assert log_file.stat().st_mode & 0o777 == 0o600
        await asyncio.sleep(1.1)  # iat has whole seconds
        srv.start()
        out, banner = await login(srv, session_user.pw_name, used)
        assert out is None and "already used" in banner, banner
        assert refusals(srv)[-1]["reason"] == "replayed"
        out, banner = await login(srv, session_user.pw_name, unused)
        assert out == session_user.pw_name, banner
        # Without a readable log the server cannot know: older tokens are refused.
        srv.stop()
        log_file.rename(log_file.with_suffix(".bak"))
        log_file.mkdir()  # not a file: unreadable as a log
        older = sign(keys.main, claims())
        await asyncio.sleep(1.1)
        srv.start()
        out, banner = await login(srv, session_user.pw_name, older)
        assert out is None and "issued before this peer's SSH server started" in banner, banner
        out, banner = await login(srv, session_user.pw_name, sign(keys.main, claims()))
        assert out == session_user.pw_name, banner


async def test_a_jwks_file_others_may_write_is_not_read(tmp_path: Path, session_user: Any, keys: Keys) -> None:
    """The same rotation, but the file became writable by others: whoever could write it
    could add their own key, so the reload refuses it and the new kid stays unknown."""
    jwks_file, config = own_server_config(tmp_path, keys)
    with ServerKit(tmp_path, config) as srv:
        jwks_file.write_text(json.dumps({"keys": [Keys.jwk(keys.main, "EdDSA", "main"),
                                                  Keys.jwk(keys.attacker, "EdDSA", "planted")]}))
        jwks_file.chmod(0o666)
        token = sign(keys.attacker, claims(email="carol@example.com"), kid="planted")
        out, banner = await login(srv, session_user.pw_name, token)
        assert out is None, banner
        failed = [json.loads(line) for line in srv.output().splitlines() if '"jwks.load-failed"' in line]
        assert failed and "is writable by others (mode 666)" in failed[-1]["why"], srv.output()[-3000:]


@pytest.mark.parametrize("jwt_table, message", [
    pytest.param({"jwks_url": "http://keys.example.com/jwks.json"},
                 "jwt.jwks_url: http://keys.example.com/jwks.json is plain http to keys.example.com: use https",
                 id="plain-http"),
    pytest.param({"jwks_url": "ftp://keys.example.com/jwks.json"}, "is not an https URL", id="other-scheme"),
    pytest.param({"jwks_file": "jwks.json", "mode": 0o646}, "jwt.jwks_file: ", id="file-writable-by-others"),
    # `leeway = nan` is valid TOML and made every expiry check pass.
    pytest.param({"jwks_url": "https://keys.example.com/jwks.json", "leeway": float("nan")},
                 "key `jwt.leeway`: expected `float` >= 0.0", id="leeway-nan"),
    pytest.param({"jwks_url": "https://keys.example.com/jwks.json", "max_token_age": -1},
                 "key `jwt.max_token_age`: expected `float` >= 0.0", id="max-token-age-negative"),
])
def test_serve_refuses_an_untrustworthy_key_source(tmp_path: Path, jwt_table: dict[str, Any], message: str) -> None:
    """`meshsshd serve` stops at start with the key named, instead of trusting the source."""
    table = dict(jwt_table)
    mode = table.pop("mode", None)
    if mode is not None:
        (tmp_path / "jwks.json").write_text('{"keys": []}')
        (tmp_path / "jwks.json").chmod(mode)
    from tests.integration.serverkit import to_toml
    from tests.support import console_script

    cfg = tmp_path / "meshsshd.toml"
    cfg.write_text(to_toml({"listen": ["127.0.0.1:0"], "state_dir": str(tmp_path / "state"),
                            "jwt": {"issuer": ISSUER, "audience": AUDIENCE, **table}}))
    r = subprocess.run([console_script("meshsshd"), "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout, r.stderr + r.stdout


async def test_a_reload_with_a_non_finite_leeway_keeps_the_old_settings(tmp_path: Path, session_user: Any,
                                                                       keys: Keys) -> None:
    """SIGHUP with `leeway = nan` is refused with the key named, and the running server
    keeps its leeway: a token that expired a year ago still does not log in."""
    _, config = own_server_config(tmp_path, keys)
    with ServerKit(tmp_path, config) as srv:
        srv.reload(jwt={**config["jwt"], "leeway": float("nan")})
        deadline = time.monotonic() + 15
        while "config.reload_failed" not in srv.output() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        failed = [json.loads(line) for line in srv.output().splitlines() if "config.reload_failed" in line]
        assert len(failed) == 1, srv.output()   # one JSON line, like every other daemon line
        assert failed[0]["error"] == f"{srv.config_path}: key `jwt.leeway`: expected `float` >= 0.0"
        assert failed[0]["effect"] == "the old settings stay in force"
        year = 365 * 86400
        now = int(time.time())
        old = sign(keys.main, claims(iat=now - year, nbf=now - year, exp=now - year + 60))
        out, banner = await login(srv, session_user.pw_name, old)
        assert out is None and "token expired" in banner, banner
        out, banner = await login(srv, session_user.pw_name, sign(keys.main, claims()))
        assert out == session_user.pw_name, banner


def _openssh_with_token(srv: ServerKit, user: str, token: str, tmp: Path) -> subprocess.CompletedProcess:
    """Native `ssh`, the token typed by SSH_ASKPASS, banners shown (default LogLevel)."""
    token_file = tmp / f"token-{secrets.token_hex(4)}"
    token_file.write_text(token)
    token_file.chmod(0o600)
    askpass = tmp / "askpass.sh"
    askpass.write_text('#!/bin/sh\nexec cat "$MESHSSHD_TEST_TOKEN"\n')
    askpass.chmod(0o700)
    argv = [require_tool("ssh"), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "PreferredAuthentications=password",
            "-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10", "-p", str(srv.port),
            f"{user}@{srv.host}", "id -un"]
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0",
           "MESHSSHD_TEST_TOKEN": str(token_file)}
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


@pytest.mark.openssh
def test_openssh_client_sees_the_reason(server: ServerKit, session_user: Any, keys: Keys, tmp_path: Path) -> None:
    good = sign(keys.main, claims())
    assert len(good) < 1023  # OpenSSH cuts askpass input at 1023 bytes
    r = _openssh_with_token(server, session_user.pw_name, good, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == session_user.pw_name

    now = int(time.time())
    expired = sign(keys.main, claims(exp=now - 300, iat=now - 400, nbf=now - 400))
    r = _openssh_with_token(server, session_user.pw_name, expired, tmp_path)
    assert r.returncode == 255
    assert "meshsshd: token expired" in r.stderr.decode()
    assert "Permission denied" in r.stderr.decode()
