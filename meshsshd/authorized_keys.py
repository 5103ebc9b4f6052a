"""A user's `~/.ssh/authorized_keys`, read the way OpenSSH's StrictModes would allow.

Why the checks: the daemon reads the file as root, so a file or directory that someone
other than the user (or root) could write would let that someone add a key and log in
as the user. As in sshd: the file must be a regular file, and it and every directory
from it up to the home directory (up to `/` if the file resolves outside home) must be
owned by the user or root and not group- or world-writable. Otherwise the file is
refused with one log line saying why. The read happens in an executor.

Options: asyncssh enforces `command`, `from`, `permitopen`, `principals`, `no-pty`, `no-port-forwarding`, `no-agent-forwarding`,
`no-X11-forwarding` and `no-touch-required`, but would silently ignore the rest. So each
entry is rewritten first (`rewrite_entry`, pure):
  - `restrict` becomes the `no-*` options it implies, minus any re-enabled by `pty`,
    `port-forwarding`, `agent-forwarding`, `X11-forwarding`, `user-rc`; `restrict`
    itself stays as a flag (asyncssh ignores it) so sessions know to take no client
    environment;
  - `expiry-time` is checked at load time (entries are loaded at each login); an
    expired entry is dropped;
  - `environment` is dropped (sshd's default PermitUserEnvironment=no);
  - `tunnel` and `no-user-rc` are dropped (meshsshd has neither tun forwarding nor ~/.ssh/rc);
  - an entry with `permitlisten`, `verify-required` or `cert-authority` is skipped, since nothing here
    could enforce it (fail closed), as is an entry with an unknown option (as sshd does).
"""

from __future__ import annotations

import asyncio
import calendar
import errno
import logging
import os
import pwd
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from .logs import event

log = logging.getLogger("meshsshd.authorized_keys")

MAX_FILE_BYTES = 1024 * 1024

# OpenSSH option names (case-insensitive there) → the spelling asyncssh looks up.
_KEEP = {
    "command", "from", "permitopen", "principals", "no-agent-forwarding",
    "no-port-forwarding", "no-pty", "no-x11-forwarding", "no-touch-required",
}
_CANONICAL = {"no-x11-forwarding": "no-X11-forwarding", "x11-forwarding": "X11-forwarding"}
_RESTRICTABLE = ("agent-forwarding", "port-forwarding", "pty", "user-rc", "x11-forwarding")
_DROP = {"environment", "tunnel", "no-user-rc", "user-rc"}
# cert-authority: meshsshd's key check (connection.py) matches a presented key against the
# file's keys; a certificate signed by a listed CA never matched, so every such login was
# refused as "unknown-key". Skipped, with its reason logged, until user certificates
# (principals, validity, critical options) are checked as a whole.
_UNENFORCEABLE = {"permitlisten", "verify-required", "cert-authority"}


class EntrySkipped(ValueError):
    """An authorized_keys line that is not used; the message says why."""


def _split_options(line: str) -> tuple[list[str], str]:
    """"opt1,opt2=\"a b\" ssh-ed25519 AAAA..." → (["opt1", 'opt2="a b"'], "ssh-ed25519 AAAA...").

    Same quoting rules as sshd/asyncssh: a double quote toggles quoting, a backslash
    escapes the next character; the options end at the first unquoted blank. The raw
    text of each option is kept so that asyncssh sees exactly what the user wrote.
    """
    options: list[str] = []
    current = ""
    quoted = escaped = False
    index = len(line)
    for i, ch in enumerate(line):
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == '"':
            current += ch
            quoted = not quoted
        elif quoted:
            current += ch
        elif ch in " \t":
            index = i
            break
        elif ch == ",":
            options.append(current)
            current = ""
        else:
            current += ch
    if quoted or escaped:
        raise EntrySkipped("unbalanced quote or backslash in options")
    options.append(current)
    return options, line[index:].strip()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value.replace('\\"', '"')


def _expiry(value: str) -> float:
    """sshd's expiry-time: YYYYMMDD[HHMM[SS]], local time, or UTC with a trailing Z."""
    utc = value.endswith(("Z", "z"))
    digits = value[:-1] if utc else value
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        raise EntrySkipped(f"bad expiry-time {value!r}")
    try:
        parsed = time.strptime(digits, formats[len(digits)])
    except ValueError as exc:
        raise EntrySkipped(f"bad expiry-time {value!r}") from exc
    return float(calendar.timegm(parsed)) if utc else time.mktime(parsed)


def _starts_with_key(line: str) -> bool:
    try:
        asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError):
        return False
    return True


