"""Migration 0003 on a database from before it: refresh-token families get an end, admin
tokens an expiry, and nobody is locked out by the upgrade."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text

from management.store import Store, sqlite_url
from management.store.models import aware


async def test_upgrade_backfills_family_ends_and_admin_token_expiry(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    try:
        await store.migrate()
        async with store.session() as s:  # back to the 0002 schema, with rows of that time
            await s.execute(text("ALTER TABLE idp_refresh_tokens DROP COLUMN family_expires_at"))
            await s.execute(text("ALTER TABLE admin_tokens DROP COLUMN expires_at"))
            await s.execute(text("UPDATE alembic_version SET version_num = '0002'"))
            await s.execute(text("INSERT INTO users (id, email, name, role, is_service, blocked, created) "
                                 "VALUES ('u1', 'a@example.com', '', 'user', 0, 0, '2026-11-01 00:00:00')"))
            for i, (family, created) in enumerate([("f1", "2026-11-01 00:00:00"), ("f1", "2026-11-20 00:00:00"),
                                                   ("f2", "2026-11-25 12:00:00")]):
                await s.execute(text(
                    "INSERT INTO idp_refresh_tokens (id, token_hash, family_id, user_id, client_id, scope, created, "
                    "expires_at) VALUES (:id, :h, :f, 'u1', 'meshssh', '', :c, '2026-12-30 00:00:00')"),
                    {"id": f"t{i}", "h": f"h{i}", "f": family, "c": created})
            await s.execute(text("INSERT INTO admin_tokens (id, token_hash, name, created) "
                                 "VALUES ('a1', 'x', 'init', '2025-01-01 00:00:00')"))
            await s.commit()
        before = datetime.now(timezone.utc)
        await store.migrate()
        async with store.session() as s:
            ends = dict((await s.execute(text(
                "SELECT id, family_expires_at FROM idp_refresh_tokens"))).all())
            expiry = (await s.execute(text("SELECT expires_at FROM admin_tokens"))).scalar_one()
    finally:
        await store.close()

    def parse(value: str) -> datetime:
        return aware(datetime.fromisoformat(str(value)))  # type: ignore[return-value]

    first = datetime(2026, 11, 1, tzinfo=timezone.utc) + timedelta(days=30)
    assert parse(ends["t0"]) == parse(ends["t1"]) == first  # a family ends 30 days after its first token
    assert parse(ends["t2"]) == datetime(2026, 11, 25, 12, tzinfo=timezone.utc) + timedelta(days=30)
    assert before + timedelta(days=89) < parse(expiry) < before + timedelta(days=91)  # 90 days from the upgrade
