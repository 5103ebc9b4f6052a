"""A person's account from the command line, against a real mesh (`meshmgmt serve`, two
`meshsshd up` peers, device-flow logins approved on the HTML page):

- a blocked user is told the account is blocked (not a token-theft alarm), and after
  `unblock` why the old login ended; each refusal names `meshssh login` once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.management.mgmtkit import admin_cli
from tests.integration.meshkit import Mesh
from tests.support import require_root

pytestmark = [pytest.mark.root]

PASSWORD = "first-password-1"


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


def _peers_after_refresh(mesh: Mesh, cfg: Path) -> subprocess.CompletedProcess:
    """`meshssh peers` with the cached access token gone, so the stored login is refreshed."""
    (cfg / "access.json").unlink(missing_ok=True)
    return mesh.meshssh(cfg, "peers")


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
