"""Starting a child process as the mapped local user.

The pure halves (`build_child_env`, `build_child_argv`, `build_setpriv_argv`) decide what
the child sees and are tested without root. `spawn` hands them to `subprocess.Popen`,
whose C fork/exec path does chdir, umask and setsid without running Python code in the
child (the daemon has threads: executor workers). A PTY child additionally needs its
terminal as controlling terminal; util-linux `setsid --ctty` does that in C right before
exec, so no `preexec_fn` is needed either.

The privilege drop goes through util-linux `setpriv`, started by a plain Popen: CPython
uses vfork() only when no uid/gid/groups change is asked of it, and with
`Popen(user=, group=, extra_groups=)` every login fork()ed the whole daemon while holding
the GIL (a third of the daemon's CPU during a login burst, bench/RESULTS.md "Logins").
`Popen(user=)` stays for hosts without setpriv and ids setpriv would misread.

Both C paths chdir before they drop privileges, so the daemon never lets them enter the
home directory: the child starts in `/` and `build_home_argv` puts a small step in front
of the program that, already running as the user, enters the home directory (or stays
in `/` with sshd's "Could not chdir to home directory" line) and execs the program.
That is OpenSSH's order: the user's own permissions decide (a 0700 home on NFS with
root_squash works, a directory only root may enter does not become the user's cwd).

Signals a user asks for (`signal` channel requests) are sent by `kill` started the same
way, with the user's credentials (`signal_as_user`), as sshd's killpg after its drop.
"""

from __future__ import annotations

import fnmatch
import functools
import grp
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..logs import event
from ..users import LocalUser
from ._cgroup import SH, LoginCgroup

log = logging.getLogger("meshsshd.session")

USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_ENV_VALUE = 4096

SETSID = shutil.which("setsid") or "/usr/bin/setsid"
SETPRIV = shutil.which("setpriv")   # util-linux; None: every session fork()s the daemon
PAM_DIR = "/etc/pam.d"
PAM_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pam_helper.py")
ENTER_HOME_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_enter_home.py")
KILL = shutil.which("kill") or "/bin/kill"
# `sh -c ENTER_HOME meshsshd HOME PROGRAM ARGS...`, run as the user. The reasons mirror
# chdir(2)'s common errors (a POSIX shell cannot print strerror); PWD and OLDPWD, which
# `cd` exports, are dropped again so the program gets exactly the daemon's environment.
ENTER_HOME = (
    'cd -P -- "$1" 2>/dev/null || { '
    'if [ ! -e "$1" ]; then r="No such file or directory"; '
    'elif [ ! -d "$1" ]; then r="Not a directory"; else r="Permission denied"; fi; '
    'printf "Could not chdir to home directory %s: %s\\n" "$1" "$r" >&2; cd /; }; '
    'shift; unset PWD OLDPWD r; exec "$@"'
)


def pam_service() -> str | None:
    """The PAM service for sessions, when PAM is configured for meshsshd (blocking stat).

    `MESHSSHD_PAM_SERVICE` overrides the name "meshsshd" (tests use a throwaway service so
    they do not change what other daemons on the machine do).
    """
    name = os.environ.get("MESHSSHD_PAM_SERVICE", "meshsshd")
    if "/" in name or not os.path.isfile(os.path.join(PAM_DIR, name)):
        return None
    return name


def is_accepted_env(name: str, value: str, patterns: Sequence[str]) -> bool:
    """sshd's AcceptEnv test (`*` and `?` wildcards, case-sensitive), except that LD_*
    and malformed names or values never pass, whatever an admin's pattern says."""
    if not _ENV_NAME.match(name) or name.startswith("LD_"):
        return False
    if "\0" in value or len(value) > MAX_ENV_VALUE:
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class ConnectionInfo:
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int

    @property
    def ssh_client(self) -> str:
        return f"{self.client_ip} {self.client_port} {self.server_port}"

    @property
    def ssh_connection(self) -> str:
        return f"{self.client_ip} {self.client_port} {self.server_ip} {self.server_port}"


def build_child_env(
    user: LocalUser,
    conn: ConnectionInfo,
    client_env: Mapping[str, str],
    *,
    term: str | None = None,
    tty_name: str | None = None,
    auth_sock: str | None = None,
    original_command: str | None = None,
    accept_env: Sequence[str],
) -> dict[str, str]:
    """The child's whole environment: nothing leaks from the daemon's own.

    accept_env: the AcceptEnv patterns client variables must match (the config's or the
    admitting rule's; empty for forced commands and `restrict` keys). original_command:
    what the client asked for when a forced command runs instead (`SSH_ORIGINAL_COMMAND`,
    which rrsync, borg and gitolite read)."""
    env = {k: v for k, v in client_env.items() if is_accepted_env(k, v, accept_env)}
    if term:
        env["TERM"] = term
    env.update({
        "USER": user.name,
        "LOGNAME": user.name,
        "HOME": user.home,
        "SHELL": user.shell,
        "PATH": ROOT_PATH if user.is_root else USER_PATH,
        "MAIL": f"/var/mail/{user.name}",
        "SSH_CLIENT": conn.ssh_client,
        "SSH_CONNECTION": conn.ssh_connection,
    })
    if tty_name:
        env["SSH_TTY"] = tty_name
    if auth_sock:
        env["SSH_AUTH_SOCK"] = auth_sock
    if original_command is not None:
        env["SSH_ORIGINAL_COMMAND"] = original_command
    return env


