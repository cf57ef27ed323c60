"""account events and account deletion

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("constituent_accounts") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "account_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("connector_id", sa.String(length=64), nullable=True),
        sa.Column("acr", sa.String(length=255), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["constituent_accounts.id"],
                                name=op.f("fk_account_events_account_id_constituent_accounts"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_events")),
    )
    op.create_index("ix_account_events_account", "account_events", ["account_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_account_events_account", table_name="account_events")
    op.drop_table("account_events")
    with op.batch_alter_table("constituent_accounts") as batch:
        batch.drop_column("deleted_at")
