"""The key-encryption secret: 32 random bytes in `DATA_DIR/issuer.secret`, mode 0600.

With it the issuer's private keys are sealed in the database (`sealing.py`), so a
database dump, a backup or a PostgreSQL replica alone does not give away the signing
keys. Every replica needs the same file. The file is created with O_EXCL (never
overwritten: a new secret would orphan every key sealed with the old one) and refused
when it is a symlink, not a regular file, owned by someone else, or readable or writable
by group or others, the way OpenSSH treats private key files.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

SECRET_FILE = "issuer.secret"
SECRET_BYTES = 32


class KeySecretError(Exception):
    """The secret is missing, unsafe, unreadable or wrong; the message says which and why."""


def create_key_secret(path: Path) -> bytes:
    """Write a new secret to `path` (which must not exist); the raw 32 bytes."""
    value = secrets.token_bytes(SECRET_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.urlsafe_b64encode(value).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value


def read_key_secret(path: Path) -> bytes | None:
    """The secret in `path`, or None when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeySecretError(f"cannot open the issuer key secret {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # of what was opened, so a swap after a stat() cannot fool it
        if not stat.S_ISREG(st.st_mode):
            raise KeySecretError(f"{path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise KeySecretError(f"{path} belongs to uid {st.st_uid}, not to the user meshmgmt runs as")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeySecretError(f"{path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                 f"chmod 600 it")
        text = f.read(256)
    try:
        value = base64.urlsafe_b64decode(text.strip())
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
