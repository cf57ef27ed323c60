"""consent_records.expires_at: when the grant a record holds stops being valid, indexed, so
the expiry job reads the grants due instead of grouping every consent event (a full scan at
millions of events). Filled from each record's last event.

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (no batch mode: SQLite adds and drops a plain column in place, whereas copying the
    # table would trip the foreign keys that point at it)
    op.add_column("consent_records",
                  sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    # the last event's validity, where it left a valid grant with an end
    # (consent.history.expiry_of); only those rows are written, the others stay NULL
    op.execute("""
        UPDATE consent_records SET expires_at = (
            SELECT e.expires_at FROM consent_events e
            WHERE e.record_id = consent_records.id
              AND e.seq = (SELECT max(l.seq) FROM consent_events l
                           WHERE l.record_id = consent_records.id))
        WHERE id IN (
            SELECT e.record_id FROM consent_events e
            WHERE e.expires_at IS NOT NULL AND e.state IN ('given', 'renewed')
              AND e.seq = (SELECT max(l.seq) FROM consent_events l
                           WHERE l.record_id = e.record_id))
    """)
    op.create_index("ix_consent_records_expires_at", "consent_records", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_consent_records_expires_at", table_name="consent_records")
    op.drop_column("consent_records", "expires_at")
