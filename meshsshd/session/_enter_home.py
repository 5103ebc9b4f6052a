"""Enter the home directory as the user, then exec the session's program with its argv[0].

Run by path (`python -I -S _enter_home.py HOME EXECUTABLE ARGV0 [ARGS...]`, standard
library only) after the privilege drop, for the programs whose argv[0] `/bin/sh` cannot
set (a login shell's `-bash`); `_spawn.ENTER_HOME` does the same for all others. The
order and the message are sshd's: chdir with the user's own rights, and when that fails
say so and start in `/`.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        os.write(2, b"usage: _enter_home.py HOME EXECUTABLE ARGV0 [ARGS...]\n")
        return 2
    home, executable, child_argv = argv[0], argv[1], argv[2:]
    try:
        os.chdir(home)
    except OSError as exc:
        os.write(2, f"Could not chdir to home directory {home}: {exc.strerror}\n".encode())
        os.chdir("/")
    try:
        os.execv(executable, child_argv)
    except OSError as exc:
        os.write(2, f"meshsshd: cannot run {executable}: {exc.strerror}\n".encode())
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
