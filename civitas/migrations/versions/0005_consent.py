"""consent: records and their append-only events (ISO/IEC TS 27560), receipts, agency decisions

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consent_records",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("schema_version", sa.String(length=80), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["constituent_accounts.id"],
                                name=op.f("fk_consent_records_account_id_constituent_accounts"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_records")),
        sa.UniqueConstraint("account_id", "client_id",
                            name=op.f("uq_consent_records_account_id_client_id")),
    )
    op.create_index("ix_consent_records_client_subject", "consent_records",
                    ["client_id", "subject"])
    op.create_table(
        "consent_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("claims", sa.JSON(), nullable=False),
        sa.Column("declined", sa.JSON(), nullable=False),
        sa.Column("affected", sa.JSON(), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("notice_version", sa.String(length=64), nullable=False),
        sa.Column("notice_language", sa.String(length=16), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("receipt_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(["record_id"], ["consent_records.id"],
                                name=op.f("fk_consent_events_record_id_consent_records"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_events")),
        sa.UniqueConstraint("record_id", "seq", name=op.f("uq_consent_events_record_id_seq")),
    )
    op.create_table(
        "consent_receipts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("record_id", sa.String(length=32), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["event_id"], ["consent_events.id"],
                                name=op.f("fk_consent_receipts_event_id_consent_events"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["record_id"], ["consent_records.id"],
                                name=op.f("fk_consent_receipts_record_id_consent_records"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_receipts")),
        sa.UniqueConstraint("event_id", name=op.f("uq_consent_receipts_event_id")),
    )
    op.create_index(op.f("ix_consent_receipts_record_id"), "consent_receipts", ["record_id"])
    op.create_index(op.f("ix_consent_receipts_account_id"), "consent_receipts", ["account_id"])
    op.create_table(
        "consent_decisions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=True),
        sa.Column("record_id", sa.String(length=32), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("claim", sa.String(length=128), nullable=False),
        sa.Column("purpose", sa.String(length=128), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_decisions")),
    )
    op.create_index("ix_consent_decisions_client_at", "consent_decisions", ["client_id", "at"])
    op.create_index("ix_consent_decisions_account_at", "consent_decisions",
                    ["account_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_consent_decisions_account_at", table_name="consent_decisions")
    op.drop_index("ix_consent_decisions_client_at", table_name="consent_decisions")
    op.drop_table("consent_decisions")
    op.drop_index(op.f("ix_consent_receipts_account_id"), table_name="consent_receipts")
    op.drop_index(op.f("ix_consent_receipts_record_id"), table_name="consent_receipts")
    op.drop_table("consent_receipts")
    op.drop_table("consent_events")
    op.drop_index("ix_consent_records_client_subject", table_name="consent_records")
    op.drop_table("consent_records")
