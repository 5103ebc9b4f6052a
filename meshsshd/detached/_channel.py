"""One `meshsshd-sessions@meshsshd` channel, the SSH side of detached sessions: read the
client's one JSON request, answer it through the store, and for `receive`/`attach` relay
the holder's frames to channel data (and the client's input back) until the session ends,
the client leaves or another client attaches. The wire protocol is in the package
docstring (`meshsshd/detached/__init__.py`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import asyncssh

from ..logs import event
from ..session import SessionContext
from ._events import DetachedAttached, DetachedDetached
from ._frames import frame, iter_frames
from ._meta import summary
from ._store import DetachedSessions, RequestError

log = logging.getLogger("meshsshd.detached")

ATTACH_REPLAY = 64 * 1024
_MAX_REQUEST = 64 * 1024


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
