"""The key-encryption secret: a file of mode 0600 in the data directory.

With it, the issuer's private keys are stored encrypted in the database, so a database
dump or a PostgreSQL replica alone does not give away the signing keys. Every replica
needs the same file. Read once at startup (before the event loop runs).
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

SECRET_FILE = "issuer.secret"


class KeySecretError(Exception):
    """The secret file is unsafe or unreadable; the message says which and why."""


def load_or_create_key_secret(path: Path, create: bool = True) -> bytes:
    path = Path(path)
    if create and not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n")
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeySecretError(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        value = path.read_text().strip().encode()
    except OSError as exc:
        raise KeySecretError(f"cannot read the issuer key secret {path}: {exc.strerror}") from exc
    if len(value) < 32:
        raise KeySecretError(f"{path} is too short to be an issuer key secret")
    return value
