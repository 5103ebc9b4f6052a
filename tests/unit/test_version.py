"""`--version` on all three commands, and `meshssh -V` where ssh has it (stderr, any
position among the options, bundled)."""

from __future__ import annotations

import subprocess

import pytest

from meshsshd import __version__
from meshssh_client.options import wants_version
from tests.support import console_script


@pytest.mark.parametrize("argv, stream", [
    (["meshsshd", "--version"], "stdout"),
    (["meshmgmt", "--version"], "stdout"),
    (["meshssh", "--version"], "stdout"),
    (["meshssh", "-V"], "stderr"),
    (["meshssh", "-q", "-vV", "-p", "22", "host", "true"], "stderr"),
])
def test_each_command_names_its_version(argv: list[str], stream: str) -> None:
    r = subprocess.run([console_script(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = getattr(r, stream)
    assert out.startswith(f"{argv[0]} {__version__} (asyncssh "), (r.stdout, r.stderr)
    assert "OpenSSL" in out


@pytest.mark.parametrize("argv, expected", [
    (["-V"], True), (["-4vV", "host"], True), (["--version"], True),
    (["-oVisualHostKey=yes", "host"], False),   # a V inside an option's value
    (["-o", "-V", "host"], False),              # the value of -o
    (["-l", "V", "host"], False),
    (["host", "-V"], False),                    # after the destination: the remote command's
])
def test_version_flag_is_found_among_the_options_only(argv: list[str], expected: bool) -> None:
    assert wants_version(argv) is expected
