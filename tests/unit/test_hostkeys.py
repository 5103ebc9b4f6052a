"""Host keys: created once with mode 0600, reused, refused when others can read them."""

from __future__ import annotations

import asyncssh
import pytest

from meshsshd import hostkeys
from meshsshd.errors import StateError


def test_created_once_and_reused(tmp_path):
    state = tmp_path / "state"
    first = hostkeys.load_or_create(state)
    assert [p.name for p in first.paths] == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    for p in first.paths:
        assert p.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    rsa = asyncssh.import_public_key(first.public_lines[1])
    assert rsa.algorithm == b"ssh-rsa" and "3072" in str(rsa.pyca_key.key_size)
    again = hostkeys.load_or_create(state)
    assert again.public_lines == first.public_lines


def test_world_readable_key_is_refused(tmp_path):
    keys = hostkeys.load_or_create(tmp_path)
    keys.paths[0].chmod(0o644)
    with pytest.raises(StateError, match="readable by others"):
        hostkeys.load_or_create(tmp_path)


def test_system_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(hostkeys, "SYSTEM_DIR", tmp_path)
    with pytest.raises(StateError, match="no keys"):
        hostkeys.load_or_create(tmp_path / "unused", use_system=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(tmp_path / "ssh_host_ed25519_key"))
    (tmp_path / "ssh_host_ed25519_key").chmod(0o600)
    loaded = hostkeys.load_or_create(tmp_path / "unused", use_system=True)
    assert loaded.public_lines == [key.export_public_key().decode().strip()]
    assert not (tmp_path / "unused").exists()
