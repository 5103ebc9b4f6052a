"""The admin token expires, and `meshmgmt admin-token rotate` replaces it, offline, on
the server (real `meshmgmt init`, `serve` and admin CLI)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support import console_script

from .mgmtkit import assert_no_server_errors, start_serve


def _meshmgmt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("meshmgmt"), *args], capture_output=True, text=True, timeout=60)


def test_the_admin_token_expires_and_rotation_replaces_it(tmp_path: Path) -> None:
    data = tmp_path / "mgmt"
    res = _meshmgmt("init", "--data-dir", str(data), "--admin-email", "admin@example.com")
    assert res.returncode == 0, res.stderr
    assert "expires" in res.stdout
    token_file = data / "admin.token"
    mgmt = start_serve(data, token_file.read_text().strip())
    try:
        assert mgmt.cli("users", "list").returncode == 0
        res = _meshmgmt("admin-token", "rotate", "--data-dir", str(data), "--lifetime", "2s")
        assert res.returncode == 0, res.stderr
        old = token_file.read_text().strip()
        time.sleep(2.5)
        res = mgmt.cli("users", "list", check=False)
        assert res.returncode == 1
        assert "admin token expired" in res.stderr and "meshmgmt admin-token rotate" in res.stderr, res.stderr

        res = _meshmgmt("admin-token", "rotate", "--data-dir", str(data))
        assert res.returncode == 0, res.stderr
        assert "1 old token(s) revoked" in res.stdout
        new = token_file.read_text().strip()
        assert new != old and token_file.stat().st_mode & 0o777 == 0o600
        assert not (data / "admin.token.new").exists()
        assert mgmt.cli("users", "list").returncode == 0  # MESHMGMT_TOKEN_FILE flow: same file, new token

        # Rotation revokes at once: a copy of the previous (unexpired) token stops working.
        res = _meshmgmt("admin-token", "rotate", "--data-dir", str(data), "--lifetime", "30d")
        assert res.returncode == 0, res.stderr
        stale = tmp_path / "stale.token"
        stale.write_text(new + "\n")
        res = _meshmgmt("--url", mgmt.url, "--token-file", str(stale), "users", "list")
        assert res.returncode == 1 and "401" in res.stderr, res.stderr
        assert mgmt.cli("users", "list").returncode == 0

        res = _meshmgmt("admin-token", "rotate", "--data-dir", str(data), "--lifetime", "soon")
        assert res.returncode == 2 and "not a duration" in res.stderr
    finally:
        mgmt.proc.stop()
    assert_no_server_errors(mgmt)
    assert old not in mgmt.proc.log.read_text()
