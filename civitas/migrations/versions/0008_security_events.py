"""security events: agencies' event delivery URI (RFC 8935); one delivery queue for logout
tokens and Security Event Tokens (a ``kind`` per row)

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agencies") as batch:
        batch.add_column(sa.Column("event_delivery_uri", sa.String(length=2000), nullable=True))
    with op.batch_alter_table("logout_deliveries") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=32), nullable=False,
                                   server_default=sa.text("'backchannel_logout'")))


def downgrade() -> None:
    with op.batch_alter_table("logout_deliveries") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("agencies") as batch:
        batch.drop_column("event_delivery_uri")
