"""Account checks without PAM, through the real server, real OS users and OpenSSH `ssh`:
an expired account (shadow expiry) is refused, and while a nologin file exists only root
logs in, each with a clear banner and one log line. The tests point `nologin_files` at a
temporary file (an /etc/nologin would stop every login on the machine); one test checks
the default path, for as short a moment as it can."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_root

from .serverkit import ServerKit

pytestmark = [pytest.mark.openssh, pytest.mark.root]

SHOW_BANNER = ["-o", "LogLevel=INFO"]   # OpenSSH prints the userauth banner from INFO on


def refusals(srv: ServerKit) -> list[dict[str, Any]]:
    return [json.loads(line) for line in srv.output().splitlines() if '"auth.refused"' in line]


def config(*users: str, **extra: Any) -> dict[str, Any]:
    return {"disable_auth": True, "limits": {"penalty_failures": 10_000},
            "access": [{"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": list(users)}], **extra}


def login(srv: ServerKit, user: str) -> subprocess.CompletedProcess:
    return srv.ssh(user, None, "id -un", opts=SHOW_BANNER)


def test_expired_account_is_refused_until_the_date_moves(tmp_path: Path, make_user: Any) -> None:
    require_root()
    user = make_user("mae")
    name = user.pw_name
    with ServerKit(tmp_path / "srv", config(name, nologin_files=[str(tmp_path / "absent")])) as srv:
        assert login(srv, name).stdout == f"{name}\n".encode()
        subprocess.run(["usermod", "--expiredate", "1", name], check=True)   # 1970-01-02
        r = login(srv, name)
        assert r.returncode == 255 and r.stdout == b""
        assert b"meshsshd: your account has expired; please contact your system administrator" in r.stderr
        assert [e["reason"] for e in refusals(srv)] == ["account-expired"]
        subprocess.run(["usermod", "--expiredate", "2999-01-01", name], check=True)
        assert login(srv, name).returncode == 0
        subprocess.run(["usermod", "--expiredate", "", name], check=True)    # never
        assert login(srv, name).returncode == 0


def test_nologin_file_keeps_everyone_but_root_out(tmp_path: Path, make_user: Any) -> None:
    require_root()
    user = make_user("man")
    nologin = tmp_path / "nologin"
    cfg = config(user.pw_name, "root", root_login=True, nologin_files=[str(tmp_path / "absent"), str(nologin)])
    with ServerKit(tmp_path / "srv", cfg) as srv:
        assert login(srv, user.pw_name).returncode == 0
        nologin.write_text("Down for maintenance until 21:00.\nSee #ops.\n")
        r = login(srv, user.pw_name)
        assert r.returncode == 255 and r.stdout == b""
        assert b"meshsshd: Down for maintenance until 21:00.\nSee #ops." in r.stderr.replace(b"\r", b"")
        assert [e["reason"] for e in refusals(srv)] == ["nologin"]
        assert login(srv, "root").stdout == b"root\n"
        nologin.write_text("")   # an empty file still counts
        assert b"logins are disabled on this host (nologin)" in login(srv, user.pw_name).stderr
        nologin.unlink()
        assert login(srv, user.pw_name).returncode == 0


@contextlib.contextmanager
def _etc_nologin(text: str) -> Iterator[Path]:
    """/etc/nologin for the shortest possible moment, never replacing someone else's."""
    path = Path("/etc/nologin")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pytest.fail("/etc/nologin exists already: logins on this machine are disabled")
    try:
        os.write(fd, text.encode())
        os.close(fd)
        yield path
    finally:
        path.unlink()


def test_default_nologin_path_is_etc_nologin(tmp_path: Path, make_user: Any) -> None:
    require_root()
    user = make_user("man")
    with ServerKit(tmp_path / "srv", config(user.pw_name)) as srv:
        assert login(srv, user.pw_name).returncode == 0
        marker = f"meshsshd test {secrets.token_hex(3)}"
        with _etc_nologin(marker):
            r = login(srv, user.pw_name)
        assert r.returncode == 255 and marker.encode() in r.stderr
        assert login(srv, user.pw_name).returncode == 0
