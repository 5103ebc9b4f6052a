"""Per-peer and per-group SSH subsystems (`subsystems` table).

0001 builds the schema with `create_all` from the models of its day, so a database
created after this table was added already has it; create it only where it is missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("subsystems"):
        return
    op.create_table(
        "subsystems",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("peer_id", sa.String(32), sa.ForeignKey("peers.id", ondelete="CASCADE"), nullable=True),
        sa.Column("group_id", sa.String(32), sa.ForeignKey("groups.id", ondelete="CASCADE"), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("peer_id", "name", name="uq_subsystems_peer_name"),
        sa.UniqueConstraint("group_id", "name", name="uq_subsystems_group_name"),
    )
    op.create_index("ix_subsystems_peer_id", "subsystems", ["peer_id"])
    op.create_index("ix_subsystems_group_id", "subsystems", ["group_id"])


def downgrade() -> None:
    op.drop_table("subsystems")
