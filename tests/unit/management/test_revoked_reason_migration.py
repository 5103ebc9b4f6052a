"""Migration 0005 on a database from before it: refresh tokens get `revoked_reason`, and
a token revoked before the upgrade is still refused, in the general wording."""

from __future__ import annotations

from pathlib import Path

from meshmgmt.idp.grants import revoked_text

from .migrations import HEAD, upgraded_from


async def test_upgrade_adds_the_revoked_reason(tmp_path: Path) -> None:
    schema = await upgraded_from(tmp_path, "0004", "ALTER TABLE idp_refresh_tokens DROP COLUMN revoked_reason")
    assert schema.version == HEAD and "revoked_reason" in schema.columns["idp_refresh_tokens"]
    assert revoked_text(None) == "this login was revoked"