def rewrite_entry(line: str, now: float) -> str:
    """One authorized_keys line → the equivalent line asyncssh enforces fully, or
    EntrySkipped. Pure apart from the local time zone used by expiry-time."""
    if _starts_with_key(line):
        return line
    raw_options, rest = _split_options(line)
    if not rest:
        raise EntrySkipped("no key after the options")
    kept: list[str] = []
    restrict = False
    enabled: set[str] = set()
    for raw in raw_options:
        name, eq, value = raw.partition("=")
        lname = name.lower()
        if lname == "restrict" and not eq:
            restrict = True
        elif lname in _RESTRICTABLE and not eq:
            enabled.add(lname)
        elif lname == "expiry-time" and eq:
            if _expiry(_unquote(value)) <= now:
                raise EntrySkipped("expired (expiry-time)")
        elif lname in _DROP:
            continue
        elif lname in _UNENFORCEABLE:
            raise EntrySkipped(f"option {lname} is not supported by meshsshd")
        elif lname in _KEEP:
            kept.append(_CANONICAL.get(lname, lname) + eq + value)
        else:
            raise EntrySkipped(f"unknown option {name[:40]!r}")
    if restrict:
        kept.append("restrict")
        for what in _RESTRICTABLE:
            if what not in enabled and what != "user-rc":
                no = "no-" + _CANONICAL.get(what, what)
                if no not in kept:
                    kept.append(no)
    if not kept:
        return rest
    return ",".join(kept) + " " + rest


@dataclass(frozen=True)
class Parsed:
    keys: asyncssh.SSHAuthorizedKeys | None
    used: int
    skipped: tuple[tuple[int, str], ...]  # (line number, why)


def parse_authorized_keys(text: str, now: float) -> Parsed:
    """The whole file → asyncssh's object, skipping (and reporting) unusable lines."""
    good: list[str] = []
    skipped: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            line = rewrite_entry(line, now)
            asyncssh.import_authorized_keys(line)  # validates this one entry
        except EntrySkipped as exc:
            skipped.append((number, str(exc)))
            continue
        except (ValueError, asyncssh.KeyImportError) as exc:
            skipped.append((number, f"not a valid entry ({str(exc)[:60]})"))
            continue
        good.append(line)
    keys = asyncssh.import_authorized_keys("\n".join(good)) if good else None
    return Parsed(keys, len(good), tuple(skipped))


class StrictModesError(Exception):
    """The file may not be trusted; the message is one line for the log."""


def _check_owner_mode(st: os.stat_result, what: str, uid: int) -> None:
    if st.st_uid not in (0, uid):
        owner = _user_name(st.st_uid)
        raise StrictModesError(f"bad ownership of {what}: owned by {owner}, not the user or root")
    if st.st_mode & 0o022:
        writable = "world" if st.st_mode & 0o002 else "group"
        raise StrictModesError(f"bad modes for {what}: {stat.filemode(st.st_mode)} is {writable}-writable")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_parents(path: Path, home: Path, uid: int, stat_fn: Callable[[str], os.stat_result] = os.stat) -> None:
    """Every directory from the file's up to home (or / outside home) must be safe."""
    under_home = home == path or home in path.parents
    for directory in path.parents:
        st = stat_fn(str(directory))
        if not stat.S_ISDIR(st.st_mode):
            raise StrictModesError(f"{directory} is not a directory")
        _check_owner_mode(st, str(directory), uid)
        if under_home and directory == home:
            return


def read_checked(user: pwd.struct_passwd) -> str | None:
    """The file's text if it exists and passes StrictModes; None if absent; raises
    StrictModesError otherwise. Blocking: run it in an executor."""
    home = Path(os.path.realpath(user.pw_dir))
    nominal = Path(user.pw_dir) / ".ssh" / "authorized_keys"
    try:
        real = Path(os.path.realpath(nominal, strict=True))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StrictModesError(f"cannot resolve {nominal}: {exc.strerror}") from exc
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise StrictModesError(f"cannot open {real}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StrictModesError(f"{real} is not a regular file")
        _check_owner_mode(st, str(real), user.pw_uid)
        check_parents(real, home, user.pw_uid)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise StrictModesError(f"{real} is larger than {MAX_FILE_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _load_sync(user: pwd.struct_passwd, now: float) -> asyncssh.SSHAuthorizedKeys | None:
    path = os.path.join(user.pw_dir, ".ssh", "authorized_keys")
    try:
        text = read_checked(user)
    except StrictModesError as exc:
        event(log, "authorized-keys.refused", logging.WARNING, user=user.pw_name, path=path, why=str(exc))
        return None
    if text is None:
        return None
    parsed = parse_authorized_keys(text, now)
    if parsed.skipped:
        event(log, "authorized-keys.entries-skipped", logging.WARNING, user=user.pw_name, path=path,
              skipped=[f"line {n}: {why}" for n, why in parsed.skipped], used=parsed.used)
    if parsed.keys is None:
        event(log, "authorized-keys.refused", logging.WARNING, user=user.pw_name, path=path,
              why="no usable entries")
    return parsed.keys


async def load_authorized_keys(user: pwd.struct_passwd) -> asyncssh.SSHAuthorizedKeys | None:
    """The user's authorized keys, or None (absent, unsafe, or nothing usable)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _load_sync, user, time.time())
