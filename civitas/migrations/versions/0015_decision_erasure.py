"""consent_decisions.erased_at, and a subject that may be empty: erasing an account (right to
erasure, GDPR Art. 17) now also strips the agencies' questions about it of everything that
leads to the citizen (the subject the agency sent, the account, the consent record, the
salt of the ledger entry's subject commitment and the agency's request id), and keeps who
asked, when, what for and the answer. The ledger entries are not touched; `audit
reconcile` compares such a row with its entry apart from whom it was about.

Revision ID: 0015
Revises: 0014
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite changes a column's nullability only by copying the table (nothing
    # points at this one); PostgreSQL drops the NOT NULL in place
    with op.batch_alter_table("consent_decisions") as batch:
        batch.alter_column("subject", existing_type=sa.String(length=255), nullable=True)
        batch.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE consent_decisions SET subject = '' WHERE subject IS NULL")
    with op.batch_alter_table("consent_decisions") as batch:
        batch.drop_column("erased_at")
        batch.alter_column("subject", existing_type=sa.String(length=255), nullable=False)
