"""Agencies (OpenID Connect clients) and the hub's signing keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, Text
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
    #: ``config`` when declared in the settings file (kept in sync at start), else ``cli``
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
            "source": self.source,
            "created_at": self.created_at.isoformat(),
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


class RefreshToken(Base):
    """A refresh token, stored as a hash. Tokens of one grant form a family: each use
    rotates to a new token; presenting a used one revokes the family (RFC 9700 4.14.2)."""

    __tablename__ = "refresh_tokens"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    grant_id: Mapped[str] = mapped_column(String(32), index=True)
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    scope: Mapped[str] = mapped_column(String(500))
    sid: Mapped[str] = mapped_column(String(64))
    acr: Mapped[str] = mapped_column(String(255))
    amr: Mapped[list[str]] = mapped_column(JSON)
    auth_time: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: absolute end of the family: rotation never extends it
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
