"""Agencies (OpenID Connect clients) and the hub's signing keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from kernel.db import Base, UTCDateTime, utcnow


class Agency(Base):
    __tablename__ = "agencies"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    #: ``sha256$<hex>`` of the client secret; the secret itself is never stored
    secret_hash: Mapped[str] = mapped_column(String(100))
    redirect_uris: Mapped[list[str]] = mapped_column(JSON)
    sector_identifier: Mapped[str] = mapped_column(String(255))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    token_endpoint_auth_method: Mapped[str] = mapped_column(String(40))
    subject_type: Mapped[str] = mapped_column(String(20), default="pairwise")
    id_token_signed_response_alg: Mapped[str] = mapped_column(String(10), default="ES256")
    #: RP-Initiated Logout 1.0 section 3.1: where the agency may ask to be sent after logout,
    #: compared as exact strings
    post_logout_redirect_uris: Mapped[list[str]] = mapped_column(
        JSON, default=list, server_default=text("'[]'")
    )
    #: Back-Channel Logout 1.0 section 2.2: where the hub POSTs logout tokens
    backchannel_logout_uri: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    #: RFC 8935: where the hub pushes Security Event Tokens (consent withdrawn)
    event_delivery_uri: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    #: RFC 7591 2: the agency's public keys for ``private_key_jwt`` (RFC 7523 3), inline...
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: ...or where the hub fetches them (at most one of the two)
    jwks_uri: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    #: ``config`` when declared in the settings file (kept in sync at start), ``api`` when
    #: registered through the admin API, else ``cli``
    source: Mapped[str] = mapped_column(String(20), default="cli")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def describe(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "name": self.name,
            "redirect_uris": list(self.redirect_uris),
            "sector_identifier": self.sector_identifier,
            "scopes": list(self.scopes),
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "subject_type": self.subject_type,
            "id_token_signed_response_alg": self.id_token_signed_response_alg,
            "post_logout_redirect_uris": list(self.post_logout_redirect_uris or []),
            "backchannel_logout_uri": self.backchannel_logout_uri,
            # every logout token carries ``sid`` (Back-Channel Logout 1.0 2.2, 2.4)
            "backchannel_logout_session_required": True,
            "event_delivery_uri": self.event_delivery_uri,
            "jwks": self.jwks,
            "jwks_uri": self.jwks_uri,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


class SigningKey(Base):
    """A signing key. The private part is encrypted at rest.

    Life cycle: published from ``created_at``; signs from ``activates_at``; after a newer key
    activates it stays published until ``retire_after`` so tokens it signed still verify.
    """

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(10))
    private_jwk_encrypted: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activates_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    retire_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RefreshGrantRecord(Base):
    """A refresh grant: what one authorization gave an agency for offline access, and its
    one live refresh token (RFC 6749 6, rotated on every use: RFC 9700 4.14.2).

    A token is ``<grant_id>.<secret>``; the row keeps the hash of the live one only. Each use
    rotates it in place, so a grant is one row however often it is refreshed. A token of the
    grant whose hash is not the live one's, presented by the grant's own agency (its client
    authenticated), is a used one presented again, or a forgery that takes the agency's
    credentials and the grant's id (which only the grant's tokens carry): either way the
    grant is revoked, with every token it had or will have. Revoking, or asking "is it revoked?", is
    one row whatever the grant's history.

    Grants issued before migration 0012 keep their tokens in :class:`RefreshToken` until
    their first rotation here, or their end."""

    __tablename__ = "refresh_grants"
    __table_args__ = (
        # RefreshTokens.revoke_account: an account's grants, optionally one agency's
        Index("ix_refresh_grants_account_client", "account_id", "client_id"),
        # the housekeeping purge finds the grants that have ended (RefreshTokens.purge_expired)
        Index("ix_refresh_grants_expires_at", "expires_at"),
    )

    grant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: absolute end of the grant: rotation never extends it
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: SHA-256 of the live token; NULL between a use and the rotated token's issue, and for a
    #: grant whose live token is still in refresh_tokens (issued before migration 0012).
    #: Not indexed: tokens are found by the grant id they carry, so a rotation rewrites no
    #: index.
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: what the live token grants (a refresh may narrow the scope: RFC 6749 6)
    scope: Mapped[str | None] = mapped_column(String(500), nullable=True)
    sid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acr: Mapped[str | None] = mapped_column(String(255), nullable=True)
    amr: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    auth_time: Mapped[int | None] = mapped_column(nullable=True)
    #: how many times the grant was refreshed, and when last
    rotations: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: why: ``reuse`` (a token of the grant presented that is not its live one), ``revoked``
    #: (RFC 7009, by the agency), ``consent_withdrawn`` (by the citizen), ``account_deleted``,
    #: ``legacy`` (revoked before this table existed), ``no_offline_consent`` (issued before
    #: offline access needed the citizen's consent: ``civitas tokens revoke-unconsented``)
    revoked_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)


class RefreshToken(Base):
    """A refresh token issued before migration 0012, stored as a hash, of a grant
    (:class:`RefreshGrantRecord`). Read only to use, find or recognise those tokens: the
    first use of a live one moves its grant to the new format, and a used one presented
    again revokes its grant. No row is written here any more; the housekeeping purge deletes
    them as their grants end, within the refresh-token lifetime."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        # the housekeeping purge finds the tokens of ended grants (RefreshTokens.purge_expired)
        Index("ix_refresh_tokens_expires_at", "expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: (no index on the grant, agency or account: tokens are found by their hash; grants by
    #: agency and account in refresh_grants)
    grant_id: Mapped[str] = mapped_column(String(32))
    client_id: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(500))
    sid: Mapped[str] = mapped_column(String(64))
    acr: Mapped[str] = mapped_column(String(255))
    amr: Mapped[list[str]] = mapped_column(JSON)
    auth_time: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: absolute end of the family: rotation never extends it
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LogoutDelivery(Base):
    """A token waiting to be POSTed to an agency: a logout token (Back-Channel Logout 1.0
    section 2.5, ``kind`` ``backchannel_logout``) or a Security Event Token (RFC 8935 push
    delivery, ``kind`` ``security_event``); ``logout_uri`` is the endpoint either way.

    Rows outlive a restart. ``next_attempt_at`` is NULL once the row is settled: delivered
    (``delivered_at`` set) or given up (``last_error`` says why). ``claimed_until`` is the lease
    of the worker delivering it now, so two workers never post the same row at once.
    """

    __tablename__ = "logout_deliveries"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), default="backchannel_logout",
                                      server_default=text("'backchannel_logout'"))
    client_id: Mapped[str] = mapped_column(String(128))
    logout_uri: Mapped[str] = mapped_column(String(2000))
    #: the signed logout token last minted for this row (re-minted when close to expiry)
    token: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True,
                                                             index=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
