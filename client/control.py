"""The control master's socket: where it lives, who may use it, how a front talks to it.

Like OpenSSH's ControlMaster/ControlPersist (and its PROTOCOL.mux, which passes the
client's stdio descriptors to the master), a `meshssh` front hands its stdin, stdout
and stderr to a resident per-user master (client/mux_master.py) with SCM_RIGHTS,
together with one JSON request; the master runs the session on a pooled, already
authenticated connection and answers with JSON lines:

    front → master   {"op": "session"|"proxy", "argv": [...], "environ": {...}} + 3 fds
                     {"op": "status"} | {"op": "stop"}
                     {"resize": true}            the local window changed (SIGWINCH)
                     {"raw": true}               the local tty is in raw mode now
    master → front   {"started": true, "raw": bool}   the session runs; no fallback any more
                     {"exit": N}                 the exit status; messages went to stderr
                     {"fallback": "why"}         run in-process instead (before "started")
                     {"status": {...}} | {"stopping": true}

The socket is `control.sock` in the client's config directory (0700, client/state.py),
or `control-<hash of that directory>.sock` in `$XDG_RUNTIME_DIR/meshssh/` when the
runtime directory is the user's own. The master checks SO_PEERCRED on every
connection, and the front checks the master's before it sends anything (its stdio
descriptors and environment would otherwise go to whoever listens there). Stdlib only: the front imports this on every `meshssh` run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

from . import state

CONTROL_ENV = "MESHSSH_CONTROL"  # "no": never use (or start) a master
PERSIST_ENV = "MESHSSH_CONTROL_PERSIST"  # seconds the master stays without work
DEFAULT_PERSIST = 600.0  # like ControlPersist=10m
START_WAIT = 5.0  # how long a front waits for a master it started
MAX_LINE = 1 << 20
_UCRED = struct.Struct("3i")


def enabled(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(CONTROL_ENV, "").strip().lower() not in ("no", "0", "off", "false")


def persist_seconds(configured: float | None = None) -> float:
    """MESHSSH_CONTROL_PERSIST, else `configured` (config.toml's `control_persist`), else
    the default."""
    default = DEFAULT_PERSIST if configured is None else configured
    try:
        return max(float(os.environ.get(PERSIST_ENV, default)), 0.0)
    except ValueError:
        return default


def _private_dir(path: Path) -> bool:
    """Ours, and nobody else may write into it."""
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def socket_path() -> Path:
    """One master per user and config directory (a second login elsewhere gets its own)."""
    cfg = state.config_dir()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private_dir(Path(runtime)):
        digest = hashlib.sha256(str(cfg.absolute()).encode()).hexdigest()[:16]
        return Path(runtime) / "meshssh" / f"control-{digest}.sock"
    return cfg / "control.sock"


def ensure_socket_dir(path: Path) -> None:
    """Create the socket's directory 0700; refuse one that others could write into."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private_dir(path.parent):
        raise OSError(f"{path.parent} is not a private directory of this user")


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return uid


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Blocking JSON-line reader for the front (the master uses asyncio streams)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise OSError("control message too long")
        line, self.buf = self.buf.split(b"\n", 1)
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise OSError("bad control message")
        return doc


class ForeignMaster(OSError):
    """The socket is served by another user: they would get our stdio and our environment."""


def connect(path: Path | None = None) -> socket.socket | None:
    """A connection to the running master, or None when there is none; ForeignMaster
    when whoever listens there is not us (checked before a byte or a descriptor goes out,
    as the master checks its callers)."""
    path = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        uid = peer_uid(sock)
    except OSError:
        sock.close()
        return None
    if uid != os.geteuid():
        sock.close()
        raise ForeignMaster(f"{path} is served by uid {uid}, not by you (uid {os.geteuid()})")
    return sock


def _warn_foreign(exc: ForeignMaster) -> None:
    sys.stderr.write(f"meshssh: not using the control master: {exc}; remove that socket\n")


def connect_or_start() -> socket.socket | None:
    """The running master, or a newly started one; None if neither works in time."""
    path = socket_path()
    try:
        sock = connect(path)
        if sock is not None:
            return sock
        try:
            ensure_socket_dir(path)
            _spawn_master(path)
        except OSError:
            return None
        deadline = time.monotonic() + START_WAIT
        delay = 0.005
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            sock = connect(path)
            if sock is not None:
                return sock
    except ForeignMaster as exc:
        _warn_foreign(exc)
    return None


def _spawn_master(path: Path) -> None:
    """Start `python -m meshssh_client.mux_master` detached: its own session, stdio on /dev/null
    (stderr to its log), not our child (double fork), so our exit does not touch it."""
    log = path.with_suffix(".log")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(err, 2)
            os.closerange(3, 65536)
            # It runs in "/": a relative MESHSSH_CONFIG_DIR must keep naming the same place.
            os.environ[state.CONFIG_DIR_ENV] = str(state.config_dir().absolute())
            os.chdir("/")
            os.execv(sys.executable, [sys.executable, "-m", "meshssh_client.mux_master"])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def ask(op: str) -> dict[str, Any] | None:
    """Send a fd-less request (status, stop) to a running master; its answer or None."""
    try:
        sock = connect()
    except ForeignMaster as exc:
        _warn_foreign(exc)
        return None
    if sock is None:
        return None
    with sock:
        try:
            sock.settimeout(10)
            sock.sendall(encode({"op": op}))
            return LineReader(sock).read()
        except (OSError, ValueError):
            return None


def stop_master() -> bool:
    """Ask the master to exit (logout does); True if one was running."""
    return ask("stop") is not None


def control_command(argv: list[str]) -> int:
    """`meshssh control status|stop`."""
    if argv not in (["status"], ["stop"]):
        sys.stderr.write("usage: meshssh control status|stop\n")
        return 2
    if argv == ["stop"]:
        if stop_master():
            sys.stderr.write("Control master stopped.\n")
            return 0
        sys.stderr.write("No control master running.\n")
        return 1
    reply = ask("status")
    if reply is None:
        sys.stderr.write(f"No control master running ({socket_path()}).\n")
        return 1
    st = reply.get("status", {})
    sys.stdout.write(
        f"Control master running (pid {st.get('pid')}), socket {socket_path()}\n"
        f"connections: {st.get('connections', 0)}, sessions in progress: {st.get('active', 0)}, "
        f"sessions served: {st.get('served', 0)}, idle exit after {st.get('persist')} s\n")
    return 0
