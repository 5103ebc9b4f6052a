"""The per-peer registry of detached sessions: records and holder sockets under
`<state_dir>/sessions` (mode 0700, root only). It recovers holders that outlived a previous
meshsshd, prunes finished sessions, and runs each client operation with the owner check
(`_meta.may_see`) first. Starting the holder itself is `_launch`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..audit import AuditSink
from ..config import ServerSettings
from ..logs import event
from ..session import SessionContext
from ..session._cgroup import BASE as CGROUP_BASE
from ..session._cgroup import LoginCgroup, cgroup2_root
from ._events import DetachedKilled, DetachedStarted
from ._launch import launch_holder
from ._meta import is_expired, may_see

log = logging.getLogger("meshsshd.detached")

_ID = re.compile(r"^[0-9a-f]{12}$")


class RequestError(Exception):
    """A refused request; the message goes to the client as `error`."""


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
        reply = await asyncio.to_thread(launch_holder, self.dir, ctx, meta, pty, term, cols, rows,
                                        {str(k): str(v) for k, v in client_env.items()}, command)
        if not reply.get("ok"):
            await asyncio.to_thread(self._remove, sid)
            raise RequestError(f"cannot start session for {ctx.user.name}: {reply.get('error', 'holder failed')}")
        meta.update(state="running", holder_pid=reply.get("holder_pid"), pid=reply.get("pid"))
        self.audit.emit(DetachedStarted(**ctx.base_event(sid), command=command or ""))
        event(log, "detached.started", session_id=sid, identity=ctx.identity, user=ctx.user.name,
              pty=pty, holder_pid=reply.get("holder_pid"))
        return meta

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
