"""Detached sessions: commands and PTY shells that outlive the client (and meshsshd).

WinRM's `-InDisconnectedSession`, `Connect-PSSession` and `Receive-PSSession` for the
mesh. Each detached session is owned by a holder process (`session/_holder.py`) that
this module launches: the holder spawns the child as the user, keeps its PTY master or
pipes and a bounded output spool, and answers on a unix socket in
`<state_dir>/sessions/` (mode 0700, root only). The holder is re-parented to init, so
neither a client disconnect nor a restart of meshsshd ends the session; on start the
daemon scans the directory and picks up every holder still alive.

Clients reach it through one reserved subsystem on the ordinary SSH connection,
`meshsshd-sessions@meshsshd`, so the usual JWT authentication and access rules apply.
The client sends one JSON line; the daemon answers one JSON line (`{"ok": true, ...}` or
`{"ok": false, "error": "..."}`), then, for `receive` and `attach`, the session's output
as channel data (stderr as extended data) and finally the session's exit status.

    {"op": "list"}
    {"op": "start", "command": "cmd" | null, "pty": bool, "term": "xterm", "cols": 80, "rows": 24, "env": {}}
    {"op": "kill", "id": ID}          (a finished session is forgotten instead)
    {"op": "receive", "id": ID, "follow": bool}
    {"op": "attach", "id": ID, "cols": 80, "rows": 24}   then input and window-change

Only the identity that started a session, logged in as the same local user, may see or
touch it; anyone else gets "no such session" (existence is not revealed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import asyncssh

from .audit import AuditEvent, AuditSink
from .config import ServerSettings
from .logs import event
from .session import ChildSession, SessionContext, build_child_argv, build_child_env
from .session._cgroup import BASE as CGROUP_BASE
from .session._cgroup import LoginCgroup, cgroup2_root
from .session._pty import PTY
from .session._spawn import build_home_argv, build_pam_argv, pam_service

log = logging.getLogger("meshsshd.detached")

SUBSYSTEM = "meshsshd-sessions@meshsshd"
HOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "session", "_holder.py")
ATTACH_REPLAY = 64 * 1024
_ID = re.compile(r"^[0-9a-f]{12}$")
_HEADER = struct.Struct(">cI")
_MAX_REQUEST = 64 * 1024


# ---- audit ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DetachedStarted(AuditEvent):
    type: ClassVar[str] = "detached.started"
    command: str = ""       # "" for a login shell


@dataclass(frozen=True)
class DetachedAttached(AuditEvent):
    type: ClassVar[str] = "detached.attached"


@dataclass(frozen=True)
class DetachedDetached(AuditEvent):
    type: ClassVar[str] = "detached.detached"
    reason: str = ""        # client-left | attached-elsewhere | ended


@dataclass(frozen=True)
class DetachedKilled(AuditEvent):
    type: ClassVar[str] = "detached.killed"
    reason: str = ""        # killed | forgotten (already finished)


# ---- pure helpers ----------------------------------------------------------------------
def may_see(meta: Mapping[str, Any], identity: str, local_user: str) -> bool:
    """Only the identity that started a session, as the same local user."""
    return bool(identity) and meta.get("identity") == identity and meta.get("local_user") == local_user


def is_expired(meta: Mapping[str, Any], now: float, keep_seconds: float) -> bool:
    """A finished (or lost) session is pruned `keep_seconds` after it ended."""
    if meta.get("state") == "running":
        return False
    return now - float(meta.get("finished") or meta.get("started") or 0) > keep_seconds


def summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What `list` shows a client (no pids, no paths)."""
    keys = ("id", "command", "pty", "started", "state", "exit_status", "exit_signal", "finished", "dropped")
    return {k: meta.get(k) for k in keys}


