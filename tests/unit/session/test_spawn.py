"""What a session child sees: environment and argv, built without root."""

from __future__ import annotations

import termios

import pytest

from meshsshd.config import DEFAULT_ACCEPT_ENV
from meshsshd.session._pty import apply_modes
from meshsshd.session._spawn import (ENTER_HOME, ENTER_HOME_HELPER, ROOT_PATH, SETSID, USER_PATH, ConnectionInfo,
                                     build_child_argv, build_child_env, build_home_argv, build_setpriv_argv,
                                     is_accepted_env, setpriv_program)
from meshsshd.session._utmp import DEAD_PROCESS, USER_PROCESS, LoginRecord, Utmpx, build_record
from meshsshd.users import LocalUser, is_valid_username

ALICE = LocalUser("alice", 1000, 1000, "/home/alice", "/bin/bash", (1000, 27))
ROOT = LocalUser("root", 0, 0, "/root", "/bin/bash", (0,))
CONN = ConnectionInfo("100.64.0.7", 51022, "100.64.0.2", 22022)
DEFAULT = DEFAULT_ACCEPT_ENV


def test_env_is_built_from_scratch():
    env = build_child_env(ALICE, CONN, {}, term=None, accept_env=DEFAULT)
    assert env == {
        "USER": "alice", "LOGNAME": "alice", "HOME": "/home/alice", "SHELL": "/bin/bash",
        "PATH": USER_PATH, "MAIL": "/var/mail/alice",
        "SSH_CLIENT": "100.64.0.7 51022 22022",
        "SSH_CONNECTION": "100.64.0.7 51022 100.64.0.2 22022",
    }


def test_env_for_pty_session_with_agent():
    env = build_child_env(ALICE, CONN, {"TERM": "vt100"}, term="xterm-256color", tty_name="/dev/pts/4",
                          auth_sock="/tmp/asyncssh-x/agent", accept_env=DEFAULT)
    assert env["TERM"] == "xterm-256color"
    assert env["SSH_TTY"] == "/dev/pts/4"
    assert env["SSH_AUTH_SOCK"] == "/tmp/asyncssh-x/agent"


def test_root_gets_sbin_path():
    assert build_child_env(ROOT, CONN, {}, accept_env=DEFAULT)["PATH"] == ROOT_PATH


@pytest.mark.parametrize(("name", "value", "patterns", "accepted"), [
    pytest.param("LANG", "de_DE.UTF-8", DEFAULT, True, id="lang"),
    pytest.param("LC_ALL", "C", DEFAULT, True, id="lc-prefix"),
    # Debian's sshd default (AcceptEnv LANG LC_*) and no wider.
    pytest.param("LANGUAGE", "de", DEFAULT, False, id="language-not-by-default"),
    pytest.param("TZ", "UTC", DEFAULT, False, id="tz-not-by-default"),
    pytest.param("EDITOR", "vim", DEFAULT, False, id="editor-not-by-default"),
    pytest.param("TERM", "xterm", DEFAULT, False, id="term-only-from-pty-req"),
    pytest.param("lc_all", "C", DEFAULT, False, id="case-sensitive"),
    pytest.param("EDITOR", "vim", ("EDITOR", "LC_*"), True, id="configured-name"),
    pytest.param("GIT_PROTOCOL", "version=2", ("GIT_*",), True, id="configured-wildcard"),
    pytest.param("TZ", "UTC", ("T?",), True, id="question-mark"),
    pytest.param("TZX", "UTC", ("T?",), False, id="question-mark-is-one-char"),
    pytest.param("LANG", "C", (), False, id="no-patterns-nothing-passes"),
    pytest.param("LD_PRELOAD", "/tmp/x.so", ("*",), False, id="ld-preload-never"),
    pytest.param("LD_LIBRARY_PATH", "/tmp", ("LD_*",), False, id="ld-library-path-never"),
    pytest.param("PATH", "/evil", DEFAULT, False, id="path"),
    pytest.param("HOME", "/", DEFAULT, False, id="home"),
    pytest.param("BASH_ENV", "/tmp/x", DEFAULT, False, id="bash-env"),
    pytest.param("LANG", "a\0b", DEFAULT, False, id="nul-in-value"),
    pytest.param("LC_X", "x" * 5000, DEFAULT, False, id="huge-value"),
    pytest.param("LC_A=B", "x", ("*",), False, id="bad-name"),
])
def test_env_allowlist(name, value, patterns, accepted):
    assert is_accepted_env(name, value, patterns) is accepted


def test_client_cannot_override_fixed_variables():
    env = build_child_env(ALICE, CONN, {"USER": "root", "LC_TIME": "C", "SSH_CLIENT": "x"}, accept_env=("*",))
    assert env["USER"] == "alice" and env["LC_TIME"] == "C" and env["SSH_CLIENT"] != "x"


