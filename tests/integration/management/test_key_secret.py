"""The issuer's signing keys at rest, against a real `meshmgmt init` + `serve`.

The attacker here holds a copy of the database and nothing else (no DATA_DIR/issuer.secret):
a stolen backup, a dump, a PostgreSQL replica. They must not be able to mint a token that
the management API or a peer accepts. The peer side is meshsshd's own validator
(`meshsshd.auth.JWTValidator`) fed with the JWKS of the network map the real server
streams to a registered peer.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshsshd.auth import AuthRefused, JWTValidator
from meshsshd.config import JWTSettings
from meshsshd.netmap import NetworkMap
from tests.support import console_script

from .mgmtkit import Mgmt, assert_no_server_errors, call, init_data_dir, peer_auth, register_peer, start_serve

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"


def _copy_database(src: Path, dst: Path) -> None:
    """What a backup holds: a consistent copy of the SQLite file (WAL included)."""
    with sqlite3.connect(src) as live, sqlite3.connect(dst) as copy:
        live.backup(copy)


def _key_rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT kid, alg, private_key_pem FROM idp_signing_keys").fetchall()


def _private_keys_from(blob: str) -> list[Any]:
    """Every way an attacker might read a private key out of a row's text."""
    candidates = [blob.encode()]
    for part in (blob, blob.partition(":")[2]):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                candidates.append(decode(part + "=" * (-len(part) % 4)))
            except (binascii.Error, ValueError):
                pass
    found = []
    for data in candidates:
        for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
            try:
                found.append(load(data, password=None))
            except (ValueError, TypeError):
                pass
        for i in range(max(0, len(data) - 31)):  # a raw Ed25519 seed anywhere in it
            found.append(ed25519.Ed25519PrivateKey.from_private_bytes(data[i:i + 32]))
    return found


def _public_raw(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _build_mesh(http: aiohttp.ClientSession, mgmt: Mgmt) -> dict[str, Any]:
    _, svc = await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, expect=201,
                        json={"email": "ci@example.com", "service": True})
    _, key = await call(http, "POST", mgmt.url + "/api/setup-keys", headers=mgmt.admin, expect=201,
                        json={"reusable": True})
    web = await register_peer(http, mgmt, key["key"], "web-1")
    laptop = await register_peer(http, mgmt, key["key"], "laptop-1", allow_server_ssh=False)
    await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin, expect=201,
               json={"name": "devs", "peers": ["laptop-1"], "users": ["ci@example.com"]})
    await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin, expect=201,
               json={"name": "servers", "peers": ["web-1"]})
    await call(http, "POST", mgmt.url + "/api/policies", headers=mgmt.admin, expect=201, json={
        "name": "ssh", "rules": [{"sources": ["devs"], "destinations": ["servers"], "protocol": "ssh",
                                  "local_users": ["deploy"]}]})
    _, tok = await call(http, "POST", mgmt.url + "/oauth/token", expect=200, data={
        "grant_type": "client_credentials", "client_id": svc["client_id"], "client_secret": svc["client_secret"]})
    async with http.ws_connect(mgmt.url + "/api/peers/sync", headers=peer_auth(web)) as ws:
        netmap = NetworkMap.from_dict((await ws.receive_json(timeout=10))["netmap"])
    assert netmap.ssh.enabled and netmap.ssh.jwks["keys"]
    return {"web": web, "laptop": laptop, "access": tok["access_token"], "netmap": netmap}


def _peer_validator(netmap: NetworkMap) -> JWTValidator:
    """meshsshd's validator, configured from the map exactly as a managed peer is."""
    ssh = netmap.ssh
    return JWTValidator(JWTSettings(issuer=ssh.issuer, audience=ssh.audience or (netmap.peer.id,), jwks=ssh.jwks,
                                    user_claim=ssh.user_claim))


