"""Migration 0004 on a database from before it: refresh-token families get an end, admin
tokens an expiry, and nobody is locked out by the upgrade."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text

from meshmgmt.store import Store, sqlite_url
from meshmgmt.store.models import aware

from .migrations import HEAD, upgraded_from

_TOKEN = ("INSERT INTO idp_refresh_tokens (id, token_hash, family_id, user_id, client_id, scope, created, expires_at) "
          "VALUES ('{id}', 'h{id}', '{family}', 'u1', 'meshssh', '', '{created}', '2026-12-30 00:00:00')")


def _utc(value: object) -> datetime:
    parsed = aware(datetime.fromisoformat(str(value)))
    assert parsed is not None
    return parsed


async def test_upgrade_backfills_family_ends_and_admin_token_expiry(tmp_path: Path) -> None:
    before = datetime.now(timezone.utc)
    schema = await upgraded_from(
        tmp_path, "0003",
        "ALTER TABLE idp_refresh_tokens DROP COLUMN family_expires_at",
        "ALTER TABLE admin_tokens DROP COLUMN expires_at",
        "INSERT INTO users (id, email, name, role, is_service, blocked, created) "
        "VALUES ('u1', 'a@example.com', '', 'user', 0, 0, '2026-11-01 00:00:00')",
        _TOKEN.format(id="t0", family="f1", created="2026-11-01 00:00:00"),
        _TOKEN.format(id="t1", family="f1", created="2026-11-20 00:00:00"),
        _TOKEN.format(id="t2", family="f2", created="2026-11-25 12:00:00"),
        "INSERT INTO admin_tokens (id, token_hash, name, created) VALUES ('a1', 'x', 'init', '2025-01-01 00:00:00')",
    )
    assert schema.version == HEAD and "family_expires_at" in schema.columns["idp_refresh_tokens"]
    store = Store(sqlite_url(tmp_path))
    try:
        async with store.session() as s:
            ends = dict((await s.execute(text("SELECT id, family_expires_at FROM idp_refresh_tokens"))).all())
            expiry = (await s.execute(text("SELECT expires_at FROM admin_tokens"))).scalar_one()
    finally:
        await store.close()
    first = datetime(2026, 11, 1, tzinfo=timezone.utc) + timedelta(days=30)
    assert _utc(ends["t0"]) == _utc(ends["t1"]) == first  # a family ends 30 days after its first token
    assert _utc(ends["t2"]) == datetime(2026, 11, 25, 12, tzinfo=timezone.utc) + timedelta(days=30)
    assert before + timedelta(days=89) < _utc(expiry) < before + timedelta(days=91)  # 90 days from the upgrade
