"""Registration proofs across replicas that do not share peer-box.key: a clear refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshmgmt.app import create_app
from meshmgmt.bootstrap import initialise
from meshmgmt.boxkey import BOX_KEY_FILE, BoxKeyError, load_or_create_box_key
from meshmgmt.idp import SECRET_FILE
from meshmgmt.settings import MgmtSettings
from meshmgmt.store import sqlite_url
from meshsshd.peerproof import prove, public_key_b64


async def test_a_replica_with_another_box_key_says_so(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    await initialise(one, "admin@example.com", None, None)
    two.mkdir()
    shutil.copy2(one / SECRET_FILE, two / SECRET_FILE)   # shared, as replicas must: only the box key differs
    database = sqlite_url(one)
    wg = X25519PrivateKey.generate()
    body = {"setup_key": "mk_x", "wg_public_key": public_key_b64(wg), "hostname": "h"}
    async with TestClient(TestServer(create_app(MgmtSettings(data_dir=one, database=database)))) as c1, \
            TestClient(TestServer(create_app(MgmtSettings(data_dir=two, database=database)))) as c2:
        challenge = await (await c1.post("/api/peers/challenge", json={"wg_public_key": body["wg_public_key"]})).json()
        resp = await c2.post("/api/peers/register", json=prove(body, wg, challenge))
        doc = await resp.json()
    assert resp.status == 401 and doc["error"] == "box_key_mismatch" and "peer-box.key" in doc["message"]
    assert (one / BOX_KEY_FILE).stat().st_mode & 0o077 == 0
    assert (one / BOX_KEY_FILE).read_bytes() != (two / BOX_KEY_FILE).read_bytes()


def test_a_box_key_others_can_read_is_refused(tmp_path: Path) -> None:
    key = load_or_create_box_key(tmp_path)
    assert load_or_create_box_key(tmp_path).private_bytes_raw() == key.private_bytes_raw()  # kept, not remade
    (tmp_path / BOX_KEY_FILE).chmod(0o640)
    with pytest.raises(BoxKeyError, match="chmod 600"):
        load_or_create_box_key(tmp_path)
