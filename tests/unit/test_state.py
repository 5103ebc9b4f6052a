"""State directory: atomic writes, modes, keys created once, flags merged and persisted."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from meshsshd import state as state_mod
from meshsshd.errors import StateError
from meshsshd.state import Credential, PeerFlags, StateDir, UpConfig, atomic_write, read_json, write_json


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_wireguard_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    sd.ensure()
    priv1, pub1 = sd.wireguard_keypair()
    priv2, pub2 = sd.wireguard_keypair()
    assert (priv1, pub1) == (priv2, pub2)
    assert priv1 != pub1 and len(pub1) == 44
    assert mode(sd.wireguard_key) == 0o600


def test_wireguard_public_key_matches_wg_tool(tmp_path: Path) -> None:
    import subprocess

    from tests.support import require_tool

    wg = require_tool("wg")
    sd = StateDir(tmp_path)
    priv, pub = sd.wireguard_keypair()
    out = subprocess.run([wg, "pubkey"], input=priv + "\n", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == pub


def test_corrupt_wireguard_key_is_a_clear_error(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.wireguard_key.write_text("not a key\n")
    with pytest.raises(StateError, match="does not hold a WireGuard key"):
        sd.wireguard_keypair()


def test_atomic_write_sets_mode_regardless_of_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "pub", b"x", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "pub") == 0o644
    atomic_write(tmp_path / "sec", b"y")
    assert mode(tmp_path / "sec") == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_is_reported_and_old_file_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "netmap.json"
    write_json(target, {"serial": 1})

    def full(fd: int, data: bytes) -> int:  # failure injection: ENOSPC mid-write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_mod.os, "write", full)
    with pytest.raises(StateError, match="disk is full") as info:
        write_json(target, {"serial": 2})
    assert "free some space" in info.value.user_message
    monkeypatch.undo()
    assert read_json(target) == {"serial": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["netmap.json"]


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(StateError, match="x.json is not valid JSON"):
        read_json(tmp_path / "x.json")
    assert read_json(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("persisted", "overrides", "expect_flags", "expect_iface"),
    [
        pytest.param({}, {"flags": {"allow_server_ssh": True}}, {"allow_server_ssh": True}, "mesh0", id="first-run"),
        pytest.param({"flags": {"enable_ssh_sftp": True}, "interface": "wg7"}, {"flags": {"allow_server_ssh": None}},
                     {"enable_ssh_sftp": True}, "wg7", id="restart-without-flags-keeps-them"),
        pytest.param({"flags": {"enable_ssh_sftp": True}}, {"flags": {"enable_ssh_sftp": False}},
                     {}, "mesh0", id="explicit-no-flag-turns-off"),
        pytest.param({"interface": "wg7"}, {"interface": "wg8"}, {}, "wg8", id="cli-wins"),
    ],
)
def test_config_merge(persisted: dict, overrides: dict, expect_flags: dict, expect_iface: str) -> None:
    merged = UpConfig.from_dict(persisted).merged(**overrides)
    assert merged.flags == PeerFlags(**expect_flags)
    assert merged.interface == expect_iface


def test_config_and_credential_round_trip_with_secret_modes(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    cfg = UpConfig(management_url="http://m", endpoints=("192.0.2.1:51820",), flags=PeerFlags(enable_ssh_root=True))
    sd.save_config(cfg)
    assert sd.load_config() == cfg
    cred = Credential(peer_id="p1", credential="s3cret", management_url="http://m", mesh_ip="127.77.0.2")
    sd.save_credential(cred)
    assert sd.load_credential() == cred
    assert mode(sd.credential_path) == 0o600 and mode(sd.flags_path) == 0o600
    write_json(sd.netmap_path, {"serial": 1})
    sd.forget_credential()
    assert sd.load_credential() is None and not sd.netmap_path.exists()


def test_pid_file_only_removed_by_its_owner(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.pid_path.write_text("1\n")
    sd.remove_pid()
    assert sd.read_pid() == 1
    sd.write_pid()
    assert sd.read_pid() == os.getpid() and state_mod.pid_alive(os.getpid())
    sd.remove_pid()
    assert sd.read_pid() is None


def test_stale_pid_of_another_program_is_not_meshsshd(tmp_path: Path) -> None:
    import subprocess

    other = subprocess.Popen(["sleep", "30"])
    try:
        assert state_mod.pid_alive(other.pid)
        assert not state_mod.is_meshsshd(other.pid)
    finally:
        other.kill()
        other.wait()
    assert not state_mod.pid_alive(other.pid)
