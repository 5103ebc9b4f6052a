"""Local accounts: POSIX name validation and password-database lookups.

Lookups go through NSS (which may mean LDAP or sssd over the network), so async callers
run `lookup_user_sync` in an executor (the server, together with the account checks of
`account.py`). The group list is computed here, in
the daemon, because the child process must not run NSS code between fork and exec.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field

# POSIX portable filename characters, not starting with '-', at most 32 bytes (as useradd).
_NAME_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,31}$")
_NAME_RE_DOLLAR = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,30}\$$")  # Samba machine accounts


def is_valid_username(name: str) -> bool:
    if name in (".", ".."):
        return False
    return bool(_NAME_RE.match(name) or _NAME_RE_DOLLAR.match(name))


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]
    passwd: pwd.struct_passwd | None = field(default=None, compare=False, repr=False)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def lookup_user_sync(name: str) -> LocalUser | None:
    """None when the name is invalid or unknown."""
    if not is_valid_username(name):
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return LocalUser(
        name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir or "/",
        shell=pw.pw_shell or "/bin/sh", groups=groups, passwd=pw,
    )

