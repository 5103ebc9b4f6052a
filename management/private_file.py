"""Small secrets in the data directory (`issuer.secret`, `peer-box.key`).

Created 0600 with O_EXCL and O_NOFOLLOW (never overwritten: a replaced secret would
orphan what was sealed or proven with the old one), fsynced. Read only when safe, the way
OpenSSH treats private key files: a symlink, something other than a regular file, a file
owned by another user, or one that group or others may use is refused. The checks run on
the opened descriptor, so swapping the path after a stat() cannot fool them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

_MAX_BYTES = 256   # every such secret is a line of base64


def create_private(path: Path, text: str) -> None:
    """Write `text` to the new file `path`; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_private(path: Path, what: str, error: type[Exception]) -> str | None:
    """The stripped text of `path`, None when there is no such file; `error(message)`
    when it is unsafe or unreadable (`what` names it in the message)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"cannot open the {what} {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise error(f"{path} belongs to uid {st.st_uid}, not to the user meshmgmt runs as")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(f"{path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        return f.read(_MAX_BYTES).decode("ascii", errors="replace").strip()


def load_or_create_private(path: Path, make: Callable[[], str], what: str, error: type[Exception]) -> str:
    """The text of `path`, created from `make()` first when missing; when two processes
    create it at once, the first one's file wins and both return it."""
    existing = read_private(path, what, error)
    if existing is not None:
        return existing
    try:
        create_private(path, make())
    except FileExistsError:
        pass
    except OSError as exc:
        raise error(f"cannot create the {what} {path}: {exc.strerror}") from exc
    text = read_private(path, what, error)
    assert text is not None
    return text