def _forgeries(rows: list[tuple[str, str, str]], published: dict[str, bytes], issuer: str, peer_id: str,
               sub: str) -> dict[str, tuple[str, str]]:
    """(access token, SSH token) pairs signed with whatever a database copy offers: the
    row's text as an HMAC key, a key of one's own under the real kid, and any private key
    read out of the row that matches the published one (none, once keys are sealed)."""
    now = int(time.time())
    access = {"iss": issuer, "aud": "meshmgmt", "sub": sub, "email": "ci@example.com", "role": "admin",
              "client_id": "meshssh", "jti": os.urandom(8).hex(), "iat": now, "nbf": now, "exp": now + 600}
    ssh = {"iss": issuer, "aud": peer_id, "sub": sub, "email": "ci@example.com", "local_users": ["deploy"],
           "iat": now, "nbf": now, "exp": now + 60}
    out: dict[str, tuple[str, str]] = {}
    for kid, _alg, blob in rows:
        def both(key: Any, alg: str, name: str) -> None:
            out[f"{name}-{kid[:8]}"] = (
                jwt.encode(access, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"}),
                jwt.encode({**ssh, "jti": os.urandom(8).hex()}, key, algorithm=alg, headers={"kid": kid}))

        try:  # algorithm confusion with the stored text (PyJWT itself refuses a PEM as HMAC key)
            both(blob.encode(), "HS256", "hmac-with-the-row")
        except jwt.InvalidKeyError:
            pass
        both(ed25519.Ed25519PrivateKey.generate(), "EdDSA", "own-key-with-the-kid")
        for i, key in enumerate(_private_keys_from(blob)):
            if isinstance(key, ed25519.Ed25519PrivateKey) and _public_raw(key) == published.get(kid):
                both(key, "EdDSA", f"read-from-the-row-{i}")
    return out


async def test_a_copy_of_the_database_alone_cannot_mint_tokens(tmp_path: Path) -> None:
    data = tmp_path / "mgmt"
    token = init_data_dir(data)
    secret_file = data / "issuer.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    mgmt = start_serve(data, token)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            mesh = await _build_mesh(http, mgmt)
            stolen = tmp_path / "attacker" / "meshmgmt.db"
            stolen.parent.mkdir()
            _copy_database(data / "meshmgmt.db", stolen)
            assert not (stolen.parent / "issuer.secret").exists()

            # 1. The key rows do not give up a private key, nor the published public key's seed.
            rows = _key_rows(stolen)
            assert rows
            published = {k["kid"]: _b64url_decode(k["x"]) for k in mesh["netmap"].ssh.jwks["keys"]}
            assert "PRIVATE KEY" not in stolen.read_bytes().decode("latin-1")
            for kid, _alg, blob in rows:
                assert kid in published
                assert all(_public_raw(k) != published[kid] for k in _private_keys_from(blob)
                           if isinstance(k, ed25519.Ed25519PrivateKey)), f"{kid}: private key readable from the row"
                assert not [k for k in _private_keys_from(blob) if not isinstance(k, ed25519.Ed25519PrivateKey)]

            # 2. Tokens signed with anything the copy offers are refused by the API and by a peer.
            peer_id = mesh["web"]["peer_id"]
            validator = _peer_validator(mesh["netmap"])
            try:
                # The checks can tell good from bad: real tokens pass both.
                await call(http, "GET", mgmt.url + "/api/me/peers", expect=200,
                           headers={"Authorization": f"Bearer {mesh['access']}"})
                _, ex = await call(http, "POST", mgmt.url + "/oauth/token", expect=200, data={
                    "grant_type": EXCHANGE, "subject_token": mesh["access"], "subject_token_type": AT,
                    "audience": peer_id})
                assert (await validator.validate(ex["access_token"])).value == "ci@example.com"

                with sqlite3.connect(stolen) as conn:  # a real user id, as the copy shows it
                    (sub,) = conn.execute("SELECT id FROM users WHERE email = 'ci@example.com'").fetchone()
                forged = _forgeries(rows, published, mesh["netmap"].ssh.issuer, peer_id, sub)
                assert len(forged) >= 2 * len(rows)
                for name, (access, ssh) in forged.items():
                    status, _ = await call(http, "GET", mgmt.url + "/api/users",
                                           headers={"Authorization": f"Bearer {access}"})
                    assert status == 401, name
                    status, body = await call(http, "POST", mgmt.url + "/oauth/token", data={
                        "grant_type": EXCHANGE, "subject_token": access, "subject_token_type": AT,
                        "audience": peer_id})
                    assert status == 400 and body["error"] == "invalid_request", (name, body)
                    with pytest.raises(AuthRefused) as refused:
                        await validator.validate(ssh)
                    assert refused.value.reason in ("bad-signature", "alg-not-allowed"), name
            finally:
                await validator.close()
    finally:
        mgmt.proc.stop()
    assert_no_server_errors(mgmt)
    log = mgmt.proc.log.read_text()
    assert secret_file.read_text().strip() not in log


def _serve_fails(data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_sealed_keys_without_their_secret(tmp_path: Path) -> None:
    data = tmp_path / "mgmt"
    init_data_dir(data)
    secret = data / "issuer.secret"
    kept = secret.read_bytes()

    secret.unlink()  # a replica whose data dir lacks the file
    res = _serve_fails(data)
    assert res.returncode == 2, res.stderr
    assert "sealed" in res.stderr and "issuer.secret is missing" in res.stderr and "Traceback" not in res.stderr
    assert not secret.exists()  # not silently replaced by a new one

    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)  # another installation's secret
    os.write(fd, base64.urlsafe_b64encode(os.urandom(32)) + b"\n")
    os.close(fd)
    res = _serve_fails(data)
    assert res.returncode == 2 and "does not open signing key" in res.stderr, res.stderr

    secret.write_bytes(kept)
    os.chmod(secret, 0o644)
    res = _serve_fails(data)
    assert res.returncode == 2 and "chmod 600" in res.stderr, res.stderr


async def test_plaintext_keys_of_an_older_version_are_sealed_and_rotated(tmp_path: Path) -> None:
    """A data dir from before the secret existed: keys in the clear, no issuer.secret."""
    data = tmp_path / "mgmt"
    token = init_data_dir(data)
    (data / "issuer.secret").unlink()
    legacy = ed25519.Ed25519PrivateKey.generate()
    pem = legacy.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()
    from meshmgmt.idp.keys import kid_of

    old_kid = kid_of(legacy)
    with sqlite3.connect(data / "meshmgmt.db") as conn:
        conn.execute("DELETE FROM idp_signing_keys")
        conn.execute("INSERT INTO idp_signing_keys (kid, alg, private_key_pem, encrypted, created) "
                     "VALUES (?, 'EdDSA', ?, 0, '2026-11-01 00:00:00.000000')", (old_kid, pem))
    mgmt = start_serve(data, token)
    try:
        assert (data / "issuer.secret").stat().st_mode & 0o777 == 0o600
        rows = {kid: (blob, retired) for kid, blob, retired in sqlite3.connect(data / "meshmgmt.db").execute(
            "SELECT kid, private_key_pem, retired FROM idp_signing_keys")}
        assert len(rows) == 2 and rows[old_kid][1] is not None  # sealed, and no longer the signer
        assert all(blob.startswith("mgk1:") for blob, _ in rows.values())
        listed = json.loads(mgmt.cli("--json", "keys", "list").stdout)["signing_keys"]
        assert [(k["kid"] == old_kid, k["signing"], k["published"]) for k in listed] == [
            (False, True, True), (True, False, True)]
        assert '"event":"idp.key_sealed"' in mgmt.proc.output()
    finally:
        mgmt.proc.stop()
    assert_no_server_errors(mgmt)


async def test_keys_list_and_rotate_from_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "mgmt"
    mgmt = start_serve(data, init_data_dir(data))
    try:
        first = json.loads(mgmt.cli("--json", "keys", "list").stdout)["signing_keys"]
        assert len(first) == 1 and first[0]["signing"] and first[0]["retired"] is None
        assert not {"d", "private_key_pem", "private_key"} & set(first[0])
        rotated = json.loads(mgmt.cli("--json", "keys", "rotate").stdout)["signing_keys"]
        assert [k["signing"] for k in rotated] == [True, False] and rotated[1]["kid"] == first[0]["kid"]
        assert rotated[1]["published"] and rotated[1]["withdrawn_at"]
        async with aiohttp.ClientSession() as http:
            _, jwks = await call(http, "GET", mgmt.url + "/oauth/jwks", expect=200)
        assert [k["kid"] for k in jwks["keys"]] == [k["kid"] for k in rotated]
        dropped = json.loads(mgmt.cli("--json", "keys", "rotate", "--drop-previous").stdout)["signing_keys"]
        assert len(dropped) == 1 and dropped[0]["kid"] not in {k["kid"] for k in rotated}
        table = mgmt.cli("keys", "list").stdout
        assert dropped[0]["kid"] in table
    finally:
        mgmt.proc.stop()
    assert_no_server_errors(mgmt)
    shutil.rmtree(data, ignore_errors=True)