def build_child_argv(shell: str, command: str | None, *, pty: bool) -> tuple[str, list[str]]:
    """(executable, argv) as OpenSSH builds them.

    A command runs as `shell -c command` with argv[0] the shell's base name. Without a
    command the shell is a login shell (argv[0] `-bash`). With a PTY, `setsid --ctty`
    makes the terminal the controlling terminal; it cannot set argv[0], so the login
    shell gets `-l` instead of the leading dash.
    """
    base = os.path.basename(shell) or "sh"
    if command is not None:
        argv = [base, "-c", command]
        if pty:
            return SETSID, [SETSID, "--ctty", shell, "-c", command]
        return shell, argv
    if pty:
        return SETSID, [SETSID, "--ctty", shell, "-l"]
    return shell, ["-" + base]


def build_pam_argv(user: LocalUser, executable: str, argv: list[str], *, service: str, tty: str | None,
                   rhost: str, python: str) -> tuple[str, list[str]]:
    """Wrap (executable, argv) in the PAM helper, which runs as root and drops privileges
    itself after opening the session. A PTY wrapper (`setsid --ctty`) stays outermost so
    the helper, as session leader, owns the terminal."""
    outer: list[str] = []
    if executable == SETSID and argv[:2] == [SETSID, "--ctty"]:
        outer, argv = argv[:2], argv[2:]
        executable = argv[0]
    helper = [python, "-I", "-S", PAM_HELPER, "--service", service, "--user", user.name,
              "--uid", str(user.uid), "--gid", str(user.gid), "--groups", ",".join(map(str, user.groups)),
              "--cwd", user.home, "--tty", tty or "", "--rhost", rhost, "--", executable, *argv]
    if outer:
        return SETSID, [*outer, *helper]
    return python, helper


def setpriv_program(executable: str, argv0: str, path: str) -> str | None:
    """What setpriv must exec so that the program runs with `argv0`; None when it cannot.

    setpriv has no flag for argv[0]: it execvp()s the name it is given, with that name as
    argv[0]. That is right as is when argv[0] is the executable (`setsid --ctty ...` for
    PTY sessions). OpenSSH's `bash -c command` has the shell's base name as argv[0]
    (`$0`, error messages "bash: line 1: ..."): giving setpriv the base name keeps it when
    the PATH search execvp makes in the child's PATH finds the user's shell itself (its
    first hit is checked here; a shell elsewhere gets None). A login shell's `-bash`
    cannot be reached at all: `build_home_argv` then uses its Python step, which can
    set argv[0] (`bash -c 'exec -a "$0" "$@"'` would put SHLVL=0 and PWD into the
    user's environment and require bash).
    """
    if argv0 == executable:
        return executable
    if "/" in argv0 or argv0 != os.path.basename(executable):
        return None
    for directory in path.split(":"):
        if not directory.startswith("/"):   # execvp would search the working directory
            return None
        candidate = os.path.join(directory, argv0)
        if os.path.exists(candidate):
            try:
                return argv0 if os.path.samefile(candidate, executable) else None
            except OSError:
                return None
    return None


def build_setpriv_argv(setpriv: str, user: LocalUser, program: str, args: list[str]) -> list[str]:
    """argv that runs `program args...` as the user through util-linux setpriv.

    Numeric ids, and the supplementary groups the daemon computed (initgroups semantics,
    as `Popen(extra_groups=)` had them). `--inh-caps=-all` empties the inheritable and so
    the ambient set: a non-root user ends with no capabilities after exec. The bounding
    set is left alone and no_new_privs stays off, as with sshd: sudo and su must keep
    working in the session.
    """
    groups = f"--groups={','.join(map(str, user.groups))}" if user.groups else "--clear-groups"
    return [setpriv, f"--reuid={user.uid}", f"--regid={user.gid}", groups, "--inh-caps=-all", "--",
            program, *args]


def ids_are_unambiguous(user: LocalUser) -> bool:
    """Whether setpriv reads the user's numeric ids as those ids (blocking NSS lookups).

    setpriv looks each id argument up as a *name* first (util-linux `get_user`,
    `get_group`), so an account or group literally named "1000" would win. useradd and
    systemd refuse such names, but NSS (LDAP) may serve them: then Popen(user=) is used.
    """
    try:
        if pwd.getpwnam(str(user.uid)).pw_uid != user.uid:
            return False
    except KeyError:
        pass
    for gid in {user.gid, *user.groups}:
        try:
            if grp.getgrnam(str(gid)).gr_gid != gid:
                return False
        except KeyError:
            pass
    return True


