"""Which meshsshd peers run on this machine, for the client on the same machine.

A peer shows other peers which mesh peer a connection comes from by its source address,
so `meshssh` binds its connections to its own peer's mesh address (in single-machine mode
every peer is a loopback address and the system would pick 127.0.0.1). That address is in
the peer's status.json, but the state directory can be anywhere (`--state-dir`). So
`meshsshd up` leaves a pointer to it in a runtime directory the client knows:
`/run/meshsshd/peers` for root's daemons, `$XDG_RUNTIME_DIR/meshsshd/peers` for a user's.
Both directories belong to whoever runs the daemon; what they say only chooses a source
address, which the destination peer checks against its own rules anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_STATE_DIR
from .state import DIR_MODE, PUBLIC_MODE, StateDir, atomic_write, pid_alive

ROOT_POINTERS = Path("/run/meshsshd/peers")


@dataclass(frozen=True)
class LocalPeer:
    name: str
    mesh_ip: str
    management_url: str
    status_path: Path

    def describe(self) -> str:
        return f"{self.name or '?'} {self.mesh_ip}"


def pointer_dirs(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Where pointers are, root's first; the user's own only when it has a runtime dir."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    return (ROOT_POINTERS,) + ((Path(runtime) / "meshsshd" / "peers",) if runtime else ())


def _own_pointer_dir() -> Path | None:
    if os.geteuid() == 0:
        return ROOT_POINTERS
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "meshsshd" / "peers" if runtime else None


def publish(state: StateDir) -> Path | None:
    """Leave a pointer to `state` (None where this user has no runtime directory, or it
    cannot be written: the client then only finds the default state directory)."""
    where = _own_pointer_dir()
    if where is None:
        return None
    root = str(state.root.resolve())
    path = where / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"
    try:
        where.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        _prune(where)
        atomic_write(path, json.dumps({"state_dir": root, "pid": os.getpid()}).encode(), PUBLIC_MODE)
    except OSError:
        return None
    return path


def _prune(where: Path) -> None:
    """Drop the pointers of daemons that died without withdrawing theirs (kill -9)."""
    for pointer in where.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if not _alive(json.loads(pointer.read_text()).get("pid")):
                pointer.unlink()


def withdraw(pointer: Path | None) -> None:
    """Remove our pointer, unless a later `up` on the same state directory replaced it."""
    if pointer is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(pointer.read_text()).get("pid") == os.getpid():
            pointer.unlink()


def status_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The default state directory's status.json, then each pointed-at one (no repeats)."""
    found = [DEFAULT_STATE_DIR / "status.json"]
    for where in pointer_dirs(environ):
        with contextlib.suppress(OSError):
            for pointer in sorted(where.glob("*.json")):
                with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                    path = Path(json.loads(pointer.read_text())["state_dir"]) / "status.json"
                    if path not in found:
                        found.append(path)
    return found


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


def read_peer(path: Path, *, running: bool = True) -> LocalPeer | None:
    """The peer whose status.json this is, if it has a mesh address and (unless
    `running` is False: a file someone named) its daemon runs."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("mesh_ip") or (running and not _alive(doc.get("pid"))):
        return None
    return LocalPeer(str(doc.get("name") or ""), str(doc["mesh_ip"]),
                     str(doc.get("management_url") or "").rstrip("/"), path)


def running_peers(management_url: str = "", environ: Mapping[str, str] | None = None) -> list[LocalPeer]:
    """The live peers on this machine, in `management_url`'s mesh when one is given."""
    want = management_url.rstrip("/")
    peers = [p for p in map(read_peer, status_files(environ)) if p is not None]
    return [p for p in peers if not want or not p.management_url or p.management_url == want]
