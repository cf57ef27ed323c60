"""agency keys: inline jwks or jwks_uri for private_key_jwt client authentication

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agencies") as batch:
        batch.add_column(sa.Column("jwks", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("jwks_uri", sa.String(length=2000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agencies") as batch:
        batch.drop_column("jwks_uri")
        batch.drop_column("jwks")