def iter_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Complete frames at the head of buf (consumed); partial ones stay."""
    out = []
    while len(buf) >= _HEADER.size:
        kind, size = _HEADER.unpack_from(buf)
        if len(buf) < _HEADER.size + size:
            break
        out.append((kind, bytes(buf[_HEADER.size:_HEADER.size + size])))
        del buf[:_HEADER.size + size]
    return out


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def systemd_scope(sid: str, environ: Mapping[str, str] = os.environ,
                  booted: bool | None = None, systemd_run: str | None = None) -> list[str]:
    """Under a systemd service, stopping the unit kills its whole cgroup (KillMode=mixed):
    the holder would die with meshsshd. `systemd-run --scope` moves it into a transient
    scope of its own (it execs the holder in place, keeping our pipes and fds), the way
    logind keeps an sshd session alive across an sshd restart. Elsewhere: nothing."""
    if booted is None:
        booted = os.path.isdir("/run/systemd/system")
    if systemd_run is None:
        systemd_run = shutil.which("systemd-run")
    if not (booted and systemd_run and environ.get("INVOCATION_ID")):
        return []
    return [systemd_run, "--scope", "--quiet", "--collect", f"--unit=meshsshd-session-{sid}",
            "--description=meshsshd detached session", "--"]


class RequestError(Exception):
    """A refused request; the message goes to the client as `error`."""


# ---- the store on disk -----------------------------------------------------------------
class DetachedSessions:
    """The per-peer registry: sessions are files and holders under `<state_dir>/sessions`."""

    def __init__(self, settings: Callable[[], ServerSettings], audit: AuditSink) -> None:
        self._settings = settings
        self.audit = audit
        self._prune_task: asyncio.Task | None = None

    @property
    def dir(self) -> Path:
        return Path(self._settings().state_dir) / "sessions"

    def _ensure_dir(self) -> Path:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        return d

    async def start(self) -> None:
        """Pick up holders that outlived a previous meshsshd; prune old ones."""
        metas = await asyncio.to_thread(self._load_all)
        live = 0
        for meta in metas:
            if meta.get("state") == "running":
                status = await self._status(meta["id"])
                if status is None:
                    await asyncio.to_thread(self._mark_lost, meta["id"])
                else:
                    live += 1
        if metas:
            event(log, "detached.recovered", running=live, total=len(metas))
        await self.prune()
        self._prune_task = asyncio.get_running_loop().create_task(self._prune_forever())

    async def stop(self) -> None:
        """Holders keep running: that is the point."""
        if self._prune_task is not None:
            self._prune_task.cancel()
            self._prune_task = None

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            with contextlib.suppress(OSError):
                await self.prune()

    async def prune(self) -> int:
        keep = self._settings().limits.detached_keep_seconds
        now = time.time()
        gone = 0
        for meta in await asyncio.to_thread(self._load_all):
            if is_expired(meta, now, keep):
                await asyncio.to_thread(self._remove, meta["id"])
                gone += 1
        return gone

    async def running(self) -> list[dict[str, Any]]:
        """Every session recorded as running, whoever owns it (for policy re-checks)."""
        return [m for m in await asyncio.to_thread(self._load_all) if m.get("state") == "running"]

    # -- blocking file helpers (executor) --
    def _load_all(self) -> list[dict[str, Any]]:
        d = self.dir
        if not d.is_dir():
            return []
        out = []
        for p in d.glob("*.json"):
            meta = self._load(p.stem)
            if meta is not None:
                out.append(meta)
        out.sort(key=lambda m: m.get("started") or 0)
        return out

    def _load(self, sid: str) -> dict[str, Any] | None:
        if not _ID.match(sid):
            return None
        try:
            with open(self.dir / f"{sid}.json") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("id") == sid else None

    def _write(self, meta: dict[str, Any]) -> None:
        path = self.dir / f"{meta['id']}.json"
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)

    def _mark_lost(self, sid: str) -> dict[str, Any] | None:
        """The holder is gone without writing its final state (killed, reboot)."""
        meta = self._load(sid)
        if meta is not None and meta.get("state") == "running":
            meta.update(state="lost", finished=time.time(), holder_pid=None)
            self._write(meta)
        return meta

    def _remove(self, sid: str) -> None:
        for suffix in (".json", ".spool", ".sock", ".json.tmp", ".spool.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{sid}{suffix}")
        root = cgroup2_root()
        if root is not None and _ID.match(sid):
            LoginCgroup(root / CGROUP_BASE / f"d-{sid}").remove()

    def _read_spool(self, sid: str) -> bytes:
        try:
            with open(self.dir / f"{sid}.spool", "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    # -- holder sockets --
    def _sock_path(self, sid: str) -> tuple[str, int]:
        """(path, fd to close afterwards or -1). sun_path holds 108 bytes; a long state
        dir is reached through an fd of the directory instead."""
        path = str(self.dir / f"{sid}.sock")
        if len(path.encode()) < 100:
            return path, -1
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{fd}/{sid}.sock", fd

    async def open_holder(self, sid: str, request: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path, fd = self._sock_path(sid)
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        finally:
            if fd >= 0:
                os.close(fd)
        writer.write(json.dumps(request).encode() + b"\n")
        return reader, writer

    async def _status(self, sid: str) -> dict[str, Any] | None:
        try:
            reader, writer = await self.open_holder(sid, {"op": "status"})
        except OSError:
            return None
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            doc = json.loads(line)
            return doc if isinstance(doc, dict) else None
        except (OSError, ValueError, asyncio.TimeoutError):
            return None
        finally:
            writer.close()

    # -- operations (identity checks happen here) --
    async def visible(self, ctx: SessionContext) -> list[dict[str, Any]]:
        out = []
        for meta in await asyncio.to_thread(self._load_all):
            if not may_see(meta, ctx.identity, ctx.user.name):
                continue
            if meta.get("state") == "running":
                status = await self._status(meta["id"])
                if status is None:
                    meta = await asyncio.to_thread(self._mark_lost, meta["id"]) or meta
                    # It may have just finished: its final meta is the truth then.
                else:
                    meta = status
            out.append(meta)
        return out

    async def find(self, ctx: SessionContext, sid: Any) -> dict[str, Any]:
        meta = await asyncio.to_thread(self._load, sid) if isinstance(sid, str) else None
        if meta is None or not may_see(meta, ctx.identity, ctx.user.name):
            raise RequestError(f"no such session: {sid}")
        return meta

    async def launch(self, ctx: SessionContext, req: Mapping[str, Any]) -> dict[str, Any]:
        """Start a holder with a new session; return its metadata."""
        command = req.get("command")
        if command is not None and not isinstance(command, str):
            raise RequestError("command must be a string")
        pty = bool(req.get("pty", command is None))
        settings = self._settings()
        running = [m for m in await self.visible(ctx) if m.get("state") == "running"]
        if len(running) >= settings.limits.detached_max:
            raise RequestError(f"too many detached sessions ({len(running)}); kill one first")
        await asyncio.to_thread(self._ensure_dir)
        sid = uuid.uuid4().hex[:12]
        cols, rows = int(req.get("cols") or 80), int(req.get("rows") or 24)
        term = str(req.get("term") or "xterm") if pty else None
        client_env = req.get("env") if isinstance(req.get("env"), dict) else {}
        meta = dict(id=sid, identity=ctx.identity, local_user=ctx.user.name, uid=ctx.user.uid,
                    source=ctx.conn.client_ip, via=ctx.via, method=ctx.method,
                    token_local_users=ctx.token_local_users, command=command, pty=pty, started=time.time(),
                    state="starting", exit_status=None, exit_signal=None, finished=None,
                    spool_limit=settings.limits.detached_spool_bytes, cols=cols, rows=rows)
        reply = await asyncio.to_thread(self._launch_blocking, ctx, meta, pty, term, cols, rows,
                                        {str(k): str(v) for k, v in client_env.items()}, command)
        if not reply.get("ok"):
            await asyncio.to_thread(self._remove, sid)
            raise RequestError(f"cannot start session for {ctx.user.name}: {reply.get('error', 'holder failed')}")
        meta.update(state="running", holder_pid=reply.get("holder_pid"), pid=reply.get("pid"))
        self.audit.emit(DetachedStarted(**ctx.base_event(sid), command=command or ""))
        event(log, "detached.started", session_id=sid, identity=ctx.identity, user=ctx.user.name,
              pty=pty, holder_pid=reply.get("holder_pid"))
        return meta

    def _launch_blocking(self, ctx: SessionContext, meta: dict[str, Any], pty: bool, term: str | None,
                         cols: int, rows: int, client_env: dict[str, str], command: str | None) -> dict[str, Any]:
        user = ctx.user
        close_after: list[int] = []
        term_pty: PTY | None = None
        try:
            if pty:
                term_pty = PTY(user.uid, (cols, rows, 0, 0), {})
                child_fds = [term_pty.slave] * 3
                parent_fds = [term_pty.master]
            else:
                devnull = os.open(os.devnull, os.O_RDONLY)
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                close_after = [devnull, out_r, out_w, err_r, err_w]
                child_fds = [devnull, out_w, err_w]
                parent_fds = [out_r, err_r]
            env = build_child_env(user, ctx.conn, client_env, term=term,
                                  tty_name=term_pty.name if term_pty else None, accept_env=ctx.accept_env)
            env["MESHSSHD_SESSION_ID"] = meta["id"]
            executable, argv = build_child_argv(user.shell, command, pty=pty)
            as_root = False
            service = pam_service()
            if service is not None and os.geteuid() == 0:
                executable, argv = build_pam_argv(user, executable, argv, service=service,
                                                  tty=term_pty.name if term_pty else None,
                                                  rhost=ctx.conn.client_ip, python=sys.executable)
                as_root = True
            else:
                executable, argv = build_home_argv(user.home, executable, argv, env.get("PATH", ""))
            spec = dict(id=meta["id"], dir=str(self.dir), pty=pty, spool_limit=meta["spool_limit"],
                        executable=executable, argv=argv, env=env, uid=user.uid, gid=user.gid,
                        groups=list(user.groups), as_root=as_root,
                        child_fds=child_fds, parent_fds=parent_fds, meta=meta)
            holder = [sys.executable, "-I", "-S", HOLDER]
            cgroup = LoginCgroup.create(f"d-{meta['id']}") if os.geteuid() == 0 else None
            if cgroup is not None:   # the holder and all it starts; it kills the rest when done
                spec["cgroup"] = str(cgroup.path)
                holder = cgroup.join_argv(holder)
            proc = subprocess.Popen([*systemd_scope(meta["id"]), *holder],
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                                    pass_fds=sorted(set(child_fds + parent_fds)), start_new_session=True,
                                    close_fds=True)
            out, _ = proc.communicate(json.dumps(spec).encode(), timeout=30)
            try:
                return json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                return {"ok": False, "error": "holder did not start"}
        except (OSError, subprocess.SubprocessError) as exc:
            return {"ok": False, "error": getattr(exc, "strerror", None) or str(exc)}
        finally:
            for fd in close_after:
                os.close(fd)
            if term_pty is not None:
                term_pty.close()

    async def stop_holder(self, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Ask a running session's holder to end it (HUP, then TERM, KILL after a grace):
        ("killed", meta), or ("forgotten", meta marked lost) when the holder is gone."""
        try:
            reader, writer = await self.open_holder(meta["id"], {"op": "kill", "signal": "HUP"})
            await asyncio.wait_for(reader.readline(), 5.0)
            writer.close()
            return "killed", meta
        except (OSError, asyncio.TimeoutError):
            return "forgotten", await asyncio.to_thread(self._mark_lost, meta["id"]) or meta

    async def kill(self, ctx: SessionContext, sid: Any) -> dict[str, Any]:
        meta = await self.find(ctx, sid)
        if meta.get("state") == "running":
            reason, meta = await self.stop_holder(meta)
        else:
            reason = "forgotten"
        if reason == "forgotten":
            await asyncio.to_thread(self._remove, meta["id"])
        self.audit.emit(DetachedKilled(**ctx.base_event(meta["id"]), reason=reason))
        event(log, "detached.killed", session_id=meta["id"], identity=ctx.identity, reason=reason)
        return {"ok": True, "id": meta["id"], "result": reason}


