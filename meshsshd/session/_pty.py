"""Pseudo-terminals for shell sessions: allocation, ownership, modes, size, break.

The client's `pty-req` carries RFC 4254 terminal modes; asyncssh parses them but applies
nothing, so `apply_modes` translates them to termios (pure, tested on lists).
"""

from __future__ import annotations

import fcntl
import grp
import os
import struct
import termios
from collections.abc import Mapping

# RFC 4254 section 8 opcodes → termios names.
_CC = {1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2",
       8: "VSTART", 9: "VSTOP", 10: "VSUSP", 12: "VREPRINT", 13: "VWERASE", 14: "VLNEXT",
       18: "VDISCARD"}
_IFLAG = {30: "IGNPAR", 31: "PARMRK", 32: "INPCK", 33: "ISTRIP", 34: "INLCR", 35: "IGNCR",
          36: "ICRNL", 37: "IUCLC", 38: "IXON", 39: "IXANY", 40: "IXOFF", 41: "IMAXBEL", 42: "IUTF8"}
_LFLAG = {50: "ISIG", 51: "ICANON", 52: "XCASE", 53: "ECHO", 54: "ECHOE", 55: "ECHOK",
          56: "ECHONL", 57: "NOFLSH", 58: "TOSTOP", 59: "IEXTEN", 60: "ECHOCTL", 61: "ECHOKE",
          62: "PENDIN"}
_OFLAG = {70: "OPOST", 71: "OLCUC", 72: "ONLCR", 73: "OCRNL", 74: "ONOCR", 75: "ONLRET"}
_CFLAG = {90: "CS7", 91: "CS8", 92: "PARENB", 93: "PARODD"}
_ISPEED, _OSPEED = 128, 129
_VDISABLE = 255
_MAX_WINSZ = 0xFFFF   # struct winsize fields are unsigned short


def _bits(table: Mapping[int, str]) -> dict[int, int]:
    return {op: getattr(termios, name) for op, name in table.items() if hasattr(termios, name)}


_IFLAG_BITS, _OFLAG_BITS, _LFLAG_BITS, _CFLAG_BITS = map(_bits, (_IFLAG, _OFLAG, _LFLAG, _CFLAG))
_CC_IDX = _bits(_CC)


def _speed_const(baud: int) -> int | None:
    return getattr(termios, f"B{baud}", None)


def apply_modes(attrs: list, modes: Mapping[int, int]) -> list:
    """termios.tcgetattr-style list with the client's modes applied; unknown ones ignored."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    cc = list(cc)
    for op, value in modes.items():
        if op in _CC_IDX:
            cc[_CC_IDX[op]] = (b"\0" if value == _VDISABLE else bytes([value & 0xFF])) if isinstance(cc[0], bytes) else (0 if value == _VDISABLE else value & 0xFF)
        elif op in _IFLAG_BITS:
            iflag = (iflag | _IFLAG_BITS[op]) if value else (iflag & ~_IFLAG_BITS[op])
        elif op in _LFLAG_BITS:
            lflag = (lflag | _LFLAG_BITS[op]) if value else (lflag & ~_LFLAG_BITS[op])
        elif op in _OFLAG_BITS:
            oflag = (oflag | _OFLAG_BITS[op]) if value else (oflag & ~_OFLAG_BITS[op])
        elif op in (90, 91):  # character size
            if value:
                cflag = (cflag & ~termios.CSIZE) | _CFLAG_BITS[op]
        elif op in _CFLAG_BITS:
            cflag = (cflag | _CFLAG_BITS[op]) if value else (cflag & ~_CFLAG_BITS[op])
        elif op == _ISPEED and _speed_const(value) is not None:
            ispeed = _speed_const(value)
        elif op == _OSPEED and _speed_const(value) is not None:
            ospeed = _speed_const(value)
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _tty_gid() -> int | None:
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return None


class PTY:
    """A master/slave pair; the daemon keeps the master, the child gets the slave."""

    def __init__(self, uid: int, size: tuple[int, int, int, int], modes: Mapping[int, int]) -> None:
        self.master, self.slave = os.openpty()
        try:
            self.name = os.ttyname(self.slave)
            gid = _tty_gid()
            os.fchown(self.slave, uid, gid if gid is not None else -1)
            os.fchmod(self.slave, 0o620)
            if modes:
                termios.tcsetattr(self.slave, termios.TCSANOW, apply_modes(termios.tcgetattr(self.slave), modes))
            self.resize(*size)
            os.set_blocking(self.master, False)
        except BaseException:
            self.close()
            raise

    def resize(self, cols: int, rows: int, xpix: int = 0, ypix: int = 0) -> None:
        """TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground job.
        SSH sends 32-bit sizes, the kernel keeps 16 bits: larger values are clamped (as
        sshd), never an error that would hang the channel or drop the connection."""
        if cols and rows:
            size = (min(v, _MAX_WINSZ) for v in (rows, cols, xpix, ypix))
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", *size))

    def send_break(self, msec: int) -> None:
        termios.tcsendbreak(self.master, 0)

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