def test_forced_command_env_has_the_original_command_and_no_client_variables():
    env = build_child_env(ALICE, CONN, {"LANG": "C", "LC_ALL": "C"}, accept_env=(),
                          original_command="rsync --server -e.Lsfx . /backup")
    assert env["SSH_ORIGINAL_COMMAND"] == "rsync --server -e.Lsfx . /backup"
    assert "LANG" not in env and "LC_ALL" not in env
    assert "SSH_ORIGINAL_COMMAND" not in build_child_env(ALICE, CONN, {}, accept_env=DEFAULT)


@pytest.mark.parametrize(("command", "pty", "expected"), [
    pytest.param("ls -l", False, ("/bin/bash", ["bash", "-c", "ls -l"]), id="exec"),
    pytest.param(None, False, ("/bin/bash", ["-bash"]), id="no-pty-shell-is-login-shell"),
    pytest.param(None, True, (SETSID, [SETSID, "--ctty", "/bin/bash", "-l"]), id="pty-login-shell"),
    pytest.param("top", True, (SETSID, [SETSID, "--ctty", "/bin/bash", "-c", "top"]), id="pty-exec"),
])
def test_argv(command, pty, expected):
    assert build_child_argv("/bin/bash", command, pty=pty) == expected


def test_setpriv_argv_is_numeric_with_the_daemons_groups_and_no_inheritable_caps():
    assert build_setpriv_argv("/usr/bin/setpriv", ALICE, "bash", ["-c", "id"]) == [
        "/usr/bin/setpriv", "--reuid=1000", "--regid=1000", "--groups=1000,27", "--inh-caps=-all", "--",
        "bash", "-c", "id"]
    lonely = LocalUser("lonely", 1001, 1001, "/home/lonely", "/bin/sh", ())
    assert "--clear-groups" in build_setpriv_argv("/usr/bin/setpriv", lonely, "/bin/sh", ["-c", "id"])


@pytest.fixture
def shells(tmp_path):
    """A shell in bin/, a same-named other file in early/, a link to the shell in link/."""
    for d in ("bin", "early", "link", "empty"):
        (tmp_path / d).mkdir()
    shell = tmp_path / "bin" / "mysh"
    shell.write_text("#!/bin/sh\n")
    (tmp_path / "early" / "mysh").write_text("#!/bin/sh\n")
    (tmp_path / "link" / "mysh").symlink_to(shell)
    return tmp_path, str(shell)


@pytest.mark.parametrize(("argv0", "path", "expected"), [
    pytest.param("{shell}", "/nowhere", "{shell}", id="argv0-is-the-executable"),
    pytest.param("mysh", "{t}/empty:{t}/bin", "mysh", id="base-name-found-on-path"),
    pytest.param("mysh", "{t}/link", "mysh", id="base-name-found-through-a-link"),
    pytest.param("mysh", "{t}/early:{t}/bin", None, id="another-file-found-first"),
    pytest.param("mysh", "{t}/empty", None, id="not-on-path"),
    pytest.param("mysh", ":{t}/bin", None, id="empty-entry-means-cwd"),
    pytest.param("mysh", "relative:{t}/bin", None, id="relative-entry"),
    pytest.param("-mysh", "{t}/bin", None, id="login-shell-dash"),
    pytest.param("other", "{t}/bin", None, id="not-the-base-name"),
])
def test_setpriv_program_keeps_argv0_only_where_execvp_reaches_the_shell(shells, argv0, path, expected):
    t, shell = shells
    fill = {"t": t, "shell": shell}
    want = expected.format(**fill) if expected else None
    assert setpriv_program(shell, argv0.format(**fill), path.format(**fill)) == want


@pytest.mark.parametrize(("name", "ok"), [
    ("alice", True), ("a.b-c_d", True), ("_svc", True), ("host$", True),
    ("-rf", False), ("", False), ("a b", False), ("a/b", False), ("..", False), ("x" * 33, False),
    ("al;ce", False), ("ünï", False),
])
def test_usernames(name, ok):
    assert is_valid_username(name) is ok


def test_apply_modes_sets_flags_and_chars():
    base = [0, 0, termios.CS7, 0, termios.B9600, termios.B9600, [b"\0"] * 32]
    modes = {53: 1, 51: 1, 50: 0, 1: 3, 91: 1, 128: 38400, 129: 38400, 36: 1, 72: 1, 250: 7}
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = apply_modes(base, modes)
    assert lflag & termios.ECHO and lflag & termios.ICANON and not lflag & termios.ISIG
    assert cc[termios.VINTR] == b"\x03"
    assert cflag & termios.CSIZE == termios.CS8
    assert iflag & termios.ICRNL and oflag & termios.ONLCR
    assert ispeed == ospeed == termios.B38400


