"""Constituent accounts and the credentials linked to them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from kernel.db import Base, UTCDateTime, utcnow
from kernel.ids import new_id


def new_account_id() -> str:
    return new_id()


class ConstituentAccount(Base):
    """One person, whatever credentials they log in with."""

    __tablename__ = "constituent_accounts"

    __table_args__ = (
        # the erasures still to finish (housekeeping): few rows, whatever the table's size
        Index("ix_accounts_erasure_pending", "deleted_at",
              postgresql_where=text("deleted_at IS NOT NULL AND erased_at IS NULL"),
              sqlite_where=text("deleted_at IS NOT NULL AND erased_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_account_id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: set when the citizen deleted the account: from then on it is closed (no sign-in, no
    #: token, no claim). The pseudonymous id stays so audit records that name it keep their
    #: meaning
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: set when its erasure was finished: refresh grants revoked, consents withdrawn,
    #: personal data and credentials gone (housekeeping finishes one that was cut off)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LinkedIdentity(Base):
    """A credential at an upstream: (connector, upstream subject) -> one account."""

    __tablename__ = "linked_identities"
    __table_args__ = (UniqueConstraint("connector_id", "upstream_subject"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("constituent_accounts.id", ondelete="RESTRICT"), index=True
    )
    connector_id: Mapped[str] = mapped_column(String(64))
    upstream_subject: Mapped[str] = mapped_column(String(255))
    acr: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AccountAttribute(Base):
    """One attribute value as one upstream asserted it (provenance: source, time, assurance).

    The value is encrypted at rest. When upstreams disagree each keeps its own row.
    """

    __tablename__ = "account_attributes"
    __table_args__ = (
        # also the index of lookups by account (it leads with account_id; migration 0009)
        UniqueConstraint("account_id", "name", "source_connector"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("constituent_accounts.id", ondelete="RESTRICT")
    )
    name: Mapped[str] = mapped_column(String(64))
    value_encrypted: Mapped[str] = mapped_column(Text)
    source_connector: Mapped[str] = mapped_column(String(64))
    acr: Mapped[str] = mapped_column(String(255))
    asserted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AccountEvent(Base):
    """Something that happened to an account's credentials: created, linked, unlinked,
    deleted. Holds no personal data: connector id, assurance and time only."""

    __tablename__ = "account_events"
    __table_args__ = (Index("ix_account_events_account", "account_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("constituent_accounts.id", ondelete="RESTRICT")
    )
    kind: Mapped[str] = mapped_column(String(20))
    connector_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acr: Mapped[str | None] = mapped_column(String(255), nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
