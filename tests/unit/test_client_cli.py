"""The meshssh entry point: help, usage errors and sub-command dispatch (real process)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import console_script


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("meshssh"), *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize("args", [["-h"], ["--help"]])
def test_help(args: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 0 and "usage: meshssh" in r.stdout and "config install" in r.stdout


def test_no_arguments_is_usage_255() -> None:
    r = run()
    assert r.returncode == 255 and "usage: meshssh" in r.stderr


@pytest.mark.parametrize("args", [["-Z", "host"], ["-p"], ["-L", "nonsense", "host"]])
def test_usage_errors_exit_255(args: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 255 and r.stderr.startswith("meshssh: ")


@pytest.mark.parametrize("sub", ["login", "logout", "detect", "proxy", "config", "cp", "peers"])
def test_subcommand_help(sub: str) -> None:
    r = run(sub, "--help")
    assert r.returncode == 0 and f"meshssh {sub}" in r.stdout


def test_not_logged_in_names_the_fix(tmp_path, monkeypatch) -> None:
    import os

    env = {**os.environ, "MESHSSH_CONFIG_DIR": str(tmp_path)}
    for args in (["db-1", "true"], ["peers"], ["cp", "x", "db-1:/tmp/"]):
        r = run(*args, env=env)
        assert r.returncode != 0
        assert "not logged in — run `meshssh login`" in r.stderr, args
