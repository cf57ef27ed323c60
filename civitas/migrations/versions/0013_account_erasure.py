"""constituent_accounts.erased_at: when an account's erasure was finished. Deleting an account
now closes it first (``deleted_at``: no sign-in, token or claim from then on) and then
revokes its refresh grants, withdraws its consents and removes its personal data; an erasure
cut off part-way is finished by housekeeping, which finds it through a partial index (the
accounts closed and not yet erased: few rows at any size). Accounts deleted before this
revision were erased in the same request (the account went last), so they are marked erased
at their deletion time.

Revision ID: 0013
Revises: 0012
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

PENDING = "deleted_at IS NOT NULL AND erased_at IS NULL"


def upgrade() -> None:
    # (no batch mode: SQLite adds and drops a plain column in place, whereas copying the
    # table would trip the foreign keys that point at it)
    op.add_column("constituent_accounts",
                  sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE constituent_accounts SET erased_at = deleted_at "
               "WHERE deleted_at IS NOT NULL")
    op.create_index("ix_accounts_erasure_pending", "constituent_accounts", ["deleted_at"],
                    postgresql_where=sa.text(PENDING), sqlite_where=sa.text(PENDING))


def downgrade() -> None:
    op.drop_index("ix_accounts_erasure_pending", table_name="constituent_accounts")
    op.drop_column("constituent_accounts", "erased_at")
