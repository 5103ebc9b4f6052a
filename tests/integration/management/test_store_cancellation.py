"""A task cancelled while its write commits: the commit, the pool's close of an overflow
connection and the change notification all still happen, and nothing is logged as an error.

CI once logged `Exception closing connection … CancelledError` from the pool on PostgreSQL:
a commit hands its connection back to the pool, which closes it when the pool is over its
size, and a cancel landing in that close cut it short. The failure injection here makes
that close slow (asyncpg's `Connection.close`, or SQLite's through the pool's checkin), so
the cancel lands in it every time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.util import await_

from meshmgmt.store import Group, Store
from meshmgmt.store.engine import sqlite_url

from .mgmtkit import PgCluster

SLOW = 0.3  # seconds each injected close takes; the cancel comes half-way


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg")
        url = cluster.create_database(f"cx_{tmp_path.name[-20:]}".replace("-", "_").lower())
    else:
        url = sqlite_url(tmp_path)
    s = Store(url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def pool_errors() -> AsyncIterator[list[str]]:
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    handler = Catch()
    logging.getLogger("sqlalchemy").addHandler(handler)
    yield errors
    logging.getLogger("sqlalchemy").removeHandler(handler)


def slow_release(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection handed back to the pool takes SLOW seconds: on PostgreSQL in
    asyncpg's close (where CI's cancel landed), on SQLite in the pool's checkin."""
    if store.is_postgres:
        import asyncpg.connection

        close = asyncpg.connection.Connection.close

        async def slow_close(self: asyncpg.connection.Connection, **kwargs: object) -> None:
            await asyncio.sleep(SLOW)
            await close(self, **kwargs)

        monkeypatch.setattr(asyncpg.connection.Connection, "close", slow_close)
    else:
        event.listen(store.engine.sync_engine.pool, "checkin", lambda *_: await_(asyncio.sleep(SLOW)))


async def test_cancelled_changes_commit_notify_and_close_cleanly(
        store: Store, pool_errors: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[int] = []
    store.add_listener(fired.append)
    slow_release(store, monkeypatch)
    # More writers than the pool keeps (10 on PostgreSQL), so some connections are
    # overflow and closed at checkin; each holds its transaction open a moment.
    writers = 4 if store.is_sqlite else 25

    async def add(i: int) -> None:
        async with store.change(f"test {i}") as s:
            s.add(Group(id=f"g{i}", name=f"group-{i}"))
            await s.flush()
            await s.execute(text("SELECT 1"))
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(add(i)) for i in range(writers)]
    deadline = asyncio.get_running_loop().time() + 30
    while len(fired) == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)  # the first commits are in their slow release now
    await asyncio.sleep(SLOW / 2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    async with store.session() as s:
        names = set((await s.execute(select(Group.name))).scalars())
    serial = await store.serial()
    committed = {int(n.split("-")[1]) for n in names}
    # Every write whose commit started finished it and announced it, cancelled or not.
    assert len(fired) == len(committed) == serial, (fired, committed, serial)
    assert sorted(fired) == list(range(1, serial + 1))
    assert not pool_errors, pool_errors
    # The pool is whole again: a new write goes through.
    async with store.change("after") as s:
        s.add(Group(id="after", name="after"))
    assert await store.serial() == serial + 1



async def test_a_snapshot_read_cancelled_while_it_hands_its_connection_back(
        store: Store, pool_errors: list[str]) -> None:
    """The hub loop and sync streams are cancelled at shutdown, often inside
    `load_state()`. Its reads once ended in a `begin()` block whose exit handed the
    connection back inside the cancelled task: CI logged "Exception during reset or
    similar … CancelledError" when meshmgmt stopped. The reset is made slow here, so the
    cancel lands in it."""
    released = asyncio.Event()

    def slow_reset(*_: object) -> None:
        released.set()
        await_(asyncio.sleep(SLOW))

    event.listen(store.engine.sync_engine.pool, "reset", slow_reset)
    task = asyncio.create_task(store.load_state())
    await asyncio.wait_for(released.wait(), 30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    state = await store.load_state()   # the pool is whole: the next snapshot reads fine
    assert state.serial == await store.serial()
    assert not pool_errors, pool_errors
