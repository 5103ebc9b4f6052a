"""The store on a real SQLite file: migrations, the serial, the change feed, snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmgmt.store import Group, Peer, Policy, Store, User, hash_password, verify_password
from meshmgmt.store.engine import normalise_url

from .migrations import HEAD, upgraded_from


@pytest.fixture
async def store(tmp_path: Path):
    st = Store.for_data_dir(tmp_path)
    await st.migrate()
    yield st
    await st.close()


async def test_serial_grows_survives_restart_and_notifies(store: Store, tmp_path: Path) -> None:
    seen: list[int] = []
    store.add_listener(seen.append)
    assert await store.serial() == 0
    async with store.change("a") as s:
        s.add(User(email="a@example.com"))
    async with store.change("b") as s:
        s.add(Group(name="g"))
    assert seen == [1, 2] and await store.serial() == 2
    # A failed change bumps nothing and tells nobody.
    with pytest.raises(RuntimeError):
        async with store.change("c") as s:
            s.add(Group(name="h"))
            raise RuntimeError("boom")
    assert seen == [1, 2] and await store.serial() == 2
    # A write that does not affect maps does not bump the serial.
    async with store.write() as s:
        s.add(User(email="b@example.com"))
    assert await store.serial() == 2
    await store.close()
    again = Store.for_data_dir(tmp_path)
    await again.migrate()  # idempotent
    try:
        assert await again.serial() == 2
        async with again.change("d"):
            pass
        assert await again.serial() == 3
    finally:
        await again.close()


async def test_wal_mode_foreign_keys_and_alembic_head(store: Store) -> None:
    async with store.session() as s:
        conn = await s.connection()
        assert (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar() == HEAD
        tables = {r[0] for r in await conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"users", "groups", "peers", "setup_keys", "policies", "events", "admin_tokens", "meta",
                "idp_signing_keys", "idp_device_codes", "idp_refresh_tokens", "subsystems"} <= tables
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1


async def test_snapshot_reflects_groups_and_deletes(store: Store) -> None:
    async with store.change() as s:
        alice = User(email="alice@example.com", role="admin")
        p1 = Peer(name="p1", mesh_ip="100.64.0.2", wg_public_key="k1", credential_hash="x",
                  flags={"allow_server_ssh": True, "enable_ssh_root": True})
        p2 = Peer(name="p2", mesh_ip="100.64.0.3", wg_public_key="k2", credential_hash="y")
        g = Group(name="g", peers=[p1, p2], users=[alice])
        s.add_all([alice, p1, p2, g, Policy(name="pol", rules=[{"sources": ["g"], "destinations": ["g"],
                                                                  "protocol": "ssh"}])])
    state = await store.load_state(network="100.64.0.0/10", dns_domain="example.mesh")
    assert [p.name for p in state.peers] == ["p1", "p2"]
    assert state.peers[0].fqdn == "p1.example.mesh" and state.peers[0].allow_server_ssh
    assert state.peers[0].enable_ssh_root and not state.peers[1].allow_server_ssh
    assert state.groups[0].peer_ids == {p1.id, p2.id} and state.groups[0].user_ids == {alice.id}
    assert state.policies[0].rules[0].protocol == "ssh"
    assert state.serial == await store.serial() and state.network == "100.64.0.0/10"
    async with store.change() as s:
        await s.delete(await s.get(Peer, p2.id))
    state = await store.load_state()
    assert state.groups[0].peer_ids == {p1.id}  # membership went with the peer


def test_passwords() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct" not in h
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "wrong")
    assert not verify_password(None, "anything")
    assert not verify_password("not-a-hash", "anything")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_normalise_url(url: str, expected: str) -> None:
    assert normalise_url(url) == expected


async def test_migration_0003_adds_challenges_and_rekey_approval_to_an_older_database(tmp_path: Path) -> None:
    schema = await upgraded_from(tmp_path, "0002", "DROP TABLE peer_challenges",
                                 "ALTER TABLE peers DROP COLUMN rekey_approved_until")
    assert "peer_challenges" in schema.tables and "rekey_approved_until" in schema.columns["peers"]
    assert schema.version == HEAD


async def test_a_cancelled_session_hands_its_connection_back_before_it_ends(store: Store) -> None:
    """meshmgmt cancels tasks that are inside a session when it stops (the sync hub's
    loop and serial poll, the issuer's maintenance, handlers aiohttp gives up on). If the
    cancelled task ends while its session is still closing, shutdown disposes of the
    engine and ends the loop under that close, and the pool logs "Exception during reset
    or similar" at error (SQLAlchemy before 2.1.2 closed that way; hence its floor)."""
    import asyncio

    from sqlalchemy import text

    closing, release = asyncio.Event(), asyncio.Event()

    async def request() -> None:
        async with store.session() as s:
            await s.execute(text("SELECT 1"))
            real_close = s.sync_session.close

            def slow_close() -> None:  # failure injection: the close waits for the test
                closing.set()
                from sqlalchemy.util import await_only

                await_only(release.wait())
                real_close()

            s.sync_session.close = slow_close  # type: ignore[method-assign]

    task = asyncio.create_task(request())
    await asyncio.wait_for(closing.wait(), 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for its close, with the connection out
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.engine.pool.checkedout() == 0
