"""meshssh's command line parsed the way OpenSSH parses it."""

from __future__ import annotations

import pytest

from meshssh_client.options import first_word
from meshssh_client.errors import UsageError
from meshssh_client.options import (Forward, env_to_send, parse_forward, parse_ssh_args,
                            split_destination, want_pty)


@pytest.mark.parametrize("argv, expect", [
    pytest.param(["db-1"], dict(destination="db-1", user=None, command=()), id="bare-host"),
    pytest.param(["alice@db-1", "ls", "-la"], dict(user="alice", command=("ls", "-la")), id="user-at-host-cmd"),
    pytest.param(["-l", "bob", "db-1"], dict(user="bob"), id="dash-l"),
    pytest.param(["-lbob", "db-1"], dict(user="bob"), id="attached-value"),
    pytest.param(["-p", "2222", "db-1"], dict(port=2222), id="port"),
    pytest.param(["db-1", "-p", "2222", "uptime"], dict(port=2222, command=("uptime",)), id="options-after-host"),
    pytest.param(["-tt", "db-1"], dict(tty=2), id="double-t"),
    pytest.param(["-T", "db-1"], dict(tty=-1), id="no-tty"),
    pytest.param(["-vvv", "db-1"], dict(verbose=3), id="bundled-v"),
    pytest.param(["-NL8080:localhost:80", "db-1"],
                 dict(no_command=True, local=(Forward("localhost", 8080, "localhost", 80),)), id="bundle-N-L"),
    pytest.param(["-A", "-i", "k", "-i", "k2", "db-1"], dict(agent=True, identities=("k", "k2")), id="agent-identities"),
    pytest.param(["--", "db-1", "-p", "1"], dict(destination="db-1", command=("-p", "1"), port=None),
                 id="double-dash-ends-options"),
    pytest.param(["db-1", "--", "-x"], dict(command=("-x",)), id="dash-dash-after-host"),
    pytest.param(["-o", "Port=2200", "-o", "Port 2300", "db-1"], dict(port=2200), id="o-first-wins"),
    pytest.param(["-p", "1", "-o", "Port=2200", "db-1"], dict(port=1), id="flag-beats-o"),
    pytest.param(["-o", "User=carol", "db-1"], dict(user="carol"), id="o-user"),
    pytest.param(["-o", "RequestTTY=force", "db-1"], dict(tty_override=2), id="o-requesttty"),
    pytest.param(["-o", "SendEnv=LANG LC_*", "-o", "SetEnv=A=1 B=2", "db-1"],
                 dict(send_env=("LANG", "LC_*"), set_env=(("A", "1"), ("B", "2"))), id="o-env"),
    pytest.param(["-b", "127.77.0.3", "db-1"], dict(bind_address="127.77.0.3"), id="bind"),
    pytest.param(["--ssh-jwt-cache-ttl", "0", "--no-cache", "db-1"],
                 dict(ssh_jwt_cache_ttl="0", no_cache=True), id="long-options"),
    pytest.param(["--ssh-jwt-cache-ttl=30", "db-1"], dict(ssh_jwt_cache_ttl="30"), id="long-equals"),
    pytest.param(["ssh://eve@db-1:2022"], dict(user="eve", port=2022, destination="db-1"), id="ssh-uri"),
    pytest.param(["-N", "db-1", "cmd"], dict(no_command=False, command=("cmd",)), id="N-with-command"),
])
def test_parse(argv: list[str], expect: dict) -> None:
    args = parse_ssh_args(argv)
    for k, v in expect.items():
        assert getattr(args, k) == v, k


def test_remote_command_joined_like_ssh() -> None:
    assert parse_ssh_args(["h", "echo", "a b", "c"]).remote_command == "echo a b c"
    assert parse_ssh_args(["h"]).remote_command is None


@pytest.mark.parametrize("argv, message", [
    pytest.param([], "no destination", id="nothing"),
    pytest.param(["-p"], "requires an argument", id="missing-value"),
    pytest.param(["-p", "x", "h"], "Bad port", id="bad-port"),
    pytest.param(["-p", "70000", "h"], "Bad port", id="port-range"),
    pytest.param(["-J", "jump", "h"], "not supported", id="unsupported-with-arg"),
    pytest.param(["-X", "h"], "not supported", id="unsupported-flag"),
    pytest.param(["-Z", "h"], "unknown option", id="unknown"),
    pytest.param(["--bogus", "h"], "unknown option", id="unknown-long"),
    pytest.param(["-L", "8080", "h"], "Bad local forwarding", id="bad-L"),
    pytest.param(["-R", "9000", "h"], "dynamic remote forwarding", id="dynamic-R"),
    pytest.param(["-o", "SetEnv=NOVALUE", "h"], "bad SetEnv", id="bad-setenv"),
])
def test_parse_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_ssh_args(argv)


