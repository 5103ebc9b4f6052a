"""Delivering audit events to management: an `AuditSink` with a bounded, durable queue.

`emit()` never blocks or raises (the SSH server calls it from session code): the event
goes into a deque of at most `max_queue` entries and `max_bytes` of JSON. With a journal
open (`open()`: events.jsonl in the state dir, `audit_journal.py`) a writer task appends
each event to the file through the executor, and only events already in the file are
sent, so a kill -9 at any moment loses nothing that was sent or queued on disk; a
delivered batch is acknowledged in the file, and after a crash what was not acknowledged
is sent again (at-least-once). The file is fsynced at most once per `fsync_interval`
while something is unsynced: a power loss loses at most that last interval.

A background task posts batches of up to `batch_size` to `/api/peers/events`; while
management is down the batch stays queued and is retried with backoff. When the queue is
full the oldest event is dropped and counted (`dropped`, and a `{"dropped": N}` marker in
the journal), so a long outage costs memory and disk only up to the bound. If the journal
cannot be written (disk full), delivery goes on from memory and the file is rewritten
whole once writing works again.

A batch that management *refuses* (a 4xx: e.g. an event type an older management does not
know) would block the queue forever if retried, so it is split: each event is posted on
its own, and the ones refused are dropped and counted (`rejected`) with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .audit import AuditEvent
from .audit_journal import AuditJournal, encode
from .errors import MeshsshdError, StateError
from .logs import event
from .mgmt_client import ManagementRejected

log = logging.getLogger("meshsshd.audit_uplink")

Poster = Callable[[list[dict[str, Any]]], Awaitable[None]]
_DROPPED = b'{"dropped":'
COMPACT_MIN = 1 << 20   # rewrite the journal once it is this big and 4x what is still queued


class ManagementAuditSink:
    def __init__(self, post: Poster | None = None, max_queue: int = 10_000, batch_size: int = 200,
                 interval: float = 0.5, max_backoff: float = 30.0,
                 on_event: Callable[[AuditEvent], None] | None = None,
                 max_bytes: int = 16 << 20, fsync_interval: float = 1.0) -> None:
        self.post = post
        self.queue: deque[dict[str, Any]] = deque()
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.interval = interval
        self.max_backoff = max_backoff
        self.fsync_interval = fsync_interval
        self.on_event = on_event
        self.dropped = 0
        self.delivered = 0
        self.rejected = 0
        self.journal: AuditJournal | None = None
        # Per queued event, its sequence number and encoded size (parallel to `queue`).
        self._seqs: deque[int] = deque()
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._next_seq = 1
        self._written_seq = 0          # events up to this one are in the journal: sendable
        # The append running in the executor, and the last seq it carries: a thread cannot
        # be cancelled, so stop() waits for it before the final write and the close.
        self._inflight: asyncio.Future[None] | None = None
        self._inflight_last = 0
        self._lines: list[bytes] = []  # journal records not written yet, in order
        self._stale = False            # the journal failed: rewrite it whole next time
        self._unsynced = False
        self._synced_at = 0.0
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # AuditSink ---------------------------------------------------------------------
    def emit(self, ev: AuditEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # metrics must never break auditing
                log.exception("audit observer failed")
        self.enqueue(ev.to_dict())

    def enqueue(self, doc: dict[str, Any], written: bool = False) -> None:
        line = encode(doc)
        seq = self._next_seq
        self._next_seq += 1
        self.queue.append(doc)
        self._seqs.append(seq)
        self._sizes.append(len(line))
        self._bytes += len(line)
        if self.journal is None or written:
            self._written_seq = seq
        else:
            self._record(line)
        while len(self.queue) > self.max_queue or (self._bytes > self.max_bytes and len(self.queue) > 1):
            self._drop_oldest()
        if len(self.queue) >= self.batch_size:
            self._wake.set()

    def _drop_oldest(self) -> None:
        self._popleft()
        self.dropped += 1
        if self.journal is not None:
            if self._lines and self._lines[-1].startswith(_DROPPED):   # one marker per run of drops
                n = int(self._lines.pop()[len(_DROPPED):].rstrip(b"}\n"))
                self._record(encode({"dropped": n + 1}))
            else:
                self._record(encode({"dropped": 1}))
        if self.dropped == 1 or self.dropped % 1000 == 0:
            event(log, "audit.dropped", logging.WARNING, dropped=self.dropped,
                  reason="queue full while management is unreachable")

    def _popleft(self) -> None:
        self.queue.popleft()
        self._seqs.popleft()
        self._bytes -= self._sizes.popleft()

    def _record(self, line: bytes) -> None:
        self._lines.append(line)
        self._dirty.set()

    # the journal -------------------------------------------------------------------
    async def open(self, path: Path) -> int:
        """Take up the journal the previous run left (crash or not): its events go first,
        then whatever was emitted before now. Returns how many were restored."""
        journal = AuditJournal(path)
        replayed = await asyncio.to_thread(journal.open)
        earlier = list(self.queue)
        self.queue.clear()
        self._seqs.clear()
        self._sizes.clear()
        self._bytes = 0
        self._lines.clear()
        self.journal = journal
        for doc in replayed.events:
            self.enqueue(doc, written=True)
        for doc in earlier:
            self.enqueue(doc)
        if replayed.dropped:
            event(log, "audit.restored_dropped", logging.WARNING, dropped=replayed.dropped,
                  effect="the previous run dropped these events while its queue was full")
        return len(replayed.events)

    async def _write_loop(self) -> None:
        while True:
            timeout = None
            if self._unsynced:
                timeout = max(0.0, self._synced_at + self.fsync_interval - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            self._dirty.clear()
            try:
                await self._write_pending()
            except StateError as exc:
                if not self._stale:
                    event(log, "audit.journal_failed", logging.ERROR, error=str(exc), queued=len(self.queue),
                          effect="events are delivered from memory; a crash now loses them")
                self._stale = True
                self._lines.clear()
                self._written_seq = self._next_seq - 1
                await asyncio.sleep(random.uniform(1.0, 2.0))
                self._dirty.set()

    def _settle_inflight(self) -> None:
        """The append finished: its events are on disk and may be sent."""
        self._inflight = None
        self._written_seq = max(self._written_seq, self._inflight_last)
        self._unsynced = True

    async def _write_pending(self) -> None:
        """Write what is pending, compact, and fsync when the interval is up."""
        journal = self.journal
        if journal is None:
            return
        if self._stale:
            self._lines.clear()
            await asyncio.to_thread(journal.rewrite, list(self.queue))
            self._stale = False
            self._unsynced = False   # rewrite syncs
            event(log, "audit.journal_recovered", queued=len(self.queue))
        elif self._lines:
            data, self._inflight_last = b"".join(self._lines), self._next_seq - 1
            self._lines = []
            self._inflight = asyncio.ensure_future(asyncio.to_thread(journal.append, data))
            await asyncio.shield(self._inflight)
            self._settle_inflight()
        if not self._lines:
            if not self.queue and journal.size:
                await asyncio.to_thread(journal.truncate)
            elif journal.size > max(COMPACT_MIN, 4 * self._bytes):
                await asyncio.to_thread(journal.rewrite, list(self.queue))
                self._unsynced = False
        if self._unsynced and time.monotonic() - self._synced_at >= self.fsync_interval:
            await asyncio.to_thread(journal.sync)
            self._synced_at, self._unsynced = time.monotonic(), False

    # delivery ----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-uplink")
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="audit-journal")

    async def flush_once(self) -> int:
        """Post one batch; returns how many were delivered (raises if posting failed)."""
        if not self.queue or self.post is None:
            return 0
        n = 0
        while n < min(self.batch_size, len(self.queue)) and self._seqs[n] <= self._written_seq:
            n += 1
        if not n:
            return 0
        batch = [self.queue[i] for i in range(n)]
        last = self._seqs[n - 1]
        try:
            await self.post(batch)
        except ManagementRejected as exc:
            await self._post_one_by_one(batch, exc)
        # Only now remove them: a failed post leaves the batch at the head of the queue.
        # (Events dropped meanwhile are gone already; what is left of the batch is acked.)
        acked = 0
        while self.queue and self._seqs[0] <= last:
            self._popleft()
            acked += 1
        if acked and self.journal is not None:
            self._record(encode({"ack": acked}))
        self.delivered += len(batch)
        return len(batch)

    async def _post_one_by_one(self, batch: list[dict[str, Any]], exc: ManagementRejected) -> None:
        assert self.post is not None
        for doc in batch:
            try:
                await self.post([doc])
            except ManagementRejected as one:
                self.rejected += 1
                event(log, "audit.rejected", logging.WARNING, type=doc.get("type"),
                      status=one.status, error=one.code, rejected=self.rejected)
        if len(batch) > 1:
            event(log, "audit.batch_split", size=len(batch), error=exc.code)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                while await self.flush_once() == self.batch_size:
                    pass
                failures = 0
            except MeshsshdError as exc:
                failures += 1
                delay = random.uniform(0.5, 1.0) * min(self.max_backoff, 0.5 * 2 ** min(failures, 10))
                if failures == 1:
                    event(log, "audit.delivery_failed", logging.WARNING, queued=len(self.queue),
                          error=str(exc), retry_in=round(delay, 1))
                await asyncio.sleep(delay)

    async def stop(self, flush_timeout: float = 1.0) -> None:
        """Stop the tasks, try one last delivery, leave the rest in the journal (synced)."""
        for task in (self._task, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._writer = None
        if self._inflight is not None:   # the writer was cancelled mid-append: let it land
            try:
                await self._inflight
                self._settle_inflight()
            except StateError:
                self._inflight, self._stale = None, True   # the final write rewrites the file
        try:
            await asyncio.wait_for(self.flush_once(), flush_timeout)
        except (MeshsshdError, asyncio.TimeoutError):
            pass
        if self.journal is None:
            return
        try:
            self._unsynced = True
            self._synced_at = 0.0
            await self._write_pending()
        finally:
            self.journal.close()
            self.journal = None
