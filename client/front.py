"""`meshssh`'s entry point: hand simple requests to the control master, the rest to the CLI.

Most of a short `meshssh host true` used to be Python starting and importing asyncssh,
click and cryptography, then a fresh login. This module imports only the standard
library (and the stdlib-only `meshssh_client.options`, `meshssh_client.control`, `meshssh_client.detect`), so:

- `meshssh [-l user] [-p port] [-t|-T|-tt] [-q] [-n] [-s] [user@]host [command ...]`
  and `meshssh proxy HOST PORT [--user LOGIN]` go to the control master (client/mux_master.py),
  started detached when none runs, with our stdin/stdout/stderr passed along; we keep
  the local terminal (raw mode, SIGWINCH) and exit with the status the master reports;
- `meshssh detect HOST PORT` (run by the OpenSSH drop-in for every `ssh`) runs here;
- `meshssh control status|stop` runs here;
- everything else — other options, sub-commands, MESHSSH_CONTROL=no, or a master that
  cannot be reached or asks for it before the session started — runs in this process
  through `meshssh_client.cli.main`, exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import Any

from . import control

# The options of the simple form (see SIMPLE_FIELDS): everything else keeps state in the
# process (forwards, agents, keys, verbosity) and runs in-process.
_DEFAULTS = dict(local=(), remote=(), dynamic=(), agent=None, identities=(), verbose=0,
                 bind_address=None, address_family=0, options=(), ssh_jwt_cache_ttl=None,
                 no_cache=False, delegate_to=(), delegate_max=None, delegate_confirm=False, no_command=False, send_env=(), set_env=(),
                 warnings=(), tty_override=0)


def _request(argv: list[str]) -> tuple[str, list[str]] | None:
    """(op, argv) for what the master serves, else None."""
    if argv[:1] == ["proxy"] and len(argv) in (3, 5) and argv[2].isdigit() and argv[3:4] in ([], ["--user"]):
        return "proxy", argv  # the drop-in's HOST PORT, or with --user LOGIN to dial early
    from .options import SUBCOMMANDS, first_word, parse_ssh_args

    idx = first_word(argv)
    if idx is None or (idx == 0 and argv[0] in SUBCOMMANDS) or "-d" in argv[:idx]:
        return None
    try:
        args = parse_ssh_args(argv)
    except Exception:  # noqa: BLE001 — the CLI prints the usage message
        return None
    if any(getattr(args, k) != v for k, v in _DEFAULTS.items()):
        return None
    if os.environ.get("MESHSSH_DELEGATE_TO"):
        return None
    return "session", argv


def _logged_in() -> bool:
    """No master for a config directory without a login: the in-process path explains
    (or asks the token broker of a delegated session, docs/delegation.md)."""
    from . import state

    return (state.config_dir() / state.LOGIN_FILE).exists()


class _Hangup(Exception):
    pass


def _hangup(signum: int, frame: Any) -> None:
    raise _Hangup(signum)


class _Terminal:
    """Raw mode for a PTY session, restored however we leave (also SIGTERM/SIGHUP)."""

    def __init__(self) -> None:
        self.saved: Any = None

    def raw(self) -> None:
        import termios
        import tty

        try:
            self.saved = termios.tcgetattr(0)
            tty.setraw(0)
        except termios.error:
            self.saved = None

    def restore(self) -> None:
        if self.saved is not None:
            import termios

            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
            self.saved = None


def via_master(op: str, argv: list[str]) -> int | None:
    """Run the request in the master; its exit code, or None to run it in-process."""
    sock = control.connect_or_start()
    if sock is None:
        return None
    term = _Terminal()
    started = False
    old = {s: signal.signal(s, _hangup) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with sock:
            try:
                head = control.encode({"op": op, "argv": argv, "environ": dict(os.environ)})
                sent = socket.send_fds(sock, [head[:65536]], [0, 1, 2])
                sock.sendall(head[sent:])
            except OSError:  # e.g. stdin closed: nothing to pass
                return None
            lines = control.LineReader(sock)

            def winch(signum: int, frame: Any) -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(control.encode({"resize": True}))

            while True:
                try:
                    msg = lines.read()
                except (OSError, ValueError):
                    msg = None
                if msg is None:
                    if not started:
                        return None
                    sys.stderr.write("meshssh: the control master went away\n")
                    return 255
                if "fallback" in msg and not started:
                    return None
                if msg.get("started"):
                    started = True
                    if msg.get("raw"):
                        term.raw()
                        signal.signal(signal.SIGWINCH, winch)
                        sock.sendall(control.encode({"raw": True}))
                elif "exit" in msg:
                    return int(msg["exit"])
    except _Hangup:
        return 255
    except KeyboardInterrupt:
        return 130
    finally:
        term.restore()
        for fd in (0, 1, 2):  # the master's event loop set our shared descriptions non-blocking
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
        for s, h in old.items():
            signal.signal(s, h)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["control"]:
        sys.exit(control.control_command(argv[1:]))
    if len(argv) == 3 and argv[0] == "detect" and argv[2].isdigit():
        from .detect import detect

        sys.exit(detect(argv[1], int(argv[2])))
    if control.enabled() and _logged_in():
        req = _request(argv)
        if req is not None:
            code = via_master(*req)
            if code is not None:
                sys.exit(code)
    from .cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
