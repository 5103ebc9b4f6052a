"""The peer's state directory: what `meshsshd up` keeps between runs, and how it writes it.

Layout (default /var/lib/meshsshd; directory mode 0755 so an unprivileged client can read
status.json, every secret 0600):

    wireguard.key        WireGuard private key, base64 (0600) — created once
    ssh_host_*_key       SSH host keys (0600) — created once by `meshsshd.hostkeys`
    credential.json      {peer_id, credential, management_url, ...} from registration (0600)
    flags.json           the `up` flags, so a restart or the systemd unit needs none (0600)
    netmap.json          the last network map applied, so a restart without management
                         keeps serving (0600)
    dataplane.json       what the data plane created (interface, table), so `down`
                         cleans up even after a crash (0644)
    status.json          what `meshsshd status` and the client read (0644, no identities)
    sessions.json        live sessions: who is logged in as whom, from where (0600)
    meshsshd.pid         pid of the running daemon (0644)
    events.jsonl         audit events not yet delivered: a journal appended before each
                         event is sent (0600, audit_journal.py)

Every write is atomic (temporary file in the same directory, fsync, rename, fsync of the
directory), so a crash or a full disk never leaves a half-written file behind (the
journal's appends excepted: its replay skips a torn last line); a full disk
becomes a `StateError` that says so. These functions block: daemons call them through
`asyncio.to_thread` (see `write_json_async`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, overload

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import StateError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o755


def atomic_write(path: Path, data: bytes, mode: int = SECRET_MODE) -> None:
    """Replace `path` with `data` in one step; never leaves a partial file."""
    # Unique per call: two writers of the same file (threads of one daemon) must not share it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StateError(
                f"cannot write {path}: the disk is full",
                f"the disk holding {path.parent} is full; free some space",
            ) from exc
        raise StateError(f"cannot write {path}: {exc.strerror}") from exc


def write_json(path: Path, doc: Any, mode: int = SECRET_MODE) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode)


async def write_json_async(path: Path, doc: Any, mode: int = SECRET_MODE) -> None:
    """The same, off the event loop (fsync may take a while)."""
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    await asyncio.to_thread(atomic_write, path, data, mode)


def read_json(path: Path) -> Any | None:
    """The document, or None when the file does not exist; a corrupt file is a StateError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path} is not valid JSON ({exc.msg}); remove it to start over") from exc


@dataclass(frozen=True)
class PeerFlags:
    """The NetBird-style switches; reported to management and persisted in flags.json."""

    allow_server_ssh: bool = False
    enable_ssh_sftp: bool = False
    enable_ssh_local_port_forwarding: bool = False
    enable_ssh_remote_port_forwarding: bool = False
    enable_ssh_root: bool = False
    disable_ssh_auth: bool = False
    disable_ssh_agent_forwarding: bool = False

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeerFlags:
        return cls(**{f.name: bool(data.get(f.name, False)) for f in fields(cls)})


@dataclass(frozen=True)
class UpConfig:
    """Everything `meshsshd up` was told, persisted so the next start needs no flags."""

    management_url: str = ""
    interface: str = "mesh0"
    wireguard_port: int = 51820
    hostname: str = ""
    dataplane: str = "auto"  # auto | wireguard | none
    metrics_listen: str = ""
    endpoints: tuple[str, ...] = ()
    flags: PeerFlags = field(default_factory=PeerFlags)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["endpoints"] = list(self.endpoints)
        d["flags"] = self.flags.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpConfig:
        known = {f.name for f in fields(cls)} - {"flags", "endpoints"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            endpoints=tuple(data.get("endpoints", ())),
            flags=PeerFlags.from_dict(data.get("flags", {}) or {}),
        )

    def merged(self, **overrides: Any) -> UpConfig:
        """Command-line values (those not None) win over the persisted ones."""
        flag_over = {k: v for k, v in overrides.pop("flags", {}).items() if v is not None}
        plain = {k: v for k, v in overrides.items() if v is not None}
        flags = PeerFlags(**{**self.flags.to_dict(), **flag_over})
        base = {**self.to_dict(), **plain, "flags": flags.to_dict()}
        return UpConfig.from_dict(base)


@dataclass(frozen=True)
class Credential:
    """What registration returned: who we are to management and how we prove it."""

    peer_id: str
    credential: str
    management_url: str
    name: str = ""
    fqdn: str = ""
    mesh_ip: str = ""
    network: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Credential:
        known = {f.name for f in fields(cls)}
        return cls(**{k: str(v) for k, v in data.items() if k in known})


