"""SSH host keys: created once in the state directory (mode 0600) and reused.

An ed25519 key is what clients prefer; an RSA-3072 key (signing with rsa-sha2 only)
keeps older clients working. With `use_system_host_keys` the OpenSSH keys in /etc/ssh are
served instead, so a peer keeps the identity its users already trust.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from .errors import StateError
from .logs import event

log = logging.getLogger("meshsshd.hostkeys")

KEY_TYPES: tuple[tuple[str, str, dict], ...] = (
    ("ed25519", "ssh-ed25519", {}),
    ("rsa", "ssh-rsa", {"key_size": 3072}),
)
SYSTEM_DIR = Path("/etc/ssh")


@dataclass(frozen=True)
class HostKeys:
    keys: tuple[asyncssh.SSHKey, ...]
    paths: tuple[Path, ...]

    @property
    def public_lines(self) -> list[str]:
        """OpenSSH one-line public keys, as published in the network map."""
        return [k.export_public_key("openssh").decode().strip() for k in self.keys]


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the first byte (no chmod race)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_checked(path: Path) -> asyncssh.SSHKey:
    st = path.stat()
    if st.st_mode & 0o077:
        raise StateError(f"host key {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        return asyncssh.read_private_key(str(path))
    except (asyncssh.KeyImportError, OSError) as exc:
        raise StateError(f"host key {path} cannot be read: {exc}") from exc


def load_or_create(state_dir: Path, use_system: bool = False) -> HostKeys:
    """Blocking (disk, key generation): call through an executor from async code."""
    if use_system:
        paths = tuple(SYSTEM_DIR / f"ssh_host_{name}_key" for name, _, _ in KEY_TYPES)
        present = tuple(p for p in paths if p.exists())
        if not present:
            raise StateError(f"use_system_host_keys is set but no keys exist in {SYSTEM_DIR}")
        return HostKeys(tuple(_load_checked(p) for p in present), present)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
    keys, paths = [], []
    for name, alg, kwargs in KEY_TYPES:
        path = state_dir / f"ssh_host_{name}_key"
        if path.exists():
            key = _load_checked(path)
        else:
            key = asyncssh.generate_private_key(alg, **kwargs)
            _write_private(path, key.export_private_key("openssh"))
            event(log, "hostkey.created", path=str(path), fingerprint=key.get_fingerprint("sha256"))
        keys.append(key)
        paths.append(path)
    return HostKeys(tuple(keys), tuple(paths))
