"""Where the client keeps its login and caches, and how it writes them safely.

Everything lives in one directory: `$MESHSSH_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/meshssh`, else `~/.config/meshssh` (mode 0700). Files hold tokens, so
each is written 0600 through a temporary file and `rename` — a crash or a second
`meshssh` never leaves a half-written login behind — and refreshes that rotate the
refresh token run under an exclusive `flock` so two processes cannot both spend it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOGIN_FILE = "login.json"  # management URL, endpoints, refresh token / client secret
ACCESS_FILE = "access.json"  # cached access token (login JWT) until shortly before exp
SSH_TOKENS_FILE = "ssh-tokens.json"  # cached per-peer SSH tokens
PEERS_FILE = "peers.json"  # the peer list, cached briefly
LOCK_FILE = "lock"


CONFIG_DIR_ENV = "MESHSSH_CONFIG_DIR"


def config_dir() -> Path:
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "meshssh"


def ensure_dir(path: Path | None = None) -> Path:
    path = path or config_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so readers see the old or the new file, never a mix."""
    import tempfile  # only writers need it; the meshssh front only reads paths

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(name: str, doc: Any, directory: Path | None = None) -> None:
    write_atomic((directory or config_dir()) / name, json.dumps(doc, indent=1).encode())


def read_json(name: str, directory: Path | None = None) -> Any:
    """The parsed file, or None when it is missing or unreadable (caches may vanish)."""
    try:
        return json.loads(((directory or config_dir()) / name).read_text())
    except (OSError, ValueError):
        return None


def remove(name: str, directory: Path | None = None) -> bool:
    try:
        ((directory or config_dir()) / name).unlink()
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def locked(directory: Path | None = None) -> Iterator[None]:
    """Serialise token refreshes across meshssh processes of the same user."""
    d = ensure_dir(directory)
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