class _StateFile:
    """A read-only `StateDir` attribute: the path of one named file inside its root.

    The file layout is a table of names (below) rather than one property per file, so
    adding a file is one line and every path is built the same way.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, state: None, owner: type | None = None) -> _StateFile: ...

    @overload
    def __get__(self, state: StateDir, owner: type | None = None) -> Path: ...

    def __get__(self, state: StateDir | None, owner: type | None = None) -> Path | _StateFile:
        # On the class itself (introspection, autospec) it answers with itself, as a property does.
        return self if state is None else state.root / self.name

    def __set__(self, state: StateDir, value: object) -> None:
        raise AttributeError(f"{self.name}: the state directory layout is fixed")


class StateDir:
    """Paths and small typed accessors over one state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # paths -------------------------------------------------------------------------
    wireguard_key = _StateFile("wireguard.key")
    credential_path = _StateFile("credential.json")
    flags_path = _StateFile("flags.json")
    netmap_path = _StateFile("netmap.json")
    dataplane_path = _StateFile("dataplane.json")
    status_path = _StateFile("status.json")
    sessions_path = _StateFile("sessions.json")  # who is logged in: 0600, not in status.json
    pid_path = _StateFile("meshsshd.pid")
    events_path = _StateFile("events.jsonl")

    # setup -------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the directory (0755: status.json is public, secrets are 0600 each)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.root}: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise StateError(f"state directory {self.root} is not writable")

    def wireguard_keypair(self) -> tuple[str, str]:
        """(private, public) base64 keys; the private key is created once, mode 0600."""
        try:
            text = self.wireguard_key.read_text().strip()
        except FileNotFoundError:
            key = X25519PrivateKey.generate()
            text = base64.b64encode(key.private_bytes_raw()).decode()
            atomic_write(self.wireguard_key, (text + "\n").encode(), SECRET_MODE)
        except OSError as exc:
            raise StateError(f"cannot read {self.wireguard_key}: {exc.strerror}") from exc
        try:
            raw = base64.b64decode(text, validate=True)
            key = X25519PrivateKey.from_private_bytes(raw)
        except ValueError as exc:
            raise StateError(f"{self.wireguard_key} does not hold a WireGuard key") from exc
        public = base64.b64encode(key.public_key().public_bytes_raw()).decode()
        return text, public

    # typed documents ----------------------------------------------------------------
    def load_config(self) -> UpConfig:
        doc = read_json(self.flags_path)
        return UpConfig.from_dict(doc) if isinstance(doc, dict) else UpConfig()

    def save_config(self, config: UpConfig) -> None:
        write_json(self.flags_path, config.to_dict(), SECRET_MODE)

    def load_credential(self) -> Credential | None:
        doc = read_json(self.credential_path)
        if not isinstance(doc, dict) or not doc.get("peer_id") or not doc.get("credential"):
            return None
        return Credential.from_dict(doc)

    def save_credential(self, cred: Credential) -> None:
        write_json(self.credential_path, cred.to_dict(), SECRET_MODE)

    def forget_credential(self) -> None:
        """The credential was deleted by management: drop it and the map it gave us."""
        for path in (self.credential_path, self.netmap_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def load_status(self) -> dict[str, Any] | None:
        doc = read_json(self.status_path)
        return doc if isinstance(doc, dict) else None

    def load_sessions(self) -> list[Any] | None:
        """The live sessions with their identities; None where we may not read them."""
        try:
            doc = read_json(self.sessions_path)
        except StateError:
            return None
        sessions = doc.get("sessions") if isinstance(doc, dict) else None
        return sessions if isinstance(sessions, list) else None

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self) -> None:
        atomic_write(self.pid_path, f"{os.getpid()}\n".encode(), PUBLIC_MODE)

    def remove_pid(self) -> None:
        """Remove the pid file only if it is ours (a second `up` must not erase the first's)."""
        if self.read_pid() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()


def pid_alive(pid: int | None) -> bool:
    """True while the process runs; an exited one its parent has not reaped yet (a zombie)
    counts as gone."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def is_meshsshd(pid: int | None) -> bool:
    """Is `pid` a live meshsshd? Guards `down` against a stale pid file whose number now
    belongs to some other process."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell (another /proc view): trust the pid file
    return b"meshsshd" in cmdline
