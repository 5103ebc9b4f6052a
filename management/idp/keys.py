"""Signing keys of the issuer and the key ring that decides which ones are published.

Only asymmetric keys: Ed25519 (JWS alg "EdDSA", the default) or P-256 ("ES256"). The
key ring is pure: it holds every known key with its creation and retirement time, and
answers "which key signs now", "which keys may verify at time t" and "what is the JWKS".
A key that was replaced stays published and accepted for `overlap` seconds, so tokens it
signed, and peers still holding the old JWKS in their network map, keep working while
the new map spreads.

Private keys leave this module only as PKCS#8 DER for `sealing.seal` (the store keeps
them sealed with the issuer secret); never in a JWKS or a log.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

ALGORITHMS = ("EdDSA", "ES256")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk_fields(private_key: PrivateKey) -> dict[str, Any]:
    pub = private_key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return dict(OKPAlgorithm.to_jwk(pub, as_dict=True))
    return dict(ECAlgorithm.to_jwk(pub, as_dict=True))


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), used as the `kid`: stable and collision-free."""
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey
    created_at: float
    retired_at: float | None = None  # when a newer key replaced it as the signer

    def public_jwk(self) -> dict[str, Any]:
        jwk = _public_jwk_fields(self.private_key)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def is_published(self, now: float, overlap: float) -> bool:
        return self.retired_at is None or now < self.retired_at + overlap


def generate_key(now: float, alg: str = "EdDSA") -> SigningKey:
    if alg == "EdDSA":
        private: PrivateKey = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"signing algorithm {alg!r} is not one of {ALGORITHMS}")
    return SigningKey(kid=kid_of(private), alg=alg, private_key=private, created_at=now)


def kid_of(key: PrivateKey) -> str:
    """The `kid` a private key must have (its public key's thumbprint)."""
    return thumbprint(_public_jwk_fields(key))


def private_key_to_der(key: PrivateKey) -> bytes:
    """PKCS#8 DER, unencrypted: only ever handed to `sealing.seal`."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def private_key_from_der(der: bytes) -> PrivateKey:
    return _checked(serialization.load_der_private_key(der, password=None))


def private_key_from_pem(pem: bytes) -> PrivateKey:
    """A key stored in the clear by an older meshmgmt (read once, to seal it)."""
    return _checked(serialization.load_pem_private_key(pem, password=None))


def _checked(key: object) -> PrivateKey:
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("stored signing key is not Ed25519 or EC")
    return key


class KeyRing:
    """All known signing keys; the newest unretired one signs."""

    def __init__(self, keys: Iterable[SigningKey], overlap: float) -> None:
        self.keys: tuple[SigningKey, ...] = tuple(sorted(keys, key=lambda k: k.created_at))
        self.overlap = overlap

    def current(self) -> SigningKey:
        active = [k for k in self.keys if k.retired_at is None]
        if not active:
            raise LookupError("the issuer has no signing key")
        return active[-1]

    def published(self, now: float) -> list[SigningKey]:
        return [k for k in self.keys if k.is_published(now, self.overlap)]

    def jwks(self, now: float) -> dict[str, Any]:
        """Newest first, so a peer that looks at keys[0] finds the signer."""
        return {"keys": [k.public_jwk() for k in reversed(self.published(now))]}

    def verifier(self, kid: str, now: float) -> SigningKey | None:
        for k in self.keys:
            if k.kid == kid and k.is_published(now, self.overlap):
                return k
        return None

    def rotated(self, new: SigningKey, now: float) -> KeyRing:
        """A ring where `new` signs and every older active key is retired at `now`."""
        old = [replace(k, retired_at=now) if k.retired_at is None else k for k in self.keys]
        return KeyRing([*old, new], self.overlap)

    def expired(self, now: float) -> list[SigningKey]:
        """Retired keys past their overlap: safe to delete."""
        return [k for k in self.keys if not k.is_published(now, self.overlap)]
