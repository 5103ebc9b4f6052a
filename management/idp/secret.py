"""The key-encryption secret: 32 random bytes in `DATA_DIR/issuer.secret`, mode 0600.

With it the issuer's private keys are sealed in the database (`sealing.py`), so a
database dump, a backup or a PostgreSQL replica alone does not give away the signing
keys. Every replica needs the same file; how it is created and when it is refused is
`management/private_file.py`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path

from ..private_file import create_private, read_private

SECRET_FILE = "issuer.secret"
SECRET_BYTES = 32


class KeySecretError(Exception):
    """The secret is missing, unsafe, unreadable or wrong; the message says which and why."""


def create_key_secret(path: Path) -> bytes:
    """Write a new secret to `path` (which must not exist); the raw 32 bytes."""
    value = secrets.token_bytes(SECRET_BYTES)
    create_private(path, base64.urlsafe_b64encode(value).decode())
    return value


def read_key_secret(path: Path) -> bytes | None:
    """The secret in `path`, or None when there is no such file."""
    text = read_private(path, "issuer key secret", KeySecretError)
    if text is None:
        return None
    try:
        value = base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        value = b""
    if len(value) != SECRET_BYTES:
        raise KeySecretError(f"{path} is not an issuer key secret ({SECRET_BYTES} bytes, base64)")
    return value


def load_or_create_key_secret(path: Path) -> bytes:
    """The secret in `path`, created first when missing (`meshmgmt init`)."""
    existing = read_key_secret(path)
    if existing is not None:
        return existing
    try:
        return create_key_secret(path)
    except FileExistsError:  # created meanwhile by someone else: theirs wins
        value = read_key_secret(path)
        assert value is not None
        return value
