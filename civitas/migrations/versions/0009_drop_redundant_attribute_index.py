"""drop ix_account_attributes_account: the unique index on (account_id, name,
source_connector) leads with the same column and serves every lookup by account (seen in the
plans of tests/test_query_plans.py); one index less to update on every attribute write

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_attributes") as batch:
        batch.drop_index("ix_account_attributes_account")


def downgrade() -> None:
    with op.batch_alter_table("account_attributes") as batch:
        batch.create_index("ix_account_attributes_account", ["account_id"], unique=False)
