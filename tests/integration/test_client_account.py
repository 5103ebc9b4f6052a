"""A person's account from the command line, against a real mesh (`meshmgmt serve`, two
`meshsshd up` peers, device-flow logins approved on the HTML page):

- `meshssh passwd` and `meshmgmt users set-password`: the old password stops signing in,
  the new one works, every refresh token of the user is refused (with the reason), a
  wrong current password or a too-short new one changes nothing, and the terminal
  never echoes a password;
- a blocked user is told the account is blocked (not a token-theft alarm), and after
  `unblock` why the old login ended; each refusal names `meshssh login` once.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.management.mgmtkit import admin_cli
from tests.integration.meshkit import Mesh
from tests.integration.serverkit import read_until
from tests.support import console_script, require_root

pytestmark = [pytest.mark.root]

PASSWORD = "first-password-1"
NEW_PASSWORD = "second-password-2"
SIGNED_OUT = b"password changed; your other logins were signed out, log in again with `meshssh login`"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_root()
    mesh = Mesh(tmp_path_factory.mktemp("account")).start()
    try:
        for group in ("people", "laptops", "servers"):
            mesh.add_group(group)
        mesh.add_ssh_policy("people-ssh", ["people", "laptops"], ["servers"])
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait="")
        mesh.add_peer("db-1", mesh.setup_key("servers"), "--allow-server-ssh")
        yield mesh
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()


def _person(mesh: Mesh, name: str) -> str:
    email = f"{name}@example.com"
    mesh.add_user(email, PASSWORD)
    group = next(g for g in mesh.api("GET", "/api/groups")["groups"] if g["name"] == "people")
    mesh.api("PUT", f"/api/groups/{group['id']}", {"users": [*group["users"], email]})
    return email


def _meshmgmt(mesh: Mesh, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return admin_cli(mesh.url, mesh.token_file, *args, input=input, check=check)


def _signs_in(mesh: Mesh, email: str, password: str) -> bool:
    """Whether the verification page takes `password` (for a device code of its own).
    A wrong password, here or in `meshssh passwd`, makes the page wait before the next
    try (one throttle): waited out here, and a failure is checked last."""
    req = urllib.request.Request(f"{mesh.url}/oauth/device/code", method="POST",
                                 data=urllib.parse.urlencode({"client_id": "meshssh", "scope": "openid"}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        code = json.loads(resp.read())["user_code"]
    for _ in range(5):
        try:
            page = mesh.approve(code, email, password)
        except urllib.error.HTTPError as exc:  # a wrong password is a 401 page, a wait a 429
            page = exc.read().decode()
        wait = re.search(r"Try again in (\d+) s", page)
        if wait is None:
            break
        time.sleep(int(wait.group(1)))
    assert "approved" in page.lower() or "wrong email or password" in page.lower(), page
    return "approved" in page.lower()


def _refresh_token(cfg: Path) -> str:
    return json.loads((cfg / "login.json").read_text())["refresh_token"]


def _refresh_refused(mesh: Mesh, token: str) -> str:
    """The error_description of presenting `token` to the token endpoint (it must fail)."""
    req = urllib.request.Request(f"{mesh.url}/oauth/token", method="POST", data=urllib.parse.urlencode(
        {"grant_type": "refresh_token", "client_id": "meshssh", "refresh_token": token}).encode())
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read())
        assert doc["error"] == "invalid_grant", doc
        return doc["error_description"]
    raise AssertionError("the refresh token still works")


def _peers_after_refresh(mesh: Mesh, cfg: Path) -> subprocess.CompletedProcess:
    """`meshssh peers` with the cached access token gone, so the stored login is refreshed."""
    (cfg / "access.json").unlink(missing_ok=True)
    return mesh.meshssh(cfg, "peers")


def _events(mesh: Mesh, etype: str) -> list[dict]:
    return mesh.api("GET", f"/api/events?type={etype}")["events"]


def test_passwd_changes_the_password_and_signs_every_login_out(mesh: Mesh, tmp_path: Path) -> None:
    email = _person(mesh, "erin")
    here = mesh.login(email, PASSWORD, tmp_path / "laptop")
    other = mesh.login(email, PASSWORD, tmp_path / "desktop")
    old_tokens = [_refresh_token(here), _refresh_token(other)]

    r = mesh.meshssh(here, "passwd", "--password-stdin", input=f"{PASSWORD}\n{NEW_PASSWORD}\n".encode())
    assert r.returncode == 0, r.stderr
    assert SIGNED_OUT in r.stderr
    assert not (here / "login.json").exists(), "this client's own login must be gone too"

    for token in old_tokens:
        assert _refresh_refused(mesh, token).startswith("this login was signed out when your password was changed")
    r = _peers_after_refresh(mesh, other)
    assert r.returncode == 1
    assert b"signed out when your password was changed" in r.stderr, r.stderr
    assert r.stderr.count(b"meshssh login") == 1, r.stderr
    again = mesh.login(email, NEW_PASSWORD, tmp_path / "laptop")
    assert mesh.meshssh(again, "peers").returncode == 0
    assert not _signs_in(mesh, email, PASSWORD)  # last: a failure makes the page wait
    changed = [e for e in _events(mesh, "user.password_changed") if e.get("email") == email]
    assert changed and changed[-1]["actor"] == email and changed[-1]["logins_signed_out"] == 2, changed


@pytest.mark.parametrize(("current", "new", "says"), [
    pytest.param("not-the-password", NEW_PASSWORD, b"the current password is wrong; nothing was changed",
                 id="wrong-current"),
    pytest.param(PASSWORD, "short", b"'new_password' must have at least 8 characters", id="too-short"),
])
def test_passwd_refused_changes_nothing(mesh: Mesh, tmp_path: Path, current: str, new: str, says: bytes) -> None:
    email = _person(mesh, f"fay-{new}")
    cfg = mesh.login(email, PASSWORD, tmp_path / "cfg")
    r = mesh.meshssh(cfg, "passwd", "--password-stdin", input=f"{current}\n{new}\n".encode())
    assert r.returncode == 1
    assert says in r.stderr, r.stderr
    assert _peers_after_refresh(mesh, cfg).returncode == 0, "the login must survive a refused change"
    assert _signs_in(mesh, email, PASSWORD)


def test_passwd_asks_on_the_terminal_without_echo(mesh: Mesh, tmp_path: Path) -> None:
    email = _person(mesh, "gil")
    cfg = mesh.login(email, PASSWORD, tmp_path / "cfg")
    r = mesh.meshssh(cfg, "passwd", input=b"")  # stdin is a pipe, not a terminal
    assert r.returncode == 1 and b"no terminal" in r.stderr and b"--password-stdin" in r.stderr, r.stderr

    master, slave = pty.openpty()
    proc = subprocess.Popen([console_script("meshssh"), "passwd"], stdin=slave, stdout=slave, stderr=slave,
                            env=mesh.client_env(cfg), start_new_session=True)
    os.close(slave)
    try:
        seen = b""
        for prompt, answer in ((rb"Current password: ", PASSWORD), (rb"New password: ", NEW_PASSWORD),
                               (rb"Retype new password: ", NEW_PASSWORD)):
            match, seen = read_until(master, prompt, buf=seen)
            seen = seen[match.end():]
            os.write(master, answer.encode() + b"\n")
        _, rest = read_until(master, rb"log in again", buf=seen)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert PASSWORD.encode() not in rest and NEW_PASSWORD.encode() not in rest, rest
    assert _signs_in(mesh, email, NEW_PASSWORD)


def test_admin_set_password_signs_the_user_out(mesh: Mesh, tmp_path: Path) -> None:
    email = _person(mesh, "hal")
    cfg = mesh.login(email, PASSWORD, tmp_path / "cfg")
    token = _refresh_token(cfg)
    r = _meshmgmt(mesh, "users", "set-password", email, "--password-stdin", input="short\n", check=False)
    assert r.returncode == 1 and "must have at least 8 characters" in r.stderr, r.stderr
    assert _signs_in(mesh, email, PASSWORD), "a refused reset changes nothing"

    r = _meshmgmt(mesh, "users", "set-password", email, "--password-stdin", input=f"{NEW_PASSWORD}\n")
    assert f"password of {email} set; their logins were signed out" in r.stdout, r.stdout
    assert _refresh_refused(mesh, token).startswith(
        "this login was signed out when an administrator set a new password for your account")
    r = _peers_after_refresh(mesh, cfg)
    assert r.returncode == 1 and b"an administrator set a new password" in r.stderr, r.stderr
    assert r.stderr.count(b"meshssh login") == 1, r.stderr
    assert _signs_in(mesh, email, NEW_PASSWORD)
    assert not _signs_in(mesh, email, PASSWORD)
    reset = [e for e in _events(mesh, "user.password_reset") if e.get("email") == email]
    assert reset and reset[-1]["actor"] == "admin-token" and reset[-1]["logins_signed_out"] == 1, reset


def test_blocked_user_is_told_so_and_after_unblock_why_the_login_ended(mesh: Mesh, tmp_path: Path) -> None:
    email = _person(mesh, "ivy")
    cfg = mesh.login(email, PASSWORD, tmp_path / "cfg")
    _meshmgmt(mesh, "users", "block", email)

    blocked = b"your account is blocked by an administrator"
    r = mesh.meshssh(cfg, "nobody@db-1", "true")  # the exchange, on the cached access token
    assert r.returncode == 255 and blocked in r.stderr, r.stderr
    for _ in range(2):  # the refresh, and every later one: still the block, never a theft alarm
        r = _peers_after_refresh(mesh, cfg)
        assert r.returncode == 1 and blocked in r.stderr, r.stderr
        assert b"already used" not in r.stderr and b"reused" not in r.stderr, r.stderr
        assert r.stderr.count(b"meshssh login") == 1, r.stderr

    _meshmgmt(mesh, "users", "unblock", email)
    r = _peers_after_refresh(mesh, cfg)
    assert r.returncode == 1
    assert b"this login was signed out when an administrator blocked your account" in r.stderr, r.stderr
    assert r.stderr.count(b"meshssh login") == 1, r.stderr
    assert mesh.meshssh(mesh.login(email, PASSWORD, cfg), "peers").returncode == 0
    # Both are in the audit log, with who did it.
    for etype, logins in (("user.blocked", 1), ("user.unblocked", 0)):
        mine = [e for e in _events(mesh, etype) if e.get("email") == email]
        assert mine and mine[-1]["actor"] == "admin-token" and mine[-1]["logins_signed_out"] == logins, mine
