"""logout: agencies' post-logout redirect URIs and back-channel logout URI; the delivery queue

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agencies") as batch:
        batch.add_column(sa.Column("post_logout_redirect_uris", sa.JSON(), nullable=False,
                                   server_default=sa.text("'[]'")))
        batch.add_column(sa.Column("backchannel_logout_uri", sa.String(length=2000),
                                   nullable=True))
    op.create_table(
        "logout_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("logout_uri", sa.String(length=2000), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_logout_deliveries")),
    )
    op.create_index(op.f("ix_logout_deliveries_next_attempt_at"), "logout_deliveries",
                    ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_logout_deliveries_next_attempt_at"), table_name="logout_deliveries")
    op.drop_table("logout_deliveries")
    with op.batch_alter_table("agencies") as batch:
        batch.drop_column("backchannel_logout_uri")
        batch.drop_column("post_logout_redirect_uris")