@pytest.mark.parametrize("spec, kind, expect", [
    ("8080:db:80", "L", Forward("localhost", 8080, "db", 80)),
    ("127.0.0.1:8080:db:80", "L", Forward("127.0.0.1", 8080, "db", 80)),
    ("*:8080:db:80", "L", Forward("0.0.0.0", 8080, "db", 80)),
    (":8080:db:80", "L", Forward("0.0.0.0", 8080, "db", 80)),
    ("[::1]:8080:[2001:db8::1]:443", "L", Forward("::1", 8080, "2001:db8::1", 443)),
    ("8080/db/80", "L", Forward("localhost", 8080, "db", 80)),
    ("0:localhost:22", "R", Forward("localhost", 0, "localhost", 22)),
    ("*:9000:localhost:22", "R", Forward("", 9000, "localhost", 22)),
    ("1080", "D", Forward("localhost", 1080)),
    ("127.0.0.1:1080", "D", Forward("127.0.0.1", 1080)),
])
def test_forward_specs(spec: str, kind: str, expect: Forward) -> None:
    assert parse_forward(spec, kind) == expect


@pytest.mark.parametrize("spec, kind", [("a:b:c", "L"), ("8080::80", "L"), ("1:2:3", "D"),
                                          ("x:db:80", "L"), ("80:db:99999", "R")])
def test_forward_spec_errors(spec: str, kind: str) -> None:
    with pytest.raises(UsageError):
        parse_forward(spec, kind)


@pytest.mark.parametrize("dest, expect", [
    ("h", (None, "h", None)),
    ("u@h", ("u", "h", None)),
    ("a@b@h", ("a@b", "h", None)),
    ("ssh://h", (None, "h", None)),
    ("ssh://u@[::1]:2022", ("u", "::1", 2022)),
])
def test_split_destination(dest: str, expect: tuple) -> None:
    assert split_destination(dest) == expect


@pytest.mark.parametrize("argv, isatty, expect", [
    (["h"], True, True),            # interactive shell on a terminal
    (["h"], False, False),          # piped stdin: no pty
    (["h", "ls"], True, False),     # a command: no pty unless -t
    (["-t", "h", "ls"], True, True),
    (["-t", "h", "ls"], False, False),
    (["-tt", "h", "ls"], False, True),
    (["-T", "h"], True, False),
    (["-N", "h"], True, False),
    (["-n", "h"], True, False),
    (["-o", "RequestTTY=force", "h", "ls"], False, True),
    (["-o", "RequestTTY=no", "h"], True, False),
])
def test_want_pty(argv: list[str], isatty: bool, expect: bool) -> None:
    assert want_pty(parse_ssh_args(argv), isatty) is expect


def test_sendenv_patterns() -> None:
    env = {"LANG": "C", "LC_ALL": "C", "LC_X": "1", "PATH": "/bin", "SECRET": "s"}
    assert env_to_send(("LANG", "LC_*"), env) == {"LANG": "C", "LC_ALL": "C", "LC_X": "1"}
    assert env_to_send(("LC_*", "-LC_X"), env) == {"LC_ALL": "C"}
    assert env_to_send((), env) == {}


@pytest.mark.parametrize("argv, index", [
    (["login"], 0),
    (["-p", "22", "db-1", "ls"], 2),
    (["-p22", "db-1"], 1),
    (["-tl", "bob", "db-1"], 2),
    (["--ssh-jwt-cache-ttl", "5", "cp"], 2),
    (["--no-cache", "db-1"], 1),
    (["-v"], None),
    (["--", "login"], 1),
])
def test_cli_finds_first_word(argv: list[str], index: int | None) -> None:
    assert first_word(argv) == index


def test_unknown_and_hostkey_options_warn() -> None:
    args = parse_ssh_args(["-o", "StrictHostKeyChecking=no", "-o", "Frobnicate=1", "-o", "BatchMode=yes", "h"])
    assert len(args.warnings) == 2
    assert "always checks the peer's host key" in args.warnings[0]
    assert "frobnicate" in args.warnings[1]
    assert parse_ssh_args(["-o", "Port=2", "-o", "ServerAliveInterval=5", "h"]).warnings == ()


@pytest.mark.parametrize("argv, hint", [
    (["-d", "db-1"], "meshssh attach db-1 S1"),
    (["-d", "alice@db-1"], "meshssh attach alice@db-1 S1"),          # the login name was dropped
    (["-d", "-l", "bob", "-p", "2222", "db-1"], "meshssh attach -p 2222 bob@db-1 S1"),
])
def test_detach_hint_reaches_the_same_session(argv: list[str], hint: str) -> None:
    from meshssh_client.detach import attach_hint

    args = parse_ssh_args([a for a in argv if a != "-d"])
    assert attach_hint(args, "S1") == hint
