"""refresh_grants: one row per refresh grant, which holds its live token and revocation.

Until now every rotation of a refresh token added a row to refresh_tokens and kept the used
one, so that presenting it again would be recognised (RFC 9700 4.14.2): 8,640 rows in the
30 days a grant lives at one refresh every 5 minutes, and revoking a grant marked them all.
Now a token carries its grant's id (``<grant_id>.<secret>``), the grant's row keeps the hash
of its live token only, and a rotation rewrites it in place: a token of the grant that is not
the live one is a used one presented again. The revocation is one row, and an account's
grants are found through this table.

Filled from refresh_tokens: a grant is revoked when any of its tokens was (the rule until
now), at the first such time, with the reason ``legacy``. Those grants' tokens stay in
refresh_tokens, which is read only to use, find or recognise them: the first use of a live
one moves its grant here (its row then holds the new token), and a used one still revokes
its grant. No row is written there any more; the purge empties it as the grants end. The
tokens' ``revoked_at`` column and the indexes nothing reads any more (grant, agency, account,
and the partial index of revoked rows) are dropped.

A refresh token must now have its grant's row, or it is refused. A worker of an earlier
version still running after this migration writes tokens without one; those are refused,
which fails closed: the agency signs the citizen in again. ``civitas serve`` migrates before
it starts its workers.

Revision ID: 0012
Revises: 0011
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refresh_grants",
        sa.Column("grant_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("scope", sa.String(length=500), nullable=True),
        sa.Column("sid", sa.String(length=64), nullable=True),
        sa.Column("acr", sa.String(length=255), nullable=True),
        sa.Column("amr", sa.JSON(), nullable=True),
        sa.Column("auth_time", sa.Integer(), nullable=True),
        sa.Column("rotations", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_refresh_grants")),
    )
    # a grant's tokens share its agency, account and absolute end (rotation copies them)
    op.execute("""
        INSERT INTO refresh_grants (grant_id, client_id, account_id, created_at, expires_at,
                                    revoked_at, revoked_reason)
        SELECT grant_id, min(client_id), min(account_id), min(created_at), max(expires_at),
               min(revoked_at), CASE WHEN min(revoked_at) IS NULL THEN NULL ELSE 'legacy' END
        FROM refresh_tokens GROUP BY grant_id
    """)
    op.create_index("ix_refresh_grants_account_client", "refresh_grants",
                    ["account_id", "client_id"])
    op.create_index("ix_refresh_grants_expires_at", "refresh_grants", ["expires_at"])
    op.drop_index("ix_refresh_tokens_revoked_grant", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_grant_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_client_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_account_id", table_name="refresh_tokens")
    # (no batch mode: SQLite drops a plain, unindexed column in place)
    op.drop_column("refresh_tokens", "revoked_at")


def downgrade() -> None:
    op.add_column("refresh_tokens",
                  sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    # each grant's live token goes back to refresh_tokens, where 0011 looks for it by hash
    # (it hashes the whole token, the grant id in front included), so no agency loses one
    op.execute("""
        INSERT INTO refresh_tokens (token_hash, grant_id, client_id, account_id, scope, sid,
                                    acr, amr, auth_time, created_at, expires_at)
        SELECT token_hash, grant_id, client_id, account_id, scope, sid, acr, amr, auth_time,
               coalesce(rotated_at, created_at), expires_at
        FROM refresh_grants WHERE token_hash IS NOT NULL
    """)
    # the rule of 0011: a grant is revoked when its tokens are
    op.execute("""
        UPDATE refresh_tokens SET revoked_at = (
            SELECT g.revoked_at FROM refresh_grants g WHERE g.grant_id = refresh_tokens.grant_id)
        WHERE grant_id IN (SELECT grant_id FROM refresh_grants WHERE revoked_at IS NOT NULL)
    """)
    op.create_index("ix_refresh_tokens_account_id", "refresh_tokens", ["account_id"])
    op.create_index("ix_refresh_tokens_client_id", "refresh_tokens", ["client_id"])
    op.create_index("ix_refresh_tokens_grant_id", "refresh_tokens", ["grant_id"])
    op.create_index("ix_refresh_tokens_revoked_grant", "refresh_tokens", ["grant_id"],
                    postgresql_where=sa.text("revoked_at IS NOT NULL"),
                    sqlite_where=sa.text("revoked_at IS NOT NULL"))
    op.drop_index("ix_refresh_grants_expires_at", table_name="refresh_grants")
    op.drop_index("ix_refresh_grants_account_client", table_name="refresh_grants")
    op.drop_table("refresh_grants")
