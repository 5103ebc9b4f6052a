"""Token lifetimes: refresh-token families end at a fixed time, admin tokens expire.

- `idp_refresh_tokens.family_expires_at`: a family's end (its login time plus the
  absolute lifetime, 30 days by default). Existing families get their first token's
  creation time plus 30 days.
- `admin_tokens.expires_at`: existing admin tokens get 90 days from the upgrade, so an
  upgrade locks nobody out (`meshmgmt admin-token rotate` makes a new one).

0001 builds the schema with `create_all` from the models of its day, so a database
created after these columns were added already has them; add them only where missing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FAMILY_LIFETIME = timedelta(days=30)  # the default of IssuerSettings.refresh_family_ttl
ADMIN_TOKEN_LIFETIME = timedelta(days=90)  # the default of `meshmgmt init`


def _has_column(table: str, column: str) -> bool:
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    bind = op.get_bind()
    if not _has_column("idp_refresh_tokens", "family_expires_at"):
        op.add_column("idp_refresh_tokens", sa.Column("family_expires_at", sa.DateTime(timezone=True), nullable=True))
        tokens = sa.table("idp_refresh_tokens", sa.column("family_id", sa.String),
                          sa.column("created", sa.DateTime(timezone=True)),
                          sa.column("family_expires_at", sa.DateTime(timezone=True)))
        starts = bind.execute(sa.select(tokens.c.family_id, sa.func.min(tokens.c.created))
                              .group_by(tokens.c.family_id)).all()
        for family_id, started in starts:
            if started.tzinfo is None:  # SQLite hands back naive UTC
                started = started.replace(tzinfo=timezone.utc)
            bind.execute(tokens.update().where(tokens.c.family_id == family_id)
                         .values(family_expires_at=started + FAMILY_LIFETIME))
    if not _has_column("admin_tokens", "expires_at"):
        op.add_column("admin_tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        admin = sa.table("admin_tokens", sa.column("expires_at", sa.DateTime(timezone=True)))
        bind.execute(admin.update().values(expires_at=datetime.now(timezone.utc) + ADMIN_TOKEN_LIFETIME))


def downgrade() -> None:
    op.drop_column("admin_tokens", "expires_at")
    op.drop_column("idp_refresh_tokens", "family_expires_at")
