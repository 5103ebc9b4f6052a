"""A bad config file, from the outside (issue 13): the real `meshsshd serve` refuses it
with one human line on stderr and exit code 2 instead of starting and then dropping
every login; fixed, the same file serves a login to the system `ssh`; and a bad file
sent with SIGHUP is refused with the same words in the daemon's JSON event while the
running settings stay."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import console_script, require_root

from .serverkit import ServerKit, key_login_config

pytestmark = [pytest.mark.openssh, pytest.mark.root]


def _human_lines(stderr: str) -> list[str]:
    """stderr without the daemon's JSON event lines."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def test_a_bad_file_stops_serve_and_a_fixed_one_serves_a_login(tmp_path: Path, make_user: Any) -> None:
    require_root()
    user = make_user("msc")
    key, config = key_login_config(tmp_path, user)
    srv = ServerKit(tmp_path / "srv", config)
    # 0 used to start and then refuse every session; "ten" was refused without the file
    for value, expected in ((0, "expected `int` >= 1"), ("ten", "expected `int`, got `str`")):
        srv.write_config(limits={"max_sessions": value})
        r = subprocess.run([console_script("meshsshd"), "serve", "--config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert _human_lines(r.stderr) == [f"meshsshd: {srv.config_path}: key `limits.max_sessions`: {expected}"], \
            r.stderr

    srv.config["limits"] = {"max_sessions": 10}
    with srv:
        login = srv.ssh(user.pw_name, key, "id -un")
        assert (login.returncode, login.stdout) == (0, f"{user.pw_name}\n".encode()), login.stderr

        srv.reload(limits={"max_sesions": 10})
        deadline = time.monotonic() + 15
        while '"config.reload_failed"' not in srv.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        failed = [json.loads(line) for line in srv.output().splitlines() if '"config.reload_failed"' in line]
        assert [f["error"] for f in failed] == [
            f"{srv.config_path}: unknown key `limits.max_sesions` (did you mean `limits.max_sessions`?)"], srv.output()
        assert failed[0]["effect"] == "the old settings stay in force"
        again = srv.ssh(user.pw_name, key, "id -un")
        assert again.returncode == 0, again.stderr
