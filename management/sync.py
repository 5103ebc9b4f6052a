"""The sync hub: every open peer sync stream, and the recompute-on-change loop.

On connect a stream gets its full map. On every store change (in-process, or NOTIFY from
another replica) the hub loads one fresh snapshot, recomputes the map of every
connected peer from it and sends it only where the content changed. A stream whose
peer no longer exists gets `{"type": "error", "error": "peer-deleted"}` and is closed.
Maps sent on one stream never go backwards in serial.

Two races this guards against, both seen with many peers registering at once:
- A stream attaching while the loop's load is in flight: the loop clears `dirty` when the
  load starts, so `dirty` cannot tell whether the cached snapshot has the latest change.
  A change counter can: the cache is used only if it includes every change seen.
- A snapshot read before a peer registered has no map for it. Only a load that started
  after the stream attached may tell the stream `peer-deleted`; an older one (the cache,
  or the loop's load in flight) sends nothing, and the attach loads afresh. That also
  covers a peer registered through another replica whose NOTIFY has not arrived yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from meshsshd.logs import event

from .metrics import Registry
from .netmap import compute_map, encode_map
from .state import MeshState

log = logging.getLogger("meshmgmt.sync")

SEND_TIMEOUT = 10.0


@dataclass(eq=False)
class Stream:
    peer_id: str
    ws: web.WebSocketResponse
    last_fp: str = ""
    last_serial: int = -1
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    # Loads numbered up to this one started before the stream attached (see the module
    # docstring): their snapshot may predate the peer.
    attached_after: int = 0


class SyncHub:
    def __init__(self, load_state: Callable[[], Awaitable[MeshState]], metrics: Registry,
                 current_serial: Callable[[], Awaitable[int]] | None = None, poll_interval: float = 5.0) -> None:
        self._load_state = load_state
        self._current_serial = current_serial
        self._poll_interval = poll_interval
        self._poll_task: asyncio.Task | None = None
        self._streams: dict[str, set[Stream]] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._state: MeshState | None = None
        self._state_load = 0  # which load produced `_state`
        self._loads = 0  # loads started
        self._changes = 0  # store changes seen
        self._state_changes = 0  # how many of them `_state` includes
        self._computed = metrics.counter("meshmgmt_maps_computed_total", "Network maps computed")
        self._sent = metrics.counter("meshmgmt_maps_sent_total", "Network maps sent on sync streams")
        self._duration = metrics.histogram(
            "meshmgmt_map_compute_seconds", "Time to compute one peer's network map"
        )
        self._recompute_duration = metrics.histogram(
            "meshmgmt_recompute_seconds", "Time from a change to every connected peer's new map"
        )
        metrics.callback_gauge("meshmgmt_peers_connected", "Peers with an open sync stream",
                               lambda: float(len(self._streams)))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop())
        if self._current_serial is not None:
            self._poll_task = loop.create_task(self._poll())

    async def close(self) -> None:
        for task in (self._task, self._poll_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for streams in list(self._streams.values()):
            for st in list(streams):
                with contextlib.suppress(Exception):
                    await st.ws.close()
        self._streams.clear()

    async def going_away(self) -> None:
        """Server shutdown: close every stream with 1001 so peers reconnect (elsewhere)."""
        from aiohttp import WSCloseCode

        streams = [st for group in list(self._streams.values()) for st in list(group)]
        await asyncio.gather(*(st.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                               for st in streams), return_exceptions=True)

    def changed(self, _serial: int = 0) -> None:
        """Store change listener: mark dirty; the loop coalesces bursts of changes."""
        self._changes += 1
        self._dirty.set()

    @property
    def connected_peers(self) -> set[str]:
        return set(self._streams)

    # --- streams -------------------------------------------------------------------------

    async def attach(self, peer_id: str, ws: web.WebSocketResponse) -> Stream:
        st = Stream(peer_id, ws, attached_after=self._loads)
        self._streams.setdefault(peer_id, set()).add(st)
        if self._state is not None and self._state_changes == self._changes:
            state, load = self._state, self._state_load
        else:
            state, load = await self._load()
        if not await self._send_map(st, state, load):
            await self._send_map(st, *await self._load())
        return st

    def detach(self, st: Stream) -> None:
        st.closed = True
        streams = self._streams.get(st.peer_id)
        if streams is not None:
            streams.discard(st)
            if not streams:
                del self._streams[st.peer_id]

    async def _load(self) -> tuple[MeshState, int]:
        """A fresh snapshot and its load number; it becomes the cache unless older."""
        self._loads += 1
        load, changes = self._loads, self._changes
        state = await self._load_state()
        if self._state is None or state.serial >= self._state.serial:
            self._state, self._state_load = state, load
            self._state_changes = max(self._state_changes, changes)
        return state, load

    async def _send_map(self, st: Stream, state: MeshState, load: int) -> bool:
        """Send the stream its map from `state` (load number `load`) if it changed.

        False when the snapshot has no such peer but was loaded before the stream
        attached: it cannot tell a deleted peer from one registered after it was read."""
        t0 = time.perf_counter()
        netmap = compute_map(state, st.peer_id)
        self._duration.observe(time.perf_counter() - t0)
        self._computed.inc()
        async with st.lock:
            if st.closed or state.serial < st.last_serial:
                return True  # closed, or an older snapshot raced a newer one that went out
            if netmap is None:
                if load <= st.attached_after:
                    return False
                await self._close_deleted(st)
                return True
            fp, text = encode_map(netmap)
            if fp == st.last_fp:
                return True
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await st.ws.send_str(text)
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                event(log, "sync.send_failed", level=logging.WARNING, peer=st.peer_id, error=type(exc).__name__)
                await st.ws.close()
                return True
            st.last_fp, st.last_serial = fp, state.serial
            self._sent.inc()
            event(log, "sync.map_sent", level=logging.DEBUG, peer=st.peer_id, serial=state.serial)
        return True

    async def _close_deleted(self, st: Stream) -> None:
        with contextlib.suppress(Exception):
            await st.ws.send_json({"type": "error", "error": "peer-deleted",
                                   "message": "this peer was deleted from the mesh; register again"})
        st.closed = True
        with contextlib.suppress(Exception):
            await st.ws.close()
        event(log, "sync.peer_deleted", peer=st.peer_id)

    # --- the loops ---------------------------------------------------------------------

    async def _poll(self) -> None:
        """A safety net under the change feed: a serial newer than the last snapshot means
        a notification was lost (e.g. the LISTEN connection dropped), so recompute."""
        assert self._current_serial is not None
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                serial = await self._current_serial()
            except Exception as exc:
                event(log, "sync.poll_failed", level=logging.WARNING, error=type(exc).__name__)
                continue
            if self._streams and (self._state is None or serial > self._state.serial):
                self.changed(serial)

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            t0 = time.perf_counter()
            try:
                state, load = await self._load()
                t_loaded = time.perf_counter()
                streams = [st for group in list(self._streams.values()) for st in list(group)]
                sent_before = self._sent.value()
                await asyncio.gather(*(self._send_map(st, state, load) for st in streams))
                elapsed = time.perf_counter() - t0
                self._recompute_duration.observe(elapsed)
                if streams:
                    event(log, "sync.recomputed", serial=state.serial, streams=len(streams),
                          sent=int(self._sent.value() - sent_before), load_ms=round((t_loaded - t0) * 1000, 1),
                          total_ms=round(elapsed * 1000, 1))
            except Exception:  # keep serving; the next change retries
                log.exception("recompute failed")
                await asyncio.sleep(0.5)
                self._dirty.set()
