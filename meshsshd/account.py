"""Account checks at login that do not depend on PAM: account expiry and nologin.

sshd without PAM refuses an account whose shadow expiry date has passed and, while
/etc/nologin exists, every login but root's, showing the file's text. meshsshd makes the
same checks for every login method, before authentication succeeds, whether or not PAM
is configured: the PAM helper's account stack only runs when a session starts, so a
forwarding-only connection (`ssh -N -L`) would never meet it.

What applies to a login without a password (JWT, public key, "none"):
  - sp_expire (days since 1970-01-01, `chage -E`, `usermod --expiredate`): refused from
    that day on, as pam_unix and login(1) count it; 0 counts as expired, empty as never.
  - Password aging (sp_lstchg, sp_max, sp_inact) does not: no password is used, which is
    also what sshd without PAM does for key logins. With PAM configured, pam_unix's
    account check does apply it when a session starts.
  - A locked password ("!" in shadow, `passwd -l`) does not either: passwd(1) documents
    that locking the password does not disable the account; `usermod --expiredate 1` does.

`decide` is pure; `read_account_sync` reads the files (blocking: the server runs it in
the executor job that looks the user up, so a login costs no extra hop).
Only /etc/shadow is read, not NSS: accounts from LDAP/sssd need PAM for their expiry.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .users import LocalUser

SHADOW = Path("/etc/shadow")
MAX_NOLOGIN_BYTES = 4096
DAY = 86400
NOLOGIN_DEFAULT_TEXT = "logins are disabled on this host (nologin)"


class AccountUnreadable(Exception):
    """The account's state could not be read; the login is refused (fail closed)."""


@dataclass(frozen=True)
class AccountState:
    """What the checks need, read once per login attempt."""

    expire_day: int | None = None     # sp_expire; None: never, or no shadow entry
    nologin: str | None = None        # text of the first nologin file found; None: none exists
    error: str | None = None          # why the state could not be read


@dataclass(frozen=True)
class AccountDecision:
    allowed: bool
    reason: str     # "allowed" | "account-expired" | "nologin" | "account-unreadable"
    message: str    # for the user


ALLOWED = AccountDecision(True, "allowed", "allowed")


def decide(state: AccountState, *, is_root: bool, today: int) -> AccountDecision:
    """today: days since 1970-01-01 (UTC), as shadow counts them."""
    if state.error is not None:
        return AccountDecision(False, "account-unreadable", "your account cannot be checked; try again later")
    if state.expire_day is not None and today >= state.expire_day:
        return AccountDecision(False, "account-expired",
                               "your account has expired; please contact your system administrator")
    if state.nologin is not None and not is_root:
        return AccountDecision(False, "nologin", state.nologin.strip() or NOLOGIN_DEFAULT_TEXT)
    return ALLOWED


def shadow_expiry(text: str, name: str) -> int | None:
    """sp_expire of `name` in shadow(5) text; None when absent or empty. AccountUnreadable
    when the field is not a number (a broken entry must not mean "never expires")."""
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] != name:
            continue
        if len(fields) < 8 or not fields[7].strip():
            return None
        try:
            day = int(fields[7])
        except ValueError as exc:
            raise AccountUnreadable(f"shadow entry of {name}: expiry {fields[7][:20]!r} is not a number") from exc
        return None if day == -1 else day
    return None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_shadow(path: Path) -> str | None:
    """Raw os calls: this runs at every login (pathlib's read_text cost 6× as much)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        if os.geteuid() != 0:   # a daemon not running as root logs in only as itself
            return None
        raise
    try:
        return _read_all(fd).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _read_nologin(files: Sequence[Path]) -> str | None:
    for path in files:
        if not os.access(path, os.F_OK):   # the usual case, without an exception
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):   # removed just now
                continue
            return NOLOGIN_DEFAULT_TEXT   # it exists but cannot be read: still no logins
        try:
            data = os.read(fd, MAX_NOLOGIN_BYTES)
        except OSError:
            data = b""
        finally:
            os.close(fd)
        return data.decode("utf-8", errors="replace").replace("\0", "")
    return None


def read_account_sync(user: LocalUser, nologin_files: Sequence[Path], shadow: Path = SHADOW) -> AccountState:
    """Blocking: the user's shadow expiry and the nologin text."""
    nologin = _read_nologin(nologin_files)
    try:
        text = _read_shadow(shadow)
        expire = shadow_expiry(text, user.name) if text is not None else None
    except (OSError, AccountUnreadable) as exc:
        return AccountState(nologin=nologin, error=str(exc))
    return AccountState(expire_day=expire, nologin=nologin)

