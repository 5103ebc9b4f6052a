"""Alembic environment: always run with a connection handed in by `Store.migrate()`."""

from alembic import context

from meshmgmt.store.migrate import import_all_models
from meshmgmt.store.models import Base

import_all_models()

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations through `meshmgmt init` / `meshmgmt serve`, not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
