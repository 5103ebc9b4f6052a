"""Store transactions on a real SQLite file and a real PostgreSQL server: a snapshot's
serial and rows come from one commit, and a write that reads first cannot be split by
another writer's commit.

The other writer is failure injection: a hook on the statement stream runs a second,
independent Store's commit (its own connections) between two statements of the first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import event, select
from sqlalchemy.util import await_

from meshmgmt.idp.device import hash_secret
from meshmgmt.idp.grants import Grants
from meshmgmt.idp.errors import IdpError
from meshmgmt.idp.models import DeviceCodeRow
from meshmgmt.store import Group, Store
from meshmgmt.store.engine import sqlite_url

from .mgmtkit import PgCluster


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg")
        yield cluster.create_database(f"tx_{tmp_path.name[-20:]}".replace("-", "_").lower())
    else:
        yield sqlite_url(tmp_path)


@pytest.fixture
async def stores(url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two replicas (or a replica and the CLI) would be."""
    one, other = Store(url), Store(url)
    await one.migrate()
    try:
        yield one, other
    finally:
        await one.close()
        await other.close()


def before_statement(store: Store, starts: str, action: Callable[[], None]) -> None:
    """Run `action` once, just before the first statement of `store` that starts with `starts`."""
    done: list[bool] = []

    def hook(_conn, _cursor, statement: str, *_args) -> None:
        if not done and statement.lstrip().upper().startswith(starts):
            done.append(True)
            action()

    event.listen(store.engine.sync_engine, "before_cursor_execute", hook)


async def test_a_snapshot_has_one_commits_serial_and_rows(stores: tuple[Store, Store]) -> None:
    """A change committed while a map snapshot is being read (after its serial, before
    its peers and groups) is in none of it: CI once saw a map with an old serial and a
    later change's rows, so the peer's next map, with the same content, was never sent."""
    one, other = stores
    async with one.change("before") as s:
        s.add(Group(name="before"))

    async def meanwhile() -> None:
        async with other.change("meanwhile") as s:
            s.add(Group(name="meanwhile"))

    before_statement(one, "SELECT PEERS.", lambda: await_(meanwhile()))
    state = await one.load_state()
    assert (state.serial, [g.name for g in state.groups]) == (1, ["before"])
    again = await one.load_state()
    assert (again.serial, [g.name for g in again.groups]) == (2, ["before", "meanwhile"])


async def test_a_device_poll_is_not_split_by_another_writer(tmp_path: Path) -> None:
    """The device-code poll reads its row and then updates it. As one BEGIN IMMEDIATE
    transaction another connection cannot commit in between; as a deferred one it could,
    and the poll's update then failed with SQLITE_BUSY ("database is locked") at once,
    whatever the busy timeout."""
    store = Store(sqlite_url(tmp_path))
    await store.migrate()
    try:
        grants = Grants(store, clock=lambda: 1000.0, device_ttl=600, poll_interval=5, refresh_ttl=3600,
                        refresh_family_ttl=86400)
        start = await grants.start_device("meshssh", "openid")
        other: list[str] = []

        def another_writer() -> None:  # e.g. a second process on the same file
            db = sqlite3.connect(str(tmp_path / "meshmgmt.db"), timeout=0)
            try:
                db.execute("UPDATE meta SET value = value + 1 WHERE key = 'serial'")
                db.commit()
                other.append("committed")
            except sqlite3.OperationalError as exc:
                other.append(str(exc))
            finally:
                db.close()

        before_statement(store, "UPDATE IDP_DEVICE_CODES", another_writer)
        with pytest.raises(IdpError) as err:
            await grants.poll_device(start.device_code, "meshssh")
        assert err.value.error == "authorization_pending"
        assert other == ["database is locked"]  # it had to wait for the poll's transaction
        async with store.session() as s:
            row = (await s.execute(select(DeviceCodeRow).where(
                DeviceCodeRow.device_code_hash == hash_secret(start.device_code)))).scalar_one()
        assert row.last_polled_at is not None
    finally:
        await store.close()
