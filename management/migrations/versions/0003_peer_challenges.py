"""Registration proofs: single-use challenges and an admin's re-key approval.

`peer_challenges` holds the challenges of POST /api/peers/challenge (any replica checks
the answer); `peers.rekey_approved_until` is set by `meshmgmt peers approve-rekey`. As in
0002, a database that 0001 built from newer models already has both: add what is missing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("peer_challenges"):
        op.create_table(
            "peer_challenges",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("wg_public_key", sa.String(64), nullable=False),
            sa.Column("box_key", sa.String(64), nullable=False),
            sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_peer_challenges_expires_at", "peer_challenges", ["expires_at"])
    if "rekey_approved_until" not in {c["name"] for c in inspector.get_columns("peers")}:
        with op.batch_alter_table("peers") as batch:
            batch.add_column(sa.Column("rekey_approved_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("rekey_approved_until")
    op.drop_table("peer_challenges")
