"""consent_decisions.subject_salt: the ledger entry of an agency's question names its subject
and consent record only through a salted commitment (SHA-256 of the salt and the two), and
the salt is kept in the decision's row. The decision log's retention purge deletes the row
and so the salt with it: the entry, which is never altered, then says that an agency asked,
for which claim and purpose and what it was told, but no longer about whom. Rows written
before this revision keep no salt, and their entries name the subject and record as before
(a ledger entry cannot be changed).

Revision ID: 0014
Revises: 0013
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a nullable column with no default: PostgreSQL adds it without rewriting the table
    op.add_column("consent_decisions",
                  sa.Column("subject_salt", sa.LargeBinary(16), nullable=True))


def downgrade() -> None:
    op.drop_column("consent_decisions", "subject_salt")
