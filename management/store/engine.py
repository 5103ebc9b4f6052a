"""The store: one async SQLAlchemy engine, sessions, the global serial and change feed.

    store = Store.from_url(url) / Store.for_data_dir(dir)
    await store.migrate()                 # Alembic upgrade to head (run at init and serve)
    async with store.session() as s: ...  # reads: one transaction
    async with store.write() as s: ...    # a write that no network map depends on: commits
    async with store.change("why") as s:  # a write that affects network maps: commits,
        ...                               # bumps the serial, tells every replica
    state = await store.load_state()      # a MeshState snapshot for the pure netmap code

SQLite (default, a file in the data dir) runs in WAL mode with foreign keys on; a change
is announced in-process. PostgreSQL (`postgresql://` URLs, driver asyncpg) announces
changes with NOTIFY inside the writing transaction, and every replica LISTENs, so a
change through one replica reaches sync streams on the others.

Transactions on SQLite are real: Python's sqlite3 would open one only before an
INSERT/UPDATE/DELETE, leaving every SELECT in autocommit, so two reads of one "snapshot"
could see two different commits. The driver's own handling is off (`isolation_level =
None`) and `_sqlite_begin` emits the BEGIN: plain (deferred) for a session, so all its
reads see one commit; `BEGIN IMMEDIATE` for `write()`/`change()`, which takes the write
lock up front. A deferred transaction that reads and then writes cannot wait for the lock:
if another connection committed after its first read, SQLite answers SQLITE_BUSY at once
("database is locked"), whatever busy_timeout says. So code that writes goes through
`write()`/`change()`, never `session()`. On PostgreSQL a session is READ COMMITTED (each
statement sees the latest commit), and `load_state()` reads in one REPEATABLE READ, READ
ONLY transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from meshsshd.logs import event

from .failures import StoreFailure, store_failure
from .models import Meta

log = logging.getLogger("meshmgmt.store")

CHANNEL = "meshmgmt_changes"
# Execution option naming the statement that opens a SQLite transaction (_sqlite_begin).
_SQLITE_BEGIN = "meshmgmt_sqlite_begin"
SERIAL_KEY = "serial"
MIN_FREE_BYTES = 1 << 20  # SQLite: less room than this on the database's file system is "disk full"

ChangeListener = Callable[[int], Awaitable[None] | None]


async def _commit(s: AsyncSession) -> bool:
    """Commit to the end even if the task is cancelled meanwhile, and say whether it was.

    The commit also hands the connection back to the pool, which closes it if the pool is
    over its size. A cancel landing in that close cuts it short: the pool logs an error and
    PostgreSQL keeps the half-closed connection. And a cancel between the commit and the
    change notification would leave sync streams on a stale map. So the caller finishes
    its bookkeeping first and raises the cancel after (AsyncSession shields its own close
    the same way)."""
    commit = asyncio.ensure_future(s.commit())
    cancelled = False
    while not commit.done():
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            cancelled = True
    commit.result()
    return cancelled


def normalise_url(url: str) -> str:
    """`postgresql://` → asyncpg driver; `sqlite:///path` → aiosqlite driver."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://") and not url.startswith("sqlite+"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / 'meshmgmt.db'}"


