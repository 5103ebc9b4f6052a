"""Issue 11 item 2: nobody takes over a peer by re-registering its WireGuard public key.

The exact attack, with a real `meshmgmt serve` and real `meshsshd up` peers: register a
laptop with a laptops setup key, read server-1's WireGuard public key from the laptop's
network map, and register again with that key (as the old protocol allowed, and with a
proof made with the attacker's own key). Management refuses both; server-1 keeps its
identity, host key and groups, and keeps serving across a restart of its daemon (which
reconnects with its credential: before the fix that credential had been replaced and the
daemon exited with "credential-deleted").
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import prove

from .meshkit import Mesh

pytestmark = pytest.mark.timeout(180)


def post(url: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """An unauthenticated POST as the attacker's own script would send it."""
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def attacker_host_key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path).start()
    try:
        yield m
    finally:
        m.stop()


def test_registering_with_a_stolen_public_key_is_refused_and_the_peer_keeps_serving(mesh: Mesh) -> None:
    mesh.add_user("alice@example.com", "alice-password-123")
    mesh.add_group("laptops", users=["alice@example.com"])
    mesh.add_group("servers")
    mesh.add_ssh_policy("laptops-to-servers", ["laptops"], ["servers"])
    server_key, laptop_key = mesh.setup_key("servers"), mesh.setup_key("laptops")
    mesh.add_peer("server-1", server_key, "--allow-server-ssh", wait="")
    mesh.add_peer("laptop", laptop_key, wait="")
    server = mesh.wait_status("server-1", "serving")  # SSH on once a source peer exists
    before = mesh.api("GET", f"/api/peers/{server['peer_id']}")

    # The laptop's holder reads server-1's WireGuard public key from the laptop's map.
    doc: dict[str, Any] = {}
    for _ in range(100):
        doc = json.loads((mesh.peer_dirs["laptop"] / "netmap.json").read_text())
        if any(p["name"] == "server-1" for p in doc["peers"]):
            break
        time.sleep(0.1)
    stolen = next(p["wg_public_key"] for p in doc["peers"] if p["name"] == "server-1")
    assert stolen == before["wg_public_key"]

    body = {"setup_key": laptop_key, "wg_public_key": stolen, "ssh_host_key": attacker_host_key(),
            "hostname": "server-1", "flags": {"allow_server_ssh": True}, "version": "evil",
            "endpoints": ["127.0.0.1:1"]}
    # As the old protocol took it: the public key and a setup key.
    status, answer = post(mesh.url + "/api/peers/register", body)
    assert status == 400 and answer["error"] == "proof_required", answer
    # With a real challenge, answered with the attacker's own private key.
    status, challenge = post(mesh.url + "/api/peers/challenge", {"wg_public_key": stolen})
    assert status == 200, challenge
    status, answer = post(mesh.url + "/api/peers/register", prove(body, X25519PrivateKey.generate(), challenge))
    assert status == 401 and answer["error"] == "invalid_proof", answer
    assert "credential" not in answer

    after = mesh.api("GET", f"/api/peers/{server['peer_id']}")
    for field in ("ssh_host_key", "groups", "endpoints", "version", "hostname", "wg_public_key"):
        assert after[field] == before[field], field
    # server-1 reconnects with its own credential (a restart of its daemon) and serves on.
    assert mesh.status("server-1")["state"] == "serving"
    mesh.stop_peer("server-1")
    mesh.add_peer("server-1", server_key, "--allow-server-ssh")
    deadline = time.monotonic() + 30
    while not mesh.wait_status("server-1", "serving")["management"].get("connected"):
        assert time.monotonic() < deadline, mesh.status("server-1")
        time.sleep(0.1)
    assert mesh.status("server-1")["peer_id"] == server["peer_id"]
