"""The registration proof: only the WireGuard private key's holder can make it, and it
covers the challenge, the claimed key and every field of the request."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import ProofError, canonical_body, prove, public_key_b64, verify

MGMT = X25519PrivateKey.generate()
PEER = X25519PrivateKey.generate()


def challenge() -> dict[str, Any]:
    return {"challenge": base64.b64encode(os.urandom(32)).decode(), "management_key": public_key_b64(MGMT)}


def body(**extra: Any) -> dict[str, Any]:
    return {"setup_key": "mk_x", "wg_public_key": public_key_b64(PEER), "hostname": "db-1",
            "ssh_host_key": "ssh-ed25519 AAAA", "flags": {"allow_server_ssh": True}, **extra}


def test_the_holder_of_the_key_proves_it() -> None:
    doc = prove(body(), PEER, challenge())
    verify(MGMT, doc["wg_public_key"], doc["challenge"], doc, doc["proof"])


def test_canonical_body_ignores_order_and_the_proof() -> None:
    a = {"b": 1, "a": [1, "x"], "proof": "p"}
    assert canonical_body(a) == canonical_body({"a": [1, "x"], "b": 1}) == b'{"a":[1,"x"],"b":1}'


@pytest.mark.parametrize("tamper, match", [
    pytest.param(lambda d: {**d, "wg_public_key": public_key_b64(X25519PrivateKey.generate())}, "does not verify",
                 id="another-public-key"),
    pytest.param(lambda d: {**d, "ssh_host_key": "ssh-ed25519 BBBB"}, "another request", id="host-key-swapped"),
    pytest.param(lambda d: {**d, "setup_key": "mk_y"}, "another request", id="setup-key-swapped"),
    pytest.param(lambda d: {**d, "flags": {"allow_server_ssh": False}}, "another request", id="flags-changed"),
    pytest.param(lambda d: {**d, "challenge": challenge()["challenge"]}, "does not verify", id="other-challenge"),
    pytest.param(lambda d: {**d, "proof": d["proof"][:-8] + "AAAAAAA="}, "does not verify", id="tag-broken"),
    pytest.param(lambda d: {**d, "proof": "%%%"}, "not base64", id="proof-garbage"),
    pytest.param(lambda d: {**d, "proof": "AAAA"}, "too short", id="proof-short"),
    pytest.param(lambda d: {**d, "challenge": "AAAA"}, "32 bytes", id="challenge-short"),
])
def test_a_changed_request_or_proof_is_refused(tamper, match: str) -> None:
    doc = tamper(prove(body(), PEER, challenge()))
    with pytest.raises(ProofError, match=match):
        verify(MGMT, doc["wg_public_key"], doc["challenge"], doc, doc["proof"])


def test_a_proof_made_with_another_private_key_for_a_stolen_public_key_fails() -> None:
    attacker = X25519PrivateKey.generate()
    doc = prove(body(), attacker, challenge())  # claims PEER's public key, seals with its own
    with pytest.raises(ProofError, match="does not verify"):
        verify(MGMT, doc["wg_public_key"], doc["challenge"], doc, doc["proof"])


def test_a_proof_for_another_management_key_fails() -> None:
    doc = prove(body(), PEER, {**challenge(), "management_key": public_key_b64(X25519PrivateKey.generate())})
    with pytest.raises(ProofError, match="does not verify"):
        verify(MGMT, doc["wg_public_key"], doc["challenge"], doc, doc["proof"])


def test_a_low_order_public_key_is_refused() -> None:
    zero = base64.b64encode(bytes(32)).decode()
    with pytest.raises(ProofError, match="not usable"):
        verify(MGMT, zero, challenge()["challenge"], body(), "A" * 40)


def test_a_challenge_answer_without_its_fields_is_refused() -> None:
    with pytest.raises(ProofError, match="lacks"):
        prove(body(), PEER, {"challenge": 5})