# ---- the SSH side ----------------------------------------------------------------------
class SessionsChannel:
    """One `meshsshd-sessions@meshsshd` channel: parse the request, answer, relay."""

    def __init__(self, ctx: SessionContext, store: DetachedSessions, chan: asyncssh.SSHServerChannel) -> None:
        self.ctx, self.store, self.chan = ctx, store, chan
        self.loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost = False
        self._attached_id: str | None = None

    # input from the client
    def data_received(self, data: bytes) -> None:
        if self._task is None:
            self._buf += data
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > _MAX_REQUEST:
                    self._finish_error("request too long")
                return
            line, rest = bytes(self._buf[:nl]), bytes(self._buf[nl + 1:])
            self._buf.clear()
            self._task = self.loop.create_task(self._serve(line))
            if rest:
                self._buf += rest
            return
        if self._writer is not None and self._attached_id is not None:
            self._writer.write(frame(b"i", data))
        elif len(self._buf) < _MAX_REQUEST:
            self._buf += data   # typed while the attach is being set up: sent once it is

    def terminal_size_changed(self, cols: int, rows: int) -> None:
        if self._writer is not None and self._attached_id is not None:
            self._writer.write(frame(b"w", json.dumps({"cols": cols, "rows": rows}).encode()))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self) -> None:
        self._lost = True
        if self._task is not None:
            self._task.cancel()

    def _may_pty(self) -> bool:
        """authorized_keys `no-pty`/`restrict` (and certificates) bind detached PTYs too.
        (A forced `command=` never reaches here: the session runs that command instead
        of the subsystem.)"""
        conn = self.chan.get_extra_info("connection")
        if conn is None:
            return True
        return bool(conn.check_key_permission("pty") and conn.check_certificate_permission("pty"))

    # answering
    def _reply(self, doc: dict[str, Any]) -> None:
        self.chan.write(json.dumps(doc).encode() + b"\n")

    def _finish_error(self, message: str) -> None:
        if not self._lost:
            self._reply({"ok": False, "error": message})
            self.chan.exit(1)

    async def _serve(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self._finish_error("bad request (one JSON object per line)")
            return
        op = req.get("op")
        try:
            if op == "list":
                metas = await self.store.visible(self.ctx)
                self._reply({"ok": True, "sessions": [summary(m) for m in metas]})
                self.chan.exit(0)
            elif op == "start":
                if req.get("pty", req.get("command") is None) and not self._may_pty():
                    raise RequestError("PTY not permitted for this login (no-pty)")
                meta = await self.store.launch(self.ctx, req)
                self._reply({"ok": True, "id": meta["id"], "session": summary(meta)})
                self.chan.exit(0)
            elif op == "kill":
                self._reply(await self.store.kill(self.ctx, req.get("id")))
                self.chan.exit(0)
            elif op == "receive":
                await self._receive(req)
            elif op == "attach":
                await self._attach(req)
            else:
                raise RequestError(f"unknown request {op!r}")
        except RequestError as exc:
            self._finish_error(str(exc))
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # never let a bad request take the connection down
            log.exception("detached request failed")
            self._finish_error(f"internal error: {type(exc).__name__}")
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._attached_id is not None:
                self.store.audit.emit(DetachedDetached(**self.ctx.base_event(self._attached_id),
                                                       reason=self._detach_reason))
                self._attached_id = None

    _detach_reason = "client-left"

    async def _receive(self, req: Mapping[str, Any]) -> None:
        meta = await self.store.find(self.ctx, req.get("id"))
        if meta.get("state") != "running":
            self._reply({"ok": True, "id": meta["id"], "pty": meta.get("pty"), "state": meta.get("state")})
            spool = bytearray(await asyncio.to_thread(self.store._read_spool, meta["id"]))
            for kind, payload in iter_frames(spool):
                await self._emit(kind, payload)
            self._end(meta)
            return
        try:
            reader, self._writer = await self.store.open_holder(
                meta["id"], {"op": "receive", "follow": bool(req.get("follow"))})
            header = json.loads(await reader.readline())
        except (OSError, ValueError):
            # The holder finished in between: its files have the whole story.
            meta = await self.store.find(self.ctx, meta["id"])
            if meta.get("state") == "running":
                raise RequestError("session holder is not answering") from None
            return await self._receive(req)
        self._reply({"ok": True, "id": meta["id"], "pty": header.get("pty"), "state": "running"})
        await self._relay(reader, meta)

    async def _attach(self, req: Mapping[str, Any]) -> None:
        meta = await self.store.find(self.ctx, req.get("id"))
        if meta.get("state") != "running":
            status = meta.get("exit_signal") or meta.get("exit_status")
            raise RequestError(f"session {meta['id']} has ended ({meta.get('state')}, exit {status}); "
                               "use receive to see its output")
        request = {"op": "attach", "cols": int(req.get("cols") or 0), "rows": int(req.get("rows") or 0),
                   "replay": ATTACH_REPLAY}
        try:
            reader, self._writer = await self.store.open_holder(meta["id"], request)
            header = json.loads(await reader.readline())
        except (OSError, ValueError):
            raise RequestError("session holder is not answering") from None
        self._attached_id = meta["id"]
        self.store.audit.emit(DetachedAttached(**self.ctx.base_event(meta["id"])))
        event(log, "detached.attached", session_id=meta["id"], identity=self.ctx.identity,
              source=self.ctx.conn.client_ip)
        self._reply({"ok": True, "id": meta["id"], "pty": header.get("pty"), "state": "running"})
        if self._buf:
            self._writer.write(frame(b"i", bytes(self._buf)))
            self._buf.clear()
        await self._relay(reader, meta)

    async def _relay(self, reader: asyncio.StreamReader, meta: Mapping[str, Any]) -> None:
        buf = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                # Holder gone without an end frame: crashed or killed hard.
                if not self._lost:
                    self.chan.write_stderr(b"\r\nmeshsshd: session holder went away\r\n")
                    self.chan.exit(255)
                return
            buf += chunk
            for kind, payload in iter_frames(buf):
                if kind == b"x":
                    end = json.loads(payload)
                    if end.get("reason") == "attached elsewhere":
                        self._detach_reason = "attached-elsewhere"
                        if not self._lost:
                            self.chan.write_stderr(b"\r\n[meshsshd: attached from elsewhere; detached]\r\n")
                            self.chan.close()
                        return
                    if end.get("state") != "running":
                        self._detach_reason = "ended"
                    self._end(end)
                    return
                await self._emit(kind, payload)

    async def _emit(self, kind: bytes, payload: bytes) -> None:
        if self._lost:
            raise asyncio.CancelledError
        await self._can_write.wait()
        if kind == b"o":
            self.chan.write(payload)
        elif kind == b"e":
            self.chan.write_stderr(payload)

    def _end(self, end: Mapping[str, Any]) -> None:
        """Exit the channel with the session's status (0 while it still runs)."""
        if self._lost:
            return
        if end.get("exit_signal"):
            self.chan.exit_with_signal(str(end["exit_signal"]), False, "", "")
        elif end.get("state") == "lost":
            self.chan.exit(255)
        else:
            self.chan.exit(int(end.get("exit_status") or 0))


class DetachableSession(ChildSession):
    """A session channel that serves the reserved subsystem itself, and is an ordinary
    `ChildSession` for everything else (shell, exec, sftp, configured subsystems)."""

    def __init__(self, ctx: SessionContext, store: DetachedSessions) -> None:
        super().__init__(ctx)
        self._store = store
        self._detached: SessionsChannel | None = None
        self._detached_wanted = False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == SUBSYSTEM and self.ctx.forced_command is None:   # forced: ChildSession runs it
            self._detached_wanted = True
            return True
        return super().subsystem_requested(subsystem)

    def session_started(self) -> None:
        if self._detached_wanted:
            assert self._chan is not None
            self._detached = SessionsChannel(self.ctx, self._store, self._chan)
            return
        super().session_started()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._detached is not None:
            self._detached.data_received(data)
        else:
            super().data_received(data, datatype)

    def eof_received(self) -> bool:
        if self._detached is not None:
            return True
        return super().eof_received()

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._detached is not None:
            self._detached.terminal_size_changed(width, height)
        else:
            super().terminal_size_changed(width, height, pixwidth, pixheight)

    def pause_writing(self) -> None:
        if self._detached is not None:
            self._detached.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._detached is not None:
            self._detached.resume_writing()
        else:
            super().resume_writing()

    def signal_received(self, signal_name: str) -> None:
        if self._detached is None:
            super().signal_received(signal_name)

    def break_received(self, msec: int) -> bool:
        if self._detached is not None:
            return False
        return super().break_received(msec)

    @property
    def closed(self) -> bool:
        if self._detached is not None or self._detached_wanted:
            return self._detached is not None and self._detached._lost
        return super().closed

    def close(self, message: str | None = None) -> None:
        if self._detached is not None:
            if self._chan is not None and not self._detached._lost:
                self._chan.close()
            return
        super().close(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._detached is not None or self._detached_wanted:
            if self._detached is not None:
                self._detached.connection_lost()
            return
        super().connection_lost(exc)


__all__ = ["SUBSYSTEM", "DetachableSession", "DetachedSessions", "is_expired", "may_see", "summary"]
