"""The ledger's tables. Rows of ``ledger_entries`` are inserted, then given a leaf index once
by the sealer, and never changed again; the other tables are only ever inserted into."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, SmallInteger, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from kernel.db import Base, UTCDateTime, utcnow

#: SQLite only auto-assigns an ``INTEGER PRIMARY KEY`` (its 64-bit rowid)
BigSeq = BigInteger().with_variant(Integer(), "sqlite")


class LedgerEntry(Base):
    """One canonical JSON entry (RFC 8785) and its RFC 9162 leaf hash.

    ``seq`` is assigned by the database at insert (write order, may have gaps: a rolled-back
    insert burns its number); ``leaf_index`` is assigned by the sealer, dense from 0, in
    ``seq`` order among the rows committed when it runs. The tree is over leaf indices.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_unsealed", "seq",
              sqlite_where=text("leaf_index IS NULL"),
              postgresql_where=text("leaf_index IS NULL")),
    )

    seq: Mapped[int] = mapped_column(BigSeq, primary_key=True, autoincrement=True)
    leaf_index: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True)
    kind: Mapped[str] = mapped_column(String(64))
    #: the canonical JSON text; the leaf is its UTF-8 bytes
    entry: Mapped[str] = mapped_column(Text)
    #: SHA-256(0x00 || entry)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class LedgerCheckpoint(Base):
    """A signed tree head (C2SP checkpoint note) over the first ``size`` leaves."""

    __tablename__ = "ledger_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    #: the tree's right edge at ``size``: the perfect-subtree roots covering [0, size),
    #: largest first, concatenated (32 bytes each); lets the next seal start in O(1)
    frontier: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LedgerNode(Base):
    """The root of the perfect subtree of ``2**level`` leaves starting at leaf
    ``index * 2**level``, kept for large levels only so proofs need O(log n) reads."""

    __tablename__ = "ledger_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class LedgerKey(Base):
    """The checkpoint signing key (Ed25519); the private half is encrypted at rest."""

    __tablename__ = "ledger_keys"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    private_key_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
