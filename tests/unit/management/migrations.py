"""Upgrading an older database: build one at head, undo a revision's work by hand, migrate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import text

from meshmgmt.store import Store, sqlite_url
from meshmgmt.store.migrate import alembic_config

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@dataclass(frozen=True)
class Schema:
    tables: set[str]
    columns: dict[str, set[str]]
    version: str


async def upgraded_from(tmp_path: Path, revision: str, *undo: str) -> Schema:
    """The schema after migrating a database that `undo` (SQL) set back to `revision`."""
    store = Store(sqlite_url(tmp_path))
    try:
        await store.migrate()
        async with store.session() as s:
            for statement in undo:
                await s.execute(text(statement))
            await s.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
            await s.commit()
        await store.migrate()
        async with store.session() as s:
            tables = {r[0] for r in await s.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
            columns = {t: {r[1] for r in await s.execute(text(f"PRAGMA table_info({t})"))} for t in tables}
            version = (await s.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        return Schema(tables, columns, str(version))
    finally:
        await store.close()
