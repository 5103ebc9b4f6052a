"""Initial schema: every table registered on `Base.metadata` (core and issuer).

The first revision creates the schema from the models themselves (`create_all`), so the
issuer's tables, written in parallel in `management/idp/models.py`, are covered without
copying their definitions here. Every later schema change must be its own revision with
explicit `op.*` operations (`alembic revision` against a dev database).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

from meshmgmt.store.migrate import import_all_models
from meshmgmt.store.models import Base

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    import_all_models()
    Base.metadata.create_all(op.get_bind())


def downgrade() -> None:
    import_all_models()
    Base.metadata.drop_all(op.get_bind())
