"""The session channel every login gets: it serves the reserved detached-sessions
subsystem itself (through `_channel.SessionsChannel`) and hands everything else to the
ordinary `ChildSession`, so the server needs no second session class."""

from __future__ import annotations

from ..session import ChildSession, SessionContext
from ._channel import SessionsChannel
from ._store import DetachedSessions

SUBSYSTEM = "meshsshd-sessions@meshsshd"


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
