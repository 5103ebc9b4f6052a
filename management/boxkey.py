"""Management's long-term X25519 key, against which peers prove their WireGuard key.

Kept as a file of mode 0600 in the data directory (`peer-box.key`), never in the database:
whoever holds it could answer registration challenges for any peer's public key, so a
database dump alone must not give it away. Replicas (PostgreSQL) need the same file:
copy it from the first replica's data directory before starting the others. Each
challenge records the public key it was issued under, so a replica with another key says
so instead of failing every proof in silence. Read once when the app is built.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import ManagementError
from .private_file import load_or_create_private

BOX_KEY_FILE = "peer-box.key"


class BoxKeyError(ManagementError):
    """The key file is unsafe or unreadable; the message says which and why."""

    status = 500
    code = "box_key_unusable"


def _new_key_text() -> str:
    return base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()


def load_or_create_box_key(data_dir: Path) -> X25519PrivateKey:
    path = Path(data_dir) / BOX_KEY_FILE
    text = load_or_create_private(path, _new_key_text, "peer box key", BoxKeyError)
    try:
        return X25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise BoxKeyError(f"{path} does not hold an X25519 key (base64 of 32 bytes)") from None


__all__ = ["BOX_KEY_FILE", "BoxKeyError", "load_or_create_box_key"]
