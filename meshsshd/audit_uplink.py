"""Delivering audit events to management: an `AuditSink` with a bounded queue.

`emit()` never blocks or raises (the SSH server calls it from session code): the event
goes into a deque of at most `max_queue` entries. A background task posts batches of up
to `batch_size` to `/api/peers/events`; while management is down the batch stays queued
and is retried with backoff. When the queue is full the oldest event is dropped and
counted (`dropped`), so a long outage costs memory only up to the bound. On shutdown the
rest is saved to the state dir (events.jsonl) and loaded again on the next start.

A batch that management *refuses* (a 4xx: e.g. an event type an older management does not
know) would block the queue forever if retried, so it is split: each event is posted on
its own, and the ones refused are dropped and counted (`rejected`) with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .audit import AuditEvent
from .errors import MeshsshdError
from .logs import event
from .mgmt_client import ManagementRejected
from .state import SECRET_MODE, atomic_write

log = logging.getLogger("meshsshd.audit_uplink")

Poster = Callable[[list[dict[str, Any]]], Awaitable[None]]


class ManagementAuditSink:
    def __init__(self, post: Poster | None = None, max_queue: int = 10_000, batch_size: int = 200,
                 interval: float = 0.5, max_backoff: float = 30.0,
                 on_event: Callable[[AuditEvent], None] | None = None) -> None:
        self.post = post
        self.queue: deque[dict[str, Any]] = deque()
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.interval = interval
        self.max_backoff = max_backoff
        self.on_event = on_event
        self.dropped = 0
        self.delivered = 0
        self.rejected = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # AuditSink ---------------------------------------------------------------------
    def emit(self, ev: AuditEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # metrics must never break auditing
                log.exception("audit observer failed")
        self.enqueue(ev.to_dict())

    def enqueue(self, doc: dict[str, Any]) -> None:
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                event(log, "audit.dropped", logging.WARNING, dropped=self.dropped,
                      reason="queue full while management is unreachable")
        self.queue.append(doc)
        if len(self.queue) >= self.batch_size:
            self._wake.set()

    # delivery ----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-uplink")

    async def flush_once(self) -> int:
        """Post one batch; returns how many were delivered (raises if posting failed)."""
        if not self.queue or self.post is None:
            return 0
        batch = [self.queue[i] for i in range(min(self.batch_size, len(self.queue)))]
        try:
            await self.post(batch)
        except ManagementRejected as exc:
            await self._post_one_by_one(batch, exc)
        # Only now remove them: a failed post leaves the batch at the head of the queue.
        for _ in batch:
            if self.queue:
                self.queue.popleft()
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

    async def stop(self, state_file: Path | None = None, flush_timeout: float = 1.0) -> None:
        """Stop the task, try one last delivery, keep what is left on disk."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await asyncio.wait_for(self.flush_once(), flush_timeout)
        except (MeshsshdError, asyncio.TimeoutError):
            pass
        if state_file is None:
            return
        if not self.queue:
            with contextlib.suppress(FileNotFoundError):
                state_file.unlink()
            return
        data = "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in self.queue)
        await asyncio.to_thread(atomic_write, state_file, data.encode(), SECRET_MODE)

    def load(self, state_file: Path) -> int:
        """Queue events saved by the previous run; returns how many."""
        try:
            lines = state_file.read_text().splitlines()
        except FileNotFoundError:
            return 0
        n = 0
        for line in lines:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                self.enqueue(doc)
                n += 1
        return n
