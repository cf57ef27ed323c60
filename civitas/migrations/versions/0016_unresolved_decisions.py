"""ix_consent_decisions_unresolved: the agencies' questions that resolved to no one, by the
(agency, subject) they named, a partial index (only those rows: an erased account's are
left without a subject, a resolved question is found through its account). Erasure (GDPR
Art. 17) now also strips such a question when it named one of the erased account's
pairwise subjects: an agency can ask before the citizen signs in there, knowing the `sub`
from another agency of its sector.

Building it reads the whole table once and blocks writes to it meanwhile (PostgreSQL's
CREATE INDEX; CONCURRENTLY would not, but cannot run in Alembic's transaction): 1.3 s on
2.1M decision rows of which 1M unresolved, an index of 74 MiB (bench/erasure_scale.py,
bench/README.md: the twenty-fifth session).

Revision ID: 0016
Revises: 0015
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

#: consent.models.UNRESOLVED, as of this revision
UNRESOLVED = "account_id IS NULL AND subject IS NOT NULL"


def upgrade() -> None:
    op.create_index("ix_consent_decisions_unresolved", "consent_decisions",
                    ["client_id", "subject"], postgresql_where=sa.text(UNRESOLVED),
                    sqlite_where=sa.text(UNRESOLVED))


def downgrade() -> None:
    op.drop_index("ix_consent_decisions_unresolved", table_name="consent_decisions")
