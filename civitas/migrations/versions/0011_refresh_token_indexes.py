"""refresh_tokens: a partial index of the revoked rows by grant, so that reuse detection (is
any token of this grant revoked? asked on every use of a refresh token) reads the revoked
rows of the grant and not every token the grant ever rotated through. bench/refresh_scale.py
measures it. And an index on expires_at, for the housekeeping job that deletes the tokens of
grants that have ended (the table otherwise keeps a row per rotation for ever).

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_refresh_tokens_revoked_grant", "refresh_tokens", ["grant_id"],
                    postgresql_where=sa.text("revoked_at IS NOT NULL"),
                    sqlite_where=sa.text("revoked_at IS NOT NULL"))
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_expires_at", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_revoked_grant", table_name="refresh_tokens")
