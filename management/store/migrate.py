"""Run Alembic on a live (sync-facing) connection; called by `Store.migrate()`.

The migration scripts live in `management/migrations`. The issuer's tables
(`management/idp/models.py`) are imported first so the metadata is complete.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def import_all_models() -> None:
    """Register every table on `Base.metadata` (core here, issuer in management.idp)."""
    importlib.import_module("management.store.models")
    try:
        importlib.import_module("management.idp.models")
    except ModuleNotFoundError as exc:
        if exc.name not in ("management.idp", "management.idp.models"):
            raise


def alembic_config(connection: Any = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Any) -> None:
    import_all_models()
    command.upgrade(alembic_config(connection), "head")
