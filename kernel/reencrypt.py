"""Every value encrypted at rest rewritten under the first configured key, so that the other
keys can be taken out of ``encryption_key`` (``civitas secrets reencrypt``).

Without it a value is rewritten only when its owner's upstream sends it again, so a key
could never be retired safely: a value whose key is no longer configured cannot be read.

A column is walked in batches in the order of its primary key, each batch read and then
written in a transaction of its own, so a large table holds no long transaction and a run
that stops can simply be started again: values already under the first key are left as they
are. Each value is rewritten only if it is still the one that was read (``UPDATE ... WHERE
value = <as read>``): a hub that rewrites an attribute meanwhile (its owner signed in again)
wins, and the count says so. The new value is decrypted again and compared with the
plaintext before it is written. A value that no configured key opens is never touched; it is
counted and its row named, so the operator can put back the key that wrote it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, ColumnElement, and_, bindparam, inspect, select, update
from sqlalchemy.orm import Mapper

from .crypto import DecryptionError, FieldCipher, WrittenWith
from .db import Database

#: how many rows each transaction reads and rewrites
BATCH = 500
#: at most this many unreadable rows are named in a census (all are counted)
NAMED = 20


@dataclass(frozen=True)
class EncryptedColumn:
    """The attribute ``attribute`` of the mapped class ``model``, whose values
    :class:`~kernel.crypto.FieldCipher` wrote; the class's table has a primary key of one
    column."""

    label: str
    model: type[Any]
    attribute: str

    @property
    def _mapper(self) -> Mapper[Any]:
        mapper: Mapper[Any] = inspect(self.model)
        return mapper

    @property
    def value(self) -> Column[Any]:
        return self._mapper.columns[self.attribute]

    @property
    def key(self) -> ColumnElement[Any]:
        primary = self._mapper.primary_key
        if len(primary) != 1:
            raise ValueError(f"{self.model.__name__} needs a primary key of one column")
        return primary[0]


@dataclass
class Census:
    """What a run found in one column, and what it did."""

    label: str
    #: values by how they were written
    found: Counter[WrittenWith] = field(default_factory=Counter)
    rewritten: int = 0
    #: rewritten by someone else (or deleted) between this run's read and its write
    changed_meanwhile: int = 0
    unreadable: int = 0
    #: primary keys of the first ``NAMED`` unreadable values
    unreadable_rows: list[Any] = field(default_factory=list)

    @property
    def scanned(self) -> int:
        return sum(self.found.values()) + self.unreadable

    @property
    def to_rewrite(self) -> int:
        """Values found under another key or scheme than the one values are written with."""
        return sum(n for written, n in self.found.items() if not written.current)


def reencrypt_column(db: Database, cipher: FieldCipher, column: EncryptedColumn, *,
                     dry_run: bool = False, batch: int = BATCH,
                     progress: Callable[[Census], None] | None = None) -> Census:
    """Rewrite every value of ``column`` that is not under the first key as AES-256-GCM-SIV
    under it (``dry_run``: only count them). ``progress`` is called after each batch."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    key, value = column.key, column.value
    census = Census(column.label)
    write = (update(value.table)
             .where(and_(key == bindparam("k"), value == bindparam("old")))
             .values({value.name: bindparam("new")}))
    after: Any = None
    while True:
        query = select(key, value).order_by(key).limit(batch)
        if after is not None:
            query = query.where(key > after)
        with db.session() as s:
            rows = s.execute(query).all()
        if not rows:
            return census
        after = rows[-1][0]
        changes = []
        for row_key, stored in rows:
            try:
                plaintext, written = cipher.inspect(stored)
            except DecryptionError:
                census.unreadable += 1
                if len(census.unreadable_rows) < NAMED:
                    census.unreadable_rows.append(row_key)
                continue
            census.found[written] += 1
            if written.current or dry_run:
                continue
            fresh = cipher.encrypt(plaintext)
            if cipher.decrypt(fresh) != plaintext:  # never write what would not read back
                raise RuntimeError(f"{column.label}: a rewritten value did not read back")
            changes.append({"k": row_key, "old": stored, "new": fresh})
        if changes:
            with db.session() as s:
                done = s.connection().execute(write, changes).rowcount
            census.rewritten += done
            census.changed_meanwhile += len(changes) - done
        if progress is not None:
            progress(census)
