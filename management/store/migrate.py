"""Run Alembic on a live (sync-facing) connection; called by `Store.migrate()`.

The migration scripts live in `management/migrations`. The issuer's tables
(`management/idp/models.py`) are imported first so the metadata is complete.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

# Alembic logs a dozen INFO lines per start (plugin set-up when it is imported, the
# migration context); the store logs one `store.migrated` event instead. Set before the
# first `import alembic`, which is why alembic is imported inside the functions below.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def import_all_models() -> None:
    """Register every table on `Base.metadata` (core here, issuer in meshmgmt.idp)."""
    importlib.import_module("meshmgmt.store.models")
    try:
        importlib.import_module("meshmgmt.idp.models")
    except ModuleNotFoundError as exc:
        if exc.name not in ("meshmgmt.idp", "meshmgmt.idp.models"):
            raise


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Any) -> tuple[str | None, str | None]:
    """(revision before, revision after), for the caller's one log event."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    import_all_models()
    before = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(alembic_config(connection), "head")
    return before, MigrationContext.configure(connection).get_current_revision()