def test_apply_modes_clears_flags():
    base = [termios.IXON, termios.OPOST, termios.CS8, termios.ECHO | termios.ISIG, 0, 0, [0] * 32]
    iflag, oflag, _, lflag, *_ = apply_modes(base, {38: 0, 70: 0, 53: 0})
    assert not iflag & termios.IXON and not oflag & termios.OPOST
    assert lflag == termios.ISIG


def test_utmp_records():
    import ctypes

    assert ctypes.sizeof(Utmpx) == 384
    rec = LoginRecord(4242, "/dev/pts/7", "alice", "100.64.0.7")
    ut = build_record(rec, USER_PROCESS, now=1700000000.25)
    assert (ut.ut_type, ut.ut_pid, ut.ut_line, ut.ut_id, ut.ut_user, ut.ut_host) == (
        USER_PROCESS, 4242, b"pts/7", b"7", b"alice", b"100.64.0.7")
    assert ut.ut_tv.tv_sec == 1700000000 and ut.ut_tv.tv_usec == 250000
    assert bytes(ut.ut_addr_v6)[:4] == bytes([100, 64, 0, 7])
    dead = build_record(rec, DEAD_PROCESS)
    assert dead.ut_type == DEAD_PROCESS and dead.ut_user == b""


def test_pam_argv_wraps_the_command_and_keeps_setsid_outermost():
    from meshsshd.session._spawn import PAM_HELPER, build_pam_argv

    exe, argv = build_pam_argv(ALICE, "/bin/bash", ["bash", "-c", "id"], service="meshsshd", tty=None,
                               rhost="100.64.0.7", python="/usr/bin/python3")
    assert exe == "/usr/bin/python3"
    assert argv[:4] == ["/usr/bin/python3", "-I", "-S", PAM_HELPER]
    assert argv[argv.index("--groups") + 1] == "1000,27"
    assert argv[argv.index("--tty") + 1] == ""
    assert argv[-4:] == ["/bin/bash", "bash", "-c", "id"] and argv[-5] == "--"
    exe, argv = build_pam_argv(ALICE, SETSID, [SETSID, "--ctty", "/bin/bash", "-l"], service="meshsshd",
                               tty="/dev/pts/3", rhost="h", python="/usr/bin/python3")
    assert exe == SETSID and argv[:3] == [SETSID, "--ctty", "/usr/bin/python3"]
    assert argv[-3:] == ["/bin/bash", "/bin/bash", "-l"]
    assert argv[argv.index("--tty") + 1] == "/dev/pts/3"


@pytest.mark.parametrize(("executable", "argv", "expected"), [
    pytest.param("/bin/bash", ["bash", "-c", "id"], ["/bin/sh", "-c", ENTER_HOME, "meshsshd", "/home/alice",
                                                     "bash", "-c", "id"], id="exec-by-name-keeps-argv0"),
    pytest.param(SETSID, [SETSID, "--ctty", "/bin/bash", "-l"],
                 ["/bin/sh", "-c", ENTER_HOME, "meshsshd", "/home/alice", SETSID, "--ctty", "/bin/bash", "-l"],
                 id="pty-wrapper"),
    pytest.param("/bin/bash", ["-bash"], ["/py", "-I", "-S", ENTER_HOME_HELPER, "/home/alice", "/bin/bash", "-bash"],
                 id="login-shell-dash-needs-the-python-step"),
])
def test_home_is_entered_by_a_step_after_the_drop(executable, argv, expected):
    """The step is what setpriv runs (argv[0] == executable), so the drop comes first."""
    got_exe, got_argv = build_home_argv("/home/alice", executable, argv, "/usr/bin:/bin", python="/py")
    assert got_argv == expected and got_exe == got_argv[0]
    assert setpriv_program(got_exe, got_argv[0], "/nowhere") == got_exe


def test_enter_home_step_prints_sshds_message_and_stays_in_root(tmp_path):
    import subprocess

    missing = tmp_path / "gone"

    def step(home, *program):
        return subprocess.run(["/bin/sh", "-c", ENTER_HOME, "meshsshd", str(home), *program],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp_path))

    r = step(missing, "pwd")
    assert r.stderr == f"Could not chdir to home directory {missing}: No such file or directory\n"
    assert r.stdout == "/\n"
    assert step(tmp_path, "pwd").stdout == f"{tmp_path}\n"
    assert step(missing, "env").stdout == "PATH=/usr/bin:/bin\n"   # cd's PWD/OLDPWD do not leak
