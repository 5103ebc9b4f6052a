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
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import ManagementError

BOX_KEY_FILE = "peer-box.key"


class BoxKeyError(ManagementError):
    """The key file is unsafe or unreadable; the message says which and why."""

    status = 500
    code = "box_key_unusable"


def _create(path: Path) -> None:
    text = base64.b64encode(X25519PrivateKey.generate().private_bytes_raw()).decode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return  # another process made it first; read that one
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def load_or_create_box_key(data_dir: Path) -> X25519PrivateKey:
    path = Path(data_dir) / BOX_KEY_FILE
    try:
        if not path.exists():
            _create(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o077:
                raise BoxKeyError(f"{path} is readable by others; chmod 600 it")
            text = f.read().strip()
    except OSError as exc:
        raise BoxKeyError(f"cannot read the peer box key {path}: {exc.strerror}") from exc
    try:
        return X25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise BoxKeyError(f"{path} does not hold an X25519 key (base64 of 32 bytes)") from None


__all__ = ["BOX_KEY_FILE", "BoxKeyError", "load_or_create_box_key"]
