"""meshsshd.event_loop: the daemon runs on uvloop when it imports, else on asyncio's loop,
and says which in its log."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvloop

from meshsshd import event_loop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_runs_on_uvloop(caplog):
    with caplog.at_level(logging.INFO, logger="meshsshd.event_loop"):
        assert event_loop.run(_loop_type()) is uvloop.Loop
    assert [r.fields["loop"] for r in caplog.records] == ["uvloop"]


def test_falls_back_to_asyncio_when_uvloop_does_not_import(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "uvloop", None)     # makes `import uvloop` raise ImportError
    with caplog.at_level(logging.INFO, logger="meshsshd.event_loop"):
        loop_type = event_loop.run(_loop_type())
    assert issubclass(loop_type, asyncio.BaseEventLoop) and loop_type is not uvloop.Loop
    [record] = caplog.records
    assert (record.getMessage(), record.levelno, record.fields["loop"]) == (
        "event-loop.fallback", logging.WARNING, "asyncio")
