"""client/front.py: what goes to the control master, and that the front stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshssh_client.front import _request


def test_front_imports_nothing_heavy() -> None:
    code = ("import sys, meshssh_client.front\n"
            "heavy = [m for m in ('asyncssh', 'click', 'cryptography', 'rich', 'jwt', 'meshssh_client.cli',"
            " 'meshssh_client.connect', 'meshsshd') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("argv, op", [
    pytest.param(["db-1"], "session", id="shell"),
    pytest.param(["alice@db-1", "true"], "session", id="command"),
    pytest.param(["-l", "bob", "-p", "2222", "-tt", "-q", "db-1", "ls", "-l"], "session", id="simple-options"),
    pytest.param(["-T", "-n", "db-1", "cat"], "session", id="no-tty-no-stdin"),
    pytest.param(["proxy", "db-1", "22022"], "proxy", id="proxy"),
    pytest.param(["-L", "8080:x:80", "db-1"], None, id="forward"),
    pytest.param(["-A", "db-1"], None, id="agent"),
    pytest.param(["-i", "key", "db-1"], None, id="identity"),
    pytest.param(["-o", "ConnectTimeout=3", "db-1"], None, id="option"),
    pytest.param(["-v", "db-1"], None, id="verbose"),
    pytest.param(["-N", "db-1"], None, id="no-command"),
    pytest.param(["-d", "db-1", "sleep 1"], None, id="detached"),
    pytest.param(["--no-cache", "db-1"], None, id="no-cache"),
    pytest.param(["--delegate-to", "group:x", "db-1"], None, id="delegate"),
    pytest.param(["login"], None, id="subcommand"),
    pytest.param(["proxy", "db-1", "22022", "--user", "x"], "proxy", id="proxy-with-user"),
    pytest.param(["proxy", "db-1", "22022", "--no-cache"], None, id="proxy-with-options"),
    pytest.param(["-Z", "db-1"], None, id="usage-error"),
])
def test_what_the_master_serves(argv: list[str], op: str | None) -> None:
    got = _request(argv)
    assert (got[0] if got else None) == op
