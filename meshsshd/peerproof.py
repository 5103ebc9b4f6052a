"""Proof that a registering peer holds the private half of its WireGuard key.

A WireGuard key is X25519: it cannot sign, but it can agree on a secret. Management keeps a
long-term X25519 key of its own and hands out single-use challenges; the peer answers with
an AEAD box whose key only the holder of the WireGuard private key (or of management's
private key) can derive:

    shared = X25519(peer_private, management_public)          = X25519(management_private, peer_public)
    key    = HKDF-SHA256(shared, salt=challenge, info=CONTEXT || peer_public || management_public)
    proof  = base64(nonce12 || ChaCha20-Poly1305(key, nonce12, SHA-256(canonical body), aad=CONTEXT || challenge))

The body is the registration request without `proof` (so the setup key, host key, hostname
and flags are bound to this answer: a relay cannot swap them), serialised canonically
(`canonical_body`). Pure functions; management and the peer import them from here.

History of REGISTRATION_VERSION (docs/protocol.md):
    1  no proof: anyone with a setup key and a peer's *public* key could take it over
    2  challenge + proof (this module)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import MeshsshdError

REGISTRATION_VERSION = 2
CONTEXT = b"meshsshd peer registration v2"
CHALLENGE_BYTES = 32
_NONCE_BYTES = 12


class ProofError(MeshsshdError):
    """A proof (or a key in it) is malformed or does not verify; the message says which."""


def canonical_body(doc: dict[str, Any]) -> bytes:
    """The bytes both sides hash: the request without `proof`, sorted keys, no spaces."""
    rest = {k: val for k, val in doc.items() if k != "proof"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _raw(value: str, what: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ProofError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ProofError(f"{what} must be {size} bytes, not {len(raw)}")
    return raw


def public_key_b64(key: X25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


def private_key_from_b64(value: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_raw(value, "the private key", 32))


def _box(own: X25519PrivateKey, other_b64: str, peer_b64: str, mgmt_b64: str,
         challenge: bytes) -> ChaCha20Poly1305:
    other = X25519PublicKey.from_public_bytes(_raw(other_b64, "the public key", 32))
    try:
        shared = own.exchange(other)
    except ValueError:  # a low-order point gives an all-zero secret; cryptography refuses it
        raise ProofError("the public key is not usable for key agreement") from None
    info = CONTEXT + _raw(peer_b64, "wg_public_key", 32) + _raw(mgmt_b64, "management_key", 32)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=challenge, info=info).derive(shared)
    return ChaCha20Poly1305(key)


def seal(peer_private: X25519PrivateKey, management_key: str, challenge: str, body: dict[str, Any]) -> str:
    """The peer's answer to `challenge` for this registration `body` (without `proof`)."""
    nonce = _raw(challenge, "challenge", CHALLENGE_BYTES)
    peer_b64 = public_key_b64(peer_private)
    box = _box(peer_private, management_key, peer_b64, management_key, nonce)
    iv = os.urandom(_NONCE_BYTES)
    sealed = box.encrypt(iv, hashlib.sha256(canonical_body(body)).digest(), CONTEXT + nonce)
    return base64.b64encode(iv + sealed).decode()


def verify(management_private: X25519PrivateKey, peer_public: str, challenge: str,
           body: dict[str, Any], proof: str) -> None:
    """Raise ProofError unless `proof` was sealed with `peer_public`'s private half for
    exactly this challenge and body."""
    nonce = _raw(challenge, "challenge", CHALLENGE_BYTES)
    mgmt_b64 = public_key_b64(management_private)
    box = _box(management_private, peer_public, peer_public, mgmt_b64, nonce)
    try:
        raw = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ProofError("the proof is not base64") from None
    if len(raw) < _NONCE_BYTES + 16:
        raise ProofError("the proof is too short")
    try:
        digest = box.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], CONTEXT + nonce)
    except InvalidTag:
        raise ProofError("the proof does not verify: it was not made with this WireGuard key "
                         "for this challenge and request") from None
    if not hmac.compare_digest(digest, hashlib.sha256(canonical_body(body)).digest()):
        raise ProofError("the proof was made for another request body")


def prove(body: dict[str, Any], peer_private: X25519PrivateKey, challenge_doc: dict[str, Any]) -> dict[str, Any]:
    """`body` with the challenge and its proof added: what POST /api/peers/register takes.

    `challenge_doc` is the answer of POST /api/peers/challenge."""
    challenge, mgmt_key = challenge_doc.get("challenge"), challenge_doc.get("management_key")
    if not isinstance(challenge, str) or not isinstance(mgmt_key, str):
        raise ProofError("the challenge answer lacks 'challenge' or 'management_key'")
    out = {**body, "challenge": challenge}
    out["proof"] = seal(peer_private, mgmt_key, challenge, out)
    return out


__all__ = ["CHALLENGE_BYTES", "CONTEXT", "REGISTRATION_VERSION", "ProofError", "canonical_body",
           "private_key_from_b64", "prove", "public_key_b64", "seal", "verify"]
