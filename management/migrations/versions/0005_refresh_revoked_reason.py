"""Why a refresh token was revoked: `idp_refresh_tokens.revoked_reason`.

A client presenting a revoked token is told what ended its login (the account was
blocked, the password changed, a token was used twice), instead of one sentence that
lists every cause. Rows revoked before this revision keep NULL and get the general
wording.

0001 builds the schema with `create_all` from the models of its day, so a database
created after this column was added already has it; add it only where missing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("idp_refresh_tokens")}
    if "revoked_reason" not in columns:
        op.add_column("idp_refresh_tokens", sa.Column("revoked_reason", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("idp_refresh_tokens", "revoked_reason")