class Store:
    def __init__(self, url: str, echo: bool = False) -> None:
        self.url = normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.is_postgres = self.url.startswith("postgresql")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        writer, snapshot = self.engine, self.engine
        if self.is_sqlite:
            sa_event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            sa_event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
            writer = self.engine.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
        if self.is_postgres:
            snapshot = self.engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        self._writer = writer
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(writer, expire_on_commit=False)
        self._snapshot_sessions = async_sessionmaker(snapshot, expire_on_commit=False)
        self._listeners: list[ChangeListener] = []
        self._pg_conn: Any = None
        self._closing = False
        self._reconnect_task: asyncio.Task | None = None
        # SQLite allows one writer; serialising writes in-process avoids SQLITE_BUSY on
        # read→write lock upgrades. PostgreSQL needs no such lock.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # Why the last write failed when the store itself refused it (disk full, database
        # away); None once a write commits again. `/healthz` reports it.
        self.write_failure: StoreFailure | None = None

    @classmethod
    def for_data_dir(cls, data_dir: Path, database: str | None = None) -> Store:
        return cls(database or sqlite_url(data_dir))

    # --- sessions -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """For reads: on SQLite every read in it sees the same commit. Not for writes
        (see the module docstring): use `write()` or `change()`."""
        async with self._sessions() as s:
            yield s

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        if self._write_lock is None:
            yield
        else:
            async with self._write_lock:
                yield

    @contextlib.asynccontextmanager
    async def _watched(self) -> AsyncIterator[None]:
        """Notes when the store starts and stops refusing writes, one log line each way
        (a flood of writes onto a full disk must not become a flood of log lines)."""
        try:
            yield
        except DBAPIError as exc:
            failure = store_failure(exc)
            if failure is not None and failure != self.write_failure:
                event(log, "store.write_failed", level=logging.ERROR, reason=failure.reason,
                      disk_full=failure.disk_full)
            self.write_failure = failure or self.write_failure
            raise
        if self.write_failure is not None:
            event(log, "store.write_recovered", was=self.write_failure.reason)
            self.write_failure = None

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write that does not affect network maps (audit events, last-seen): commits."""
        async with self._locked(), self._watched(), self._write_sessions() as s:
            yield s
            if await _commit(s):
                raise asyncio.CancelledError

    async def disk_full(self) -> str | None:
        """SQLite: why the database's file system cannot take a write (under
        `MIN_FREE_BYTES` left), else None. A refused write alone does not tell: SQLite
        reuses room in its WAL, so a small probe can pass on a full disk."""
        if not self.is_sqlite:
            return None
        path = Path(self.url.split(":///", 1)[1]).parent
        try:
            st = await asyncio.to_thread(os.statvfs, path)
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize
        return f"disk full: {free} bytes free under {path}" if free < MIN_FREE_BYTES else None

    async def probe_write(self) -> None:
        """A write that changes nothing, to see whether the store takes writes again."""
        async with self.write() as s:
            await s.execute(update(Meta).where(Meta.key == SERIAL_KEY).values(value=Meta.value))

    @contextlib.asynccontextmanager
    async def change(self, reason: str = "") -> AsyncIterator[AsyncSession]:
        """A write that may change network maps: commit + serial bump + notify, or nothing."""
        async with self._locked(), self._watched(), self._write_sessions() as s:
            yield s
            serial = await self._bump(s)
            if self.is_postgres:
                await s.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": str(serial)})
            cancelled = await _commit(s)
        event(log, "store.changed", serial=serial, reason=reason)
        if not self.is_postgres or self._pg_conn is None:
            await self._fire(serial)
        if cancelled:
            raise asyncio.CancelledError

    async def _bump(self, s: AsyncSession) -> int:
        result = await s.execute(
            update(Meta).where(Meta.key == SERIAL_KEY).values(value=Meta.value + 1).returning(Meta.value)
        )
        value = result.scalar_one_or_none()
        if value is None:  # first change ever on a store created without migrate()
            await s.execute(insert(Meta).values(key=SERIAL_KEY, value=1))
            value = 1
        return int(value)

    async def serial(self) -> int:
        async with self.session() as s:
            value = (await s.execute(select(Meta.value).where(Meta.key == SERIAL_KEY))).scalar()
            return int(value or 0)

    async def bump_serial(self, reason: str) -> int:
        """Announce a change that is not a row change (e.g. the issuer rotated its keys)."""
        async with self.change(reason):
            pass
        return await self.serial()

    # --- change feed ----------------------------------------------------------------

    def add_listener(self, fn: ChangeListener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: ChangeListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    async def _fire(self, serial: int) -> None:
        for fn in list(self._listeners):
            try:
                result = fn(serial)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # one broken listener must not stop the others
                log.exception("change listener failed")

    async def start_listening(self) -> None:
        """PostgreSQL: LISTEN on a dedicated connection so other replicas' changes arrive.

        If that connection dies (database restart, network), it is re-opened with backoff
        and listeners get one catch-up call, since notifications may have been missed.
        """
        if not self.is_postgres or self._pg_conn is not None:
            return
        await self._listen_once()

    async def _listen_once(self) -> None:
        import asyncpg

        dsn = "postgresql://" + self.url.split("://", 1)[1]
        conn = await asyncpg.connect(dsn)
        loop = asyncio.get_running_loop()

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            try:
                serial = int(payload)
            except ValueError:
                serial = 0
            loop.create_task(self._fire(serial))

        def on_lost(_conn: Any) -> None:
            if self._pg_conn is conn:
                self._pg_conn = None
                self._reconnect_task = loop.create_task(self._reconnect())

        await conn.add_listener(CHANNEL, on_notify)
        conn.add_termination_listener(on_lost)
        self._pg_conn = conn
        event(log, "store.listening", channel=CHANNEL)

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self._closing:
            event(log, "store.listen_lost", level=logging.WARNING, retry_in=delay)
            await asyncio.sleep(delay)
            try:
                await self._listen_once()
            except (OSError, Exception):  # asyncpg raises many kinds while the server is away
                delay = min(delay * 2, 10.0)
                continue
            await self._fire(0)  # catch up on whatever was missed
            return

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._pg_conn is not None:
            with contextlib.suppress(Exception):
                await self._pg_conn.close()
            self._pg_conn = None
        await self.engine.dispose()

    # --- schema ---------------------------------------------------------------------

    async def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (safe with several replicas)."""
        from .migrate import upgrade

        async with self._writer.begin() as conn:
            if self.is_postgres:
                await conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            before, after = await conn.run_sync(upgrade)
        if before != after:
            event(log, "store.migrated", backend="postgresql" if self.is_postgres else "sqlite",
                  revision_from=before, revision_to=after)
        async with self._locked(), self._write_sessions() as s:
            exists = (await s.execute(select(Meta.key).where(Meta.key == SERIAL_KEY))).scalar()
            if exists is None:
                with contextlib.suppress(Exception):
                    await s.execute(insert(Meta).values(key=SERIAL_KEY, value=0))
                    await s.commit()

    # --- snapshot -------------------------------------------------------------------

    async def load_state(self, network: str = "", dns_domain: str = "") -> Any:
        """A consistent `meshmgmt.netmap.MeshState` snapshot (no issuer/JWKS filled in):
        its serial and its rows come from one commit, on SQLite and on PostgreSQL."""
        from .snapshot import load_state

        async with self._snapshot_sessions() as s:
            return await load_state(s, network=network, dns_domain=dns_domain)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
    dbapi_conn.isolation_level = None  # transactions are ours: _sqlite_begin


def _sqlite_begin(conn: Connection) -> None:
    """Open every SQLite transaction explicitly, the way its engine asked for."""
    conn.exec_driver_sql(conn.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))
