"""authorized_keys: StrictModes on real files owned by a throwaway user, and options."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from meshsshd.authorized_keys import (
    EntrySkipped,
    load_authorized_keys,
    parse_authorized_keys,
    rewrite_entry,
)
from tests.support import require_root

NOW = time.time()


@pytest.fixture(scope="module")
def keys() -> list[asyncssh.SSHKey]:
    return [asyncssh.generate_private_key("ssh-ed25519") for _ in range(3)]


def pub(key: asyncssh.SSHKey, comment: str = "test") -> str:
    return key.export_public_key().decode().strip() + f" {comment}"


def options_for(authorized: asyncssh.SSHAuthorizedKeys, key: asyncssh.SSHKey,
                addr: str = "100.64.0.7") -> dict | None:
    result = authorized.validate(key.convert_to_public(), addr, addr)
    return None if result is None else dict(result)


# --- options (pure) -------------------------------------------------------------------


def test_plain_keys_and_comments(keys: list[asyncssh.SSHKey]) -> None:
    text = f"# my keys\n\n{pub(keys[0])}\n   {pub(keys[1], 'laptop with spaces')}\n"
    parsed = parse_authorized_keys(text, NOW)
    assert parsed.used == 2 and parsed.skipped == ()
    assert options_for(parsed.keys, keys[0]) == {}
    assert options_for(parsed.keys, keys[1]) == {}
    assert options_for(parsed.keys, keys[2]) is None


def test_restrict_expands_to_enforced_options(keys: list[asyncssh.SSHKey]) -> None:
    parsed = parse_authorized_keys(f"restrict {pub(keys[0])}\nrestrict,pty {pub(keys[1])}", NOW)
    assert options_for(parsed.keys, keys[0]) == {
        "no-agent-forwarding": True, "no-port-forwarding": True, "no-pty": True, "no-X11-forwarding": True,
        "restrict": True,   # kept as a marker: such sessions get no client environment
    }
    assert options_for(parsed.keys, keys[1]) == {
        "no-agent-forwarding": True, "no-port-forwarding": True, "no-X11-forwarding": True, "restrict": True,
    }


def test_command_from_and_permitopen_are_kept(keys: list[asyncssh.SSHKey]) -> None:
    line = f'command="echo \\"hi, there\\"",from="100.64.0.0/10",permitopen="db:5432",NO-PTY {pub(keys[0])}'
    parsed = parse_authorized_keys(line, NOW)
    opts = options_for(parsed.keys, keys[0])
    assert opts is not None
    assert opts["command"] == 'echo "hi, there"'
    assert opts["no-pty"] is True
    assert opts["permitopen"] == {("db", 5432)}
    # from= is enforced by asyncssh: another source address does not match the entry.
    assert options_for(parsed.keys, keys[0], addr="192.0.2.1") is None


def test_environment_is_dropped(keys: list[asyncssh.SSHKey]) -> None:
    parsed = parse_authorized_keys(f'environment="LD_PRELOAD=/tmp/x.so" {pub(keys[0])}', NOW)
    assert options_for(parsed.keys, keys[0]) == {}


@pytest.mark.parametrize("options, why", [
    pytest.param('permitlisten="localhost:8080"', "permitlisten", id="permitlisten"),
    pytest.param("verify-required", "verify-required", id="verify-required"),
    pytest.param("cert-authority", "cert-authority", id="cert-authority"),   # was kept, and refused every cert
    pytest.param("no-such-option", "unknown option", id="unknown"),
    pytest.param('expiry-time="20200101"', "expired", id="expired"),
    pytest.param('expiry-time="2020-01-01"', "bad expiry-time", id="bad-expiry"),
    pytest.param('command="unbalanced', "unbalanced", id="unbalanced-quote"),
    pytest.param('permitopen="nonsense"', "not a valid entry", id="bad-permitopen"),
])
def test_skipped_entries_do_not_spoil_the_file(keys: list[asyncssh.SSHKey], options: str, why: str) -> None:
    text = f"{options} {pub(keys[0])}\n{pub(keys[1])}\n"
    parsed = parse_authorized_keys(text, NOW)
    assert parsed.used == 1
    assert len(parsed.skipped) == 1 and parsed.skipped[0][0] == 1 and why in parsed.skipped[0][1]
    assert options_for(parsed.keys, keys[0]) is None
    assert options_for(parsed.keys, keys[1]) == {}


def test_expiry_in_the_future_is_accepted(keys: list[asyncssh.SSHKey]) -> None:
    line = f'expiry-time="20991231Z",no-pty {pub(keys[0])}'
    assert rewrite_entry(line, NOW) == f"no-pty {pub(keys[0])}"
    with pytest.raises(EntrySkipped):
        rewrite_entry(line, 4_102_444_800.0 + 86400 * 365)  # after 2099-12-31


def test_nothing_usable(keys: list[asyncssh.SSHKey]) -> None:
    parsed = parse_authorized_keys("garbage line\nssh-ed25519 notbase64\n", NOW)
    assert parsed.keys is None and parsed.used == 0 and len(parsed.skipped) == 2


# --- StrictModes (real files, real owners) ---------------------------------------------


@pytest.fixture
def user_with_keys(make_user: Callable[..., pwd.struct_passwd],
                   keys: list[asyncssh.SSHKey]) -> pwd.struct_passwd:
    require_root()
    user = make_user("mak")
    home = Path(user.pw_dir)
    os.chmod(home, 0o750)
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    os.chown(ssh, user.pw_uid, user.pw_gid)
    ak = ssh / "authorized_keys"
    ak.write_text(pub(keys[0]) + "\n")
    os.chown(ak, user.pw_uid, user.pw_gid)
    os.chmod(ak, 0o600)
    return user


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


async def test_good_file_is_loaded(user_with_keys: pwd.struct_passwd, keys: list[asyncssh.SSHKey]) -> None:
    loaded = await load_authorized_keys(user_with_keys)
    assert loaded is not None
    assert options_for(loaded, keys[0]) == {}
    assert options_for(loaded, keys[1]) is None


async def test_root_owned_file_is_fine(user_with_keys: pwd.struct_passwd, keys: list[asyncssh.SSHKey]) -> None:
    ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
    os.chown(ak, 0, 0)
    os.chmod(ak, 0o644)
    assert await load_authorized_keys(user_with_keys) is not None


async def test_missing_file_is_none_without_a_warning(user_with_keys: pwd.struct_passwd,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    Path(user_with_keys.pw_dir, ".ssh", "authorized_keys").unlink()
    caplog.set_level(logging.INFO, logger="meshsshd")
    assert await load_authorized_keys(user_with_keys) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _home(u: pwd.struct_passwd) -> Path:
    return Path(u.pw_dir)


STRICT_CASES = [
    pytest.param(lambda u: os.chmod(_home(u) / ".ssh/authorized_keys", 0o620), "group-writable", id="file-group-writable"),
    pytest.param(lambda u: os.chmod(_home(u) / ".ssh/authorized_keys", 0o602), "world-writable", id="file-world-writable"),
    pytest.param(lambda u: os.chown(_home(u) / ".ssh/authorized_keys", _nobody(), -1), "bad ownership", id="file-other-owner"),
    pytest.param(lambda u: os.chmod(_home(u) / ".ssh", 0o770), "group-writable", id="ssh-dir-group-writable"),
    pytest.param(lambda u: os.chmod(_home(u) / ".ssh", 0o777), "world-writable", id="ssh-dir-world-writable"),
    pytest.param(lambda u: os.chown(_home(u) / ".ssh", _nobody(), -1), "bad ownership", id="ssh-dir-other-owner"),
    pytest.param(lambda u: os.chmod(_home(u), 0o775), "group-writable", id="home-group-writable"),
    pytest.param(lambda u: os.chown(_home(u), _nobody(), -1), "bad ownership", id="home-other-owner"),
]


@pytest.mark.parametrize("spoil, why", STRICT_CASES)
async def test_strict_modes_refuse(user_with_keys: pwd.struct_passwd, caplog: pytest.LogCaptureFixture,
                                   spoil: Callable[[pwd.struct_passwd], None], why: str) -> None:
    spoil(user_with_keys)
    caplog.set_level(logging.INFO, logger="meshsshd")
    assert await load_authorized_keys(user_with_keys) is None
    refusals = [r for r in caplog.records if r.getMessage() == "authorized-keys.refused"]
    assert len(refusals) == 1
    assert why in refusals[0].fields["why"]
    assert refusals[0].fields["user"] == user_with_keys.pw_name


async def test_symlink_into_a_world_writable_directory(user_with_keys: pwd.struct_passwd, tmp_path: Path,
                                                       keys: list[asyncssh.SSHKey],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = shared / "keys"
    target.write_text(pub(keys[1]) + "\n")
    os.chown(target, user_with_keys.pw_uid, -1)
    os.chmod(target, 0o600)
    ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
    ak.unlink()
    ak.symlink_to(target)
    caplog.set_level(logging.INFO, logger="meshsshd")
    assert await load_authorized_keys(user_with_keys) is None
    assert "world-writable" in caplog.records[-1].fields["why"]

    # Outside home every directory up to / counts; /tmp itself is world-writable.
    os.chmod(shared, 0o755)
    assert await load_authorized_keys(user_with_keys) is None
    assert "/tmp: drwxrwxrwt is world-writable" in caplog.records[-1].fields["why"]


async def test_symlink_into_a_safe_directory_is_followed(user_with_keys: pwd.struct_passwd,
                                                         keys: list[asyncssh.SSHKey]) -> None:
    safe = Path(tempfile.mkdtemp(prefix="meshsshd-test-", dir="/run"))
    try:
        os.chmod(safe, 0o755)
        target = safe / "keys"
        target.write_text(pub(keys[1]) + "\n")
        os.chmod(target, 0o644)
        ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
        ak.unlink()
        ak.symlink_to(target)
        loaded = await load_authorized_keys(user_with_keys)
        assert loaded is not None and options_for(loaded, keys[1]) == {}
    finally:
        shutil.rmtree(safe)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
async def test_not_a_regular_file(user_with_keys: pwd.struct_passwd, caplog: pytest.LogCaptureFixture,
                                  kind: str) -> None:
    ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
    ak.unlink()
    if kind == "directory":
        ak.mkdir(mode=0o700)
    else:
        os.mkfifo(ak, 0o600)  # must not hang the reader
    os.chown(ak, user_with_keys.pw_uid, user_with_keys.pw_gid)
    caplog.set_level(logging.INFO, logger="meshsshd")
    assert await load_authorized_keys(user_with_keys) is None
    assert "not a regular file" in caplog.records[-1].fields["why"]


async def test_too_large(user_with_keys: pwd.struct_passwd, keys: list[asyncssh.SSHKey],
                         caplog: pytest.LogCaptureFixture) -> None:
    ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
    ak.write_text(("# padding " + "x" * 100 + "\n") * 11000 + pub(keys[0]) + "\n")
    caplog.set_level(logging.INFO, logger="meshsshd")
    assert await load_authorized_keys(user_with_keys) is None
    assert "larger than" in caplog.records[-1].fields["why"]


async def test_options_and_skips_from_a_real_file(user_with_keys: pwd.struct_passwd, keys: list[asyncssh.SSHKey],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ak = Path(user_with_keys.pw_dir, ".ssh", "authorized_keys")
    ak.write_text(f"restrict {pub(keys[0])}\nbogus-option {pub(keys[1])}\n")
    caplog.set_level(logging.INFO, logger="meshsshd")
    loaded = await load_authorized_keys(user_with_keys)
    assert loaded is not None
    assert options_for(loaded, keys[0])["no-pty"] is True
    assert options_for(loaded, keys[1]) is None
    skipped = [r for r in caplog.records if r.getMessage() == "authorized-keys.entries-skipped"]
    assert skipped and skipped[0].fields["skipped"] == ["line 2: unknown option 'bogus-option'"]
