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
`Popen(user=)` stays for what setpriv cannot do (see `setpriv_program`) and for hosts
without setpriv.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..logs import event
from ..users import LocalUser
from ._cgroup import SH, LoginCgroup

log = logging.getLogger("meshsshd.session")

USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Client-supplied variables we pass on (OpenSSH's AcceptEnv LANG LC_* on Debian, plus
# harmless presentation variables). Never LD_*, PATH, IFS, SHELL, HOME, ...
ACCEPT_ENV = frozenset({"LANG", "LANGUAGE", "TERM", "TZ", "COLORTERM", "EDITOR", "VISUAL", "PAGER", "LESS", "LESSCHARSET"})
ACCEPT_ENV_PREFIXES = ("LC_",)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_ENV_VALUE = 4096

SETSID = shutil.which("setsid") or "/usr/bin/setsid"
SETPRIV = shutil.which("setpriv")   # util-linux; None: every session fork()s the daemon
PAM_DIR = "/etc/pam.d"
PAM_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pam_helper.py")


def pam_service() -> str | None:
    """The PAM service for sessions, when PAM is configured for meshsshd (blocking stat).

    `MESHSSHD_PAM_SERVICE` overrides the name "meshsshd" (tests use a throwaway service so
    they do not change what other daemons on the machine do).
    """
    name = os.environ.get("MESHSSHD_PAM_SERVICE", "meshsshd")
    if "/" in name or not os.path.isfile(os.path.join(PAM_DIR, name)):
        return None
    return name


def is_accepted_env(name: str, value: str) -> bool:
    if not _ENV_NAME.match(name) or name.startswith("LD_"):
        return False
    if "\0" in value or len(value) > MAX_ENV_VALUE:
        return False
    return name in ACCEPT_ENV or name.startswith(ACCEPT_ENV_PREFIXES)


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
) -> dict[str, str]:
    """The child's whole environment: nothing leaks from the daemon's own."""
    env = {k: v for k, v in client_env.items() if is_accepted_env(k, v)}
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
    cannot be reached at all: such sessions (no PTY, no command: `ssh -T`, VS Code
    Remote) keep Popen(user=). They are one per interactive connection, not the hot
    path, and the alternative, `bash -c 'exec -a "$0" "$@"'`, would put SHLVL=0 and PWD
    into the user's environment and require bash.
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
    cgroup: LoginCgroup | None = None,
) -> subprocess.Popen:
    """Blocking fork/exec as the user (or as root for the PAM helper, which drops
    privileges itself); run it in an executor. Raises OSError.

    As root the drop goes through setpriv (vfork); where it cannot, and in a daemon not
    running as root, through Popen(user=). Both chdir (as root, as before), set the umask
    and the session, restore signal dispositions and close other fds the same way.

    With `cgroup`, the child joins it before exec as root (`LoginCgroup.join_argv`); on
    the Popen(user=) path that is impossible: the caller moves it in after the start
    (`LoginCgroup.add`, a no-op for a child that joined)."""
    kwargs: dict = dict(
        stdin=stdin, stdout=stdout, stderr=stderr, env=env,
        close_fds=True, restore_signals=True, umask=0o022,
        start_new_session=new_session,
    )
    if as_root:
        if cgroup is not None:
            executable, argv = SH, cgroup.join_argv([executable, *argv[1:]])
        return subprocess.Popen(argv, executable=executable, cwd="/", **kwargs)
    dropped = _setpriv_argv(user, executable, argv, env.get("PATH", "")) if os.geteuid() == 0 else None
    if dropped is not None:
        executable, argv = dropped[0], dropped
        if cgroup is not None:
            executable, argv = SH, cgroup.join_argv(argv)
    elif os.geteuid() == 0 or user.uid != os.geteuid():
        kwargs.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
    kwargs["executable"] = executable
    cwd = user.home if os.path.isdir(user.home) else "/"
    try:
        return subprocess.Popen(argv, cwd=cwd, **kwargs)
    except (PermissionError, FileNotFoundError) as exc:
        if cwd != "/" and getattr(exc, "filename", None) in (cwd, None):
            return subprocess.Popen(argv, cwd="/", **kwargs)
        raise


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
