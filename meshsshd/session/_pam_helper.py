"""Per-session PAM helper: open a PAM session, run the user's process, close the session.

Started by the daemon (as root, as a standalone script: `python -I -S _pam_helper.py ...`,
importing only the standard library) when /etc/pam.d/<service> exists. PAM session
modules act on the calling process (pam_loginuid, pam_limits, pam_systemd, pam_env), so
they must run here, in a process that becomes the user's session, never in the daemon.

    pam_start → PAM_TTY/PAM_RHOST → pam_acct_mgmt → pam_setcred(ESTABLISH)
    → pam_open_session → fork: setgroups/setgid/setuid, chdir, execve (with PAM's env)
    → wait (forwarding HUP/INT/QUIT/TERM/USR1/USR2/WINCH to the child)
    → pam_close_session → pam_setcred(DELETE) → pam_end → exit with the child's status,
      or die of the child's signal so the daemon reports exit-signal.

This process is single-threaded, so running Python between fork and exec is safe here.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys

PAM_SUCCESS = 0
PAM_CONV_ERR = 19
PAM_TTY = 3
PAM_RHOST = 4
PAM_ESTABLISH_CRED = 0x2
PAM_DELETE_CRED = 0x4
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
# Signals for the session (from the daemon's killpg, or the terminal hanging up on us as
# its controlling process) are passed on when the child left our process group (a shell
# with job control); otherwise the child got them already.
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_char_p), ("resp_retcode", ctypes.c_int)]


_CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Message)),
                              ctypes.POINTER(ctypes.POINTER(_Response)), ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


def _cdll(soname: str, short: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname)
    except OSError:  # not the usual soname: ask the linker cache (slower: runs ldconfig)
        return ctypes.CDLL(ctypes.util.find_library(short) or soname)


def _load():
    pam = _cdll("libpam.so.0", "pam")
    libc = _cdll("libc.so.6", "c")
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    pam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Conv), ctypes.POINTER(ctypes.c_void_p)]
    pam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    for name in ("pam_acct_mgmt", "pam_setcred", "pam_open_session", "pam_close_session", "pam_end"):
        getattr(pam, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_strerror.restype = ctypes.c_char_p
    pam.pam_getenvlist.argtypes = [ctypes.c_void_p]
    pam.pam_getenvlist.restype = ctypes.POINTER(ctypes.c_char_p)
    return pam, libc


def _conversation(libc):
    """Show informational messages (motd, warnings) on stderr; refuse any prompt."""

    def conv(n, messages, responses, _appdata):
        replies = libc.calloc(n, ctypes.sizeof(_Response))
        if not replies:
            return PAM_CONV_ERR
        for i in range(n):
            msg = messages[i].contents
            if msg.msg_style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                return PAM_CONV_ERR   # no passwords here: authentication was done already
            if msg.msg and msg.msg_style in (PAM_TEXT_INFO, PAM_ERROR_MSG):
                os.write(2, msg.msg + b"\n")
        responses[0] = ctypes.cast(replies, ctypes.POINTER(_Response))
        return PAM_SUCCESS

    return _CONV_FUNC(conv)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshsshd-pam-helper")
    p.add_argument("--service", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--groups", default="")
    p.add_argument("--cwd", default="/")
    p.add_argument("--tty", default="")
    p.add_argument("--rhost", default="")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if len(args.command) < 2:
        p.error("need: -- EXECUTABLE ARGV0 [ARGS...]")
    return args


def _fail(what: str, pam, handle, rc: int) -> None:
    text = pam.pam_strerror(handle, rc).decode(errors="replace")
    os.write(2, f"meshsshd: PAM {what} failed: {text}\r\n".encode())


def main(argv: list[str]) -> int:
    args = _parse(argv)
    pam, libc = _load()
    conv_func = _conversation(libc)
    conv = _Conv(conv_func, None)
    handle = ctypes.c_void_p()
    rc = pam.pam_start(args.service.encode(), args.user.encode(), ctypes.byref(conv), ctypes.byref(handle))
    if rc != PAM_SUCCESS:
        os.write(2, b"meshsshd: PAM start failed\r\n")
        return 1
    if args.tty:
        pam.pam_set_item(handle, PAM_TTY, ctypes.c_char_p(args.tty.encode()))
    if args.rhost:
        pam.pam_set_item(handle, PAM_RHOST, ctypes.c_char_p(args.rhost.encode()))
    rc = pam.pam_acct_mgmt(handle, 0)
    if rc != PAM_SUCCESS:
        _fail("account check", pam, handle, rc)
        pam.pam_end(handle, rc)
        return 1
    pam.pam_setcred(handle, PAM_ESTABLISH_CRED)
    rc = pam.pam_open_session(handle, 0)
    if rc != PAM_SUCCESS:
        _fail("open session", pam, handle, rc)
        pam.pam_setcred(handle, PAM_DELETE_CRED)
        pam.pam_end(handle, rc)
        return 1
    env = dict(os.environ)
    envlist = pam.pam_getenvlist(handle)
    if envlist:
        i = 0
        while envlist[i]:
            key, _, value = envlist[i].decode(errors="replace").partition("=")
            env.setdefault(key, value)   # our own variables (USER, PATH...) win
            i += 1
    groups = [int(g) for g in args.groups.split(",") if g]
    executable, child_argv = args.command[0], args.command[1:]

    pid = os.fork()
    if pid == 0:
        try:
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            os.setgroups(groups or [args.gid])
            os.setgid(args.gid)
            os.setuid(args.uid)
            try:
                os.chdir(args.cwd)   # after the drop: with the user's rights, as sshd
            except OSError as exc:
                os.write(2, f"Could not chdir to home directory {args.cwd}: {exc.strerror}\n".encode())
                os.chdir("/")
            os.execve(executable, child_argv, env)
        except OSError as exc:
            os.write(2, f"meshsshd: cannot run {executable}: {exc.strerror}\r\n".encode())
        os._exit(127)

    def forward(signum, _frame):
        try:
            if os.getpgid(pid) != os.getpgrp():
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    pam.pam_close_session(handle, 0)
    pam.pam_setcred(handle, PAM_DELETE_CRED)
    pam.pam_end(handle, PAM_SUCCESS)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:   # KILL cannot be caught, so has no disposition to reset
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
