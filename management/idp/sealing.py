"""Private signing keys sealed at rest: AES-256-GCM under a key derived from issuer.secret.

The AEAD key is HKDF-SHA256 of the 32-byte secret with a label of its own, so the secret
is never used directly and a future use of the same file gets a different key. Each
sealed blob binds its row (the key id and algorithm) as associated data: copying one
row's blob onto another row, or editing the algorithm column, fails authentication
instead of silently loading the wrong key. A random 96-bit nonce per seal; keys are
sealed a handful of times in their life, far below GCM's limits.

Stored form (text, in `idp_signing_keys.private_key_pem`): "mgk1:" + base64url(nonce ‖
ciphertext ‖ tag), where the plaintext is the PKCS#8 DER of the private key.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "mgk1:"
_LABEL = b"meshmgmt issuer signing-key sealing v1"
_NONCE = 12


class UnsealError(Exception):
    """The blob is not sealed with this secret for this row (or was tampered with)."""


def _aead(secret: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(secret))


def _row_aad(kid: str, alg: str) -> bytes:
    return b"idp_signing_keys\0" + kid.encode() + b"\0" + alg.encode()


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def seal(secret: bytes, plaintext: bytes, *, kid: str, alg: str) -> str:
    nonce = os.urandom(_NONCE)
    blob = nonce + _aead(secret).encrypt(nonce, plaintext, _row_aad(kid, alg))
    return PREFIX + base64.urlsafe_b64encode(blob).decode()


def unseal(secret: bytes, stored: str, *, kid: str, alg: str) -> bytes:
    if not is_sealed(stored):
        raise UnsealError(f"signing key {kid} is not in the sealed format")
    try:
        blob = base64.urlsafe_b64decode(stored[len(PREFIX):])
    except (binascii.Error, ValueError):
        raise UnsealError(f"signing key {kid} is damaged (not base64)") from None
    try:
        return _aead(secret).decrypt(blob[:_NONCE], blob[_NONCE:], _row_aad(kid, alg))
    except (InvalidTag, ValueError):
        raise UnsealError(
            f"issuer.secret does not open signing key {kid}: the secret is not the one that sealed "
            "it (every replica needs the same file) or the row was altered") from None
