"""Consent records, their append-only events, signed receipts and agency decisions.

The shape follows ISO/IEC TS 27560:2023 (consent record information structure): a record
(id, schema version, PII principal, controller) holds an ordered list of events; each event
carries its time, type and the state it leaves the record in, plus everything that was in
force after it (purposes, PII types, lawful basis per purpose, notice version and language,
collection method, validity). Rows of ``consent_events`` are only ever inserted: a change is
a new event, so the state at any past moment can be read back (see :mod:`consent.history`).
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from kernel.db import Base, UTCDateTime, utcnow
from kernel.ids import new_id

#: the record schema this code writes (ISO/IEC TS 27560 "schema version")
SCHEMA_VERSION = "civitas-consent-record/1 (ISO/IEC TS 27560:2023)"

#: event types; ``state`` uses the same words (a partial withdrawal leaves ``given``)
EVENT_KINDS = ("given", "refused", "withdrawn", "expired", "renewed")
#: the rows of ``ix_consent_decisions_unresolved``: questions that resolved to no one and
#: still name whom they asked about
UNRESOLVED = "account_id IS NULL AND subject IS NOT NULL"


def new_time_ordered_id() -> str:
    """A version 7 UUID (RFC 9562 section 5.7) as 32 hex digits: the Unix time in
    milliseconds, then 74 random bits, so that ids made later sort later. For the decision
    log, the hub's fastest-growing table (a row per evaluation, thousands a second): each
    new row goes to the right-hand end of its primary key's index instead of a random page
    of it. With 5 million rows, 19.7 µs per row inserted against 27.3 for random ids, and an
    index 23% smaller (``bench/id_order.py``). The time it shows is the decision's own,
    which the row and the agency know anyway."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76  # version 7
             | ((rand >> 62) & 0xFFF) << 64  # rand_a
             | 0b10 << 62  # variant 10
             | rand & 0x3FFF_FFFF_FFFF_FFFF)  # rand_b
    return f"{value:032x}"


class ConsentRecord(Base):
    """One citizen's consent record with one agency (the PII controller)."""

    __tablename__ = "consent_records"
    __table_args__ = (
        UniqueConstraint("account_id", "client_id"),
        Index("ix_consent_records_client_subject", "client_id", "subject"),
        Index("ix_consent_records_expires_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    schema_version: Mapped[str] = mapped_column(String(80), default=SCHEMA_VERSION)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("constituent_accounts.id", ondelete="RESTRICT")
    )
    client_id: Mapped[str] = mapped_column(String(128))
    #: the agency's pairwise ``sub`` for this citizen: the pseudonymous principal id the
    #: agency knows, and the key the decision API resolves
    subject: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: when the grant the record now holds stops being valid; None unless its last event left
    #: a valid grant with an end. Derived from that event (every append sets it) so that the
    #: expiry job finds the grants due through an index instead of grouping every event.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ConsentEvent(Base):
    """Something that happened to a record. Inserted, never updated or deleted."""

    __tablename__ = "consent_events"
    __table_args__ = (UniqueConstraint("record_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(
        ForeignKey("consent_records.id", ondelete="RESTRICT")
    )
    #: 1, 2, 3... within the record; the unique constraint serialises concurrent appends
    seq: Mapped[int] = mapped_column()
    kind: Mapped[str] = mapped_column(String(20))
    #: the record's state after this event
    state: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    subject: Mapped[str] = mapped_column(String(255))
    #: in force after the event: {claim: {"purposes": [...], "lawful_basis": str,
    #: "required": bool}}
    claims: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: optional claims the citizen was shown and left unticked (not asked again)
    declined: Mapped[list[str]] = mapped_column(JSON)
    #: the claims this event concerns (granted, refused or withdrawn now)
    affected: Mapped[list[str]] = mapped_column(JSON)
    #: collection method: ``web-form``, ``account-page``, ``account-deletion``, ``expiry``...
    method: Mapped[str] = mapped_column(String(40))
    notice_version: Mapped[str] = mapped_column(String(64))
    notice_language: Mapped[str] = mapped_column(String(16))
    #: the agency's declaration as it stood (name, notice, contact, declared claims)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: the receipt this event produced (grants and withdrawals produce one)
    receipt_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


class ConsentReceipt(Base):
    """A signed Kantara Consent Receipt v1.1, as issued (payload and compact JWS)."""

    __tablename__ = "consent_receipts"

    #: ``consentReceiptID``: a UUIDv4 in its canonical form
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    record_id: Mapped[str] = mapped_column(
        ForeignKey("consent_records.id", ondelete="RESTRICT"), index=True
    )
    event_id: Mapped[int] = mapped_column(
        ForeignKey("consent_events.id", ondelete="RESTRICT"), unique=True
    )
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    client_id: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    jws: Mapped[str] = mapped_column(Text)


class AgencyDecision(Base):
    """One answer of the decision API to one agency (AuthZEN evaluation), kept for the
    citizen's data-access history and the officers' search for as long as the decision log's
    retention says. No personal data in clear.

    Its ledger entry (:func:`consent.entries.decision_entry_of`) names the subject and the
    record only through a salted commitment whose salt is ``subject_salt``, here: deleting
    the row (the retention purge) leaves an entry that says an agency asked, what for and
    what it was told, but no longer about whom, and the entry itself is never touched."""

    __tablename__ = "consent_decisions"
    __table_args__ = (
        Index("ix_consent_decisions_client_at", "client_id", "at"),
        Index("ix_consent_decisions_account_at", "account_id", "at"),
        #: questions that resolved to no one, by whom they named: what an erasure strips
        #: besides the account's own (consent.decisions.DecisionPoint.forget_account)
        Index("ix_consent_decisions_unresolved", "client_id", "subject",
              postgresql_where=text(UNRESOLVED), sqlite_where=text(UNRESOLVED)),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True,
                                    default=new_time_ordered_id)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    client_id: Mapped[str] = mapped_column(String(128))
    #: the subject id as the agency sent it (None once the account it resolved to is erased)
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: the account it resolved to, when it resolved (never for another agency's subject)
    account_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    record_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    claim: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(128))
    decision: Mapped[bool] = mapped_column(Boolean())
    reason: Mapped[str] = mapped_column(String(40))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: the salt of the ledger entry's ``subject_commitment`` (16 random bytes); None for the
    #: answers written before migration 0014, whose entries name the subject and record
    subject_salt: Mapped[bytes | None] = mapped_column(LargeBinary(16), nullable=True)
    #: when the account was erased (right to erasure): the row keeps who asked, what for and
    #: the answer; its subject, account, record, salt and request id are gone
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
