"""The local terminal: its modes as SSH `pty-req` opcodes, and raw mode that is always
undone (the interactive client and detached-session attach both need them)."""

from __future__ import annotations

import contextlib
from typing import Any

_TERM_FLAGS = (  # (PTY opcode name, termios flag group index, flag name)
    ("IGNPAR", 0, "IGNPAR"), ("PARMRK", 0, "PARMRK"), ("INPCK", 0, "INPCK"),
    ("ISTRIP", 0, "ISTRIP"), ("INLCR", 0, "INLCR"), ("IGNCR", 0, "IGNCR"),
    ("ICRNL", 0, "ICRNL"), ("IXON", 0, "IXON"), ("IXANY", 0, "IXANY"), ("IXOFF", 0, "IXOFF"),
    ("IMAXBEL", 0, "IMAXBEL"), ("IUTF8", 0, "IUTF8"),
    ("ISIG", 3, "ISIG"), ("ICANON", 3, "ICANON"), ("ECHO", 3, "ECHO"), ("ECHOE", 3, "ECHOE"),
    ("ECHOK", 3, "ECHOK"), ("ECHONL", 3, "ECHONL"), ("NOFLSH", 3, "NOFLSH"),
    ("TOSTOP", 3, "TOSTOP"), ("IEXTEN", 3, "IEXTEN"), ("ECHOCTL", 3, "ECHOCTL"),
    ("ECHOKE", 3, "ECHOKE"), ("OPOST", 1, "OPOST"), ("ONLCR", 1, "ONLCR"),
    ("CS7", 2, "CS7"), ("CS8", 2, "CS8"), ("PARENB", 2, "PARENB"), ("PARODD", 2, "PARODD"),
)
_TERM_CHARS = ("VINTR", "VQUIT", "VERASE", "VKILL", "VEOF", "VEOL", "VEOL2", "VSTART",
               "VSTOP", "VSUSP", "VREPRINT", "VWERASE", "VLNEXT", "VDISCARD")


def local_term_modes(fd: int) -> dict[int, int]:
    """The local terminal's modes as SSH pty-req opcodes, as OpenSSH sends them."""
    import termios

    import asyncssh

    try:
        attrs = termios.tcgetattr(fd)
    except termios.error:
        return {}
    modes: dict[int, int] = {}
    for name in _TERM_CHARS:
        op = getattr(asyncssh, f"PTY_{name}", None)
        idx = getattr(termios, name, None)
        if op is not None and idx is not None:
            c = attrs[6][idx]
            modes[op] = c[0] if isinstance(c, bytes) and c else (c if isinstance(c, int) else 255)
    for name, group, flag in _TERM_FLAGS:
        op = getattr(asyncssh, f"PTY_{name}", None)
        bit = getattr(termios, flag, None)
        if op is not None and bit is not None:
            modes[op] = 1 if attrs[group] & bit else 0
    return modes


class RawTerminal:
    """Raw mode on entry, the saved settings back on exit — whatever happens."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: Any = None

    def __enter__(self) -> RawTerminal:
        import termios
        import tty

        try:
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        except termios.error:
            self.saved = None
        return self

    def __exit__(self, *exc: Any) -> None:
        import termios

        if self.saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