@functools.cache
def _warn_no_setpriv() -> None:
    event(log, "session.setpriv-missing", level=logging.WARNING,
          effect="each session fork()s the daemon (slower logins)", fix="install util-linux")


def _setpriv_argv(user: LocalUser, executable: str, argv: list[str], path: str) -> list[str] | None:
    """The vfork-able way to start (executable, argv) as the user, or None."""
    if SETPRIV is None:
        _warn_no_setpriv()
        return None
    program = setpriv_program(executable, argv[0], path)
    if program is None or not ids_are_unambiguous(user):
        return None
    return build_setpriv_argv(SETPRIV, user, program, argv[1:])


def build_home_argv(home: str, executable: str, argv: list[str], path: str,
                    python: str = sys.executable) -> tuple[str, list[str]]:
    """(executable, argv) that enters `home` as the user, then runs (executable, argv).

    `/bin/sh` (a millisecond) where exec by name keeps argv[0] (`setpriv_program`); a
    login shell's `-bash` cannot be reached that way, so those sessions (no PTY, no
    command: `ssh -T`, VS Code Remote; one per interactive connection) go through the
    stdlib-only `_enter_home.py`, which execs with any argv[0]. Either way the result
    runs with argv[0] == its executable, so setpriv can start it."""
    program = setpriv_program(executable, argv[0], path)
    if program is not None:
        return SH, [SH, "-c", ENTER_HOME, "meshsshd", home, program, *argv[1:]]
    return python, [python, "-I", "-S", ENTER_HOME_HELPER, home, executable, *argv]


def spawn(
    user: LocalUser,
    executable: str,
    argv: list[str],
    env: dict[str, str],
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    new_session: bool,
    as_root: bool = False,
    enter_home: bool = True,
    cgroup: LoginCgroup | None = None,
) -> subprocess.Popen:
    """Blocking fork/exec as the user (or as root for the PAM helper, which drops
    privileges itself); run it in an executor. Raises OSError.

    As root the drop goes through setpriv (vfork); where it cannot, and in a daemon not
    running as root, through Popen(user=). Both start in `/`, set the umask and the
    session, restore signal dispositions and close other fds the same way; the home
    directory is entered after the drop (`build_home_argv`; the PAM helper does it
    itself), unless `enter_home` is false (the daemon's own helpers).

    With `cgroup`, the child joins it before exec as root (`LoginCgroup.join_argv`); on
    the Popen(user=) path that is impossible: the caller moves it in after the start
    (`LoginCgroup.add`, a no-op for a child that joined)."""
    kwargs: dict = dict(
        stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd="/",
        close_fds=True, restore_signals=True, umask=0o022,
        start_new_session=new_session,
    )
    if as_root:
        if cgroup is not None:
            executable, argv = SH, cgroup.join_argv([executable, *argv[1:]])
        return subprocess.Popen(argv, executable=executable, **kwargs)
    path = env.get("PATH", "")
    if enter_home:
        executable, argv = build_home_argv(user.home, executable, argv, path)
    dropped = _setpriv_argv(user, executable, argv, path) if os.geteuid() == 0 else None
    if dropped is not None:
        executable, argv = dropped[0], dropped
        if cgroup is not None:
            executable, argv = SH, cgroup.join_argv(argv)
    elif os.geteuid() == 0 or user.uid != os.geteuid():
        kwargs.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
    return subprocess.Popen(argv, executable=executable, **kwargs)


def signal_as_user(user: LocalUser, pgid: int, signum: int) -> None:
    """Blocking (executor): `kill -SIG -- -pgid` with the user's credentials.

    The kernel then decides with the user's rights: a setuid program that switched all
    its ids to root (sudo's command, su) stays out of reach, as under sshd. A pgid that
    was re-used meanwhile is harmless for the same reason. Errors (no such group, not
    permitted) are the user's to see, as with kill(1): logged at debug only."""
    with open(os.devnull, "rb+") as devnull:
        proc = spawn(user, KILL, [KILL, "-s", str(signum), "--", f"-{pgid}"], {"PATH": USER_PATH},
                     stdin=devnull.fileno(), stdout=devnull.fileno(), stderr=devnull.fileno(),
                     new_session=True, enter_home=False)
    rc = proc.wait()
    if rc != 0:
        event(log, "session.signal-failed", level=logging.DEBUG, user=user.name, pgid=pgid, signal=signum, rc=rc)


def reset_inherited_signals() -> None:
    """SIG_IGN survives exec: make sure the daemon does not ignore what children need.

    SIGPIPE is deliberately left ignored in the daemon (Python's default): with it at
    SIG_DFL a write to a child's closed pipe would kill the whole server. Children get
    SIGPIPE back through Popen(restore_signals=True).
    """
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
