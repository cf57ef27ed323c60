"""Writing an audit export: JSON Lines an auditor verifies offline (:mod:`.verify`).

The lines, in order::

    {"type":"header","format":"civitas-ledger-export/1","origin":...,"public_key":...,
     "from":...,"to":...,"start":S,"end":E,"frontier":[base64,...],"exported_at":...}
    {"type":"checkpoint","size":S,"note":"<signed note>"}             (when S > 0)
    {"type":"consistency","from":M,"to":S,"proof":[base64,...]}       (--prove-from M < S)
    {"type":"entry","leaf":"<hex>","index":S,"seq":...,"entry":{canonical JSON}}
    ...                                                               one per leaf, in order
    {"type":"checkpoint","size":N,"note":"..."}                       right after leaf N-1
    {"type":"consistency","from":P,"to":N,"proof":[...]}             P: previous checkpoint
    ...
    {"type":"end","entries":E-S,"checkpoints":K}

An export always runs from one checkpoint (``start``, or the empty tree) to a later one
(``end``), extended outward from the requested time window, so every leaf in it is covered by
a signed root. ``frontier`` is the tree's right edge at ``start`` (the roots of the perfect
subtrees covering ``[0, start)``): the verifier folds it into the start checkpoint's root,
then appends the leaves, so it needs neither the earlier entries nor more than O(log n)
memory. The entry's canonical text is embedded verbatim as the ``entry`` member: the leaf is
those exact bytes (the line remains ordinary JSON for any other tool). ``leaf`` is the hub's
leaf hash, repeated so that an edited entry is named by its own line.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import func, select

from kernel.db import utcnow

from .errors import LedgerError
from .ledger import Ledger, SignedCheckpoint
from .models import LedgerCheckpoint, LedgerEntry

FORMAT = "civitas-ledger-export/1"
ENTRY_PREFIX = b'{"type":"entry","leaf":"'


@dataclass(frozen=True)
class ExportSummary:
    start: int
    end: int
    entries: int
    checkpoints: int


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _b64(items: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in items]


def leaf_range(ledger: Ledger, since: datetime | None, until: datetime | None
               ) -> tuple[int, int]:
    """The sealed leaves written in ``[since, until)``: ``[first, last + 1)``."""
    db = ledger.db
    with db.session() as s:
        sealed = s.scalar(select(func.max(LedgerCheckpoint.size))) or 0
        lo = 0
        if since is not None:
            lo = s.scalar(select(func.min(LedgerEntry.leaf_index)).where(
                LedgerEntry.leaf_index.is_not(None), LedgerEntry.created_at >= since))
            lo = sealed if lo is None else lo
        hi = sealed
        if until is not None:
            last = s.scalar(select(func.max(LedgerEntry.leaf_index)).where(
                LedgerEntry.leaf_index.is_not(None), LedgerEntry.created_at < until))
            hi = 0 if last is None else last + 1
    return lo, max(lo, hi)


def _bounds(ledger: Ledger, lo: int, hi: int) -> tuple[SignedCheckpoint | None,
                                                       SignedCheckpoint | None]:
    """The checkpoint at or before ``lo`` and the first at or after ``hi``."""
    db = ledger.db
    with db.session() as s:
        start = s.scalars(select(LedgerCheckpoint).where(LedgerCheckpoint.size <= lo)
                          .order_by(LedgerCheckpoint.size.desc()).limit(1)).first()
        end = s.scalars(select(LedgerCheckpoint).where(LedgerCheckpoint.size >= hi)
                        .order_by(LedgerCheckpoint.size).limit(1)).first()
    first = ledger.checkpoint_at(start.size) if start is not None else None
    last = ledger.checkpoint_at(end.size) if end is not None else None
    return first, last


def export_ledger(ledger: Ledger, out: IO[bytes], *, since: datetime | None = None,
                  until: datetime | None = None, prove_from: Sequence[int] = (),
                  page: int = 10_000) -> ExportSummary:
    """Write the export of the entries written in ``[since, until)`` to ``out``."""
    lo, hi = leaf_range(ledger, since, until)
    first, last = _bounds(ledger, lo, hi)
    start = first.size if first is not None else 0
    end = last.size if last is not None else start
    if last is None and hi > start:
        raise LedgerError("entries in that window are not covered by a checkpoint yet")
    frontier = ledger.frontier_at(start)
    out.write(_line({
        "type": "header", "format": FORMAT, "origin": ledger.origin,
        "public_key": ledger.public_key(),
        "from": since.isoformat() if since else None,
        "to": until.isoformat() if until else None,
        "start": start, "end": end, "frontier": _b64(frontier),
        "exported_at": utcnow().isoformat(),
    }))
    checkpoints = 0
    previous: SignedCheckpoint | None = None
    if first is not None and start > 0:
        out.write(_line({"type": "checkpoint", "size": start, "note": first.note}))
        checkpoints += 1
        previous = first
        for m in sorted(set(prove_from)):
            if 0 < m < start:
                proof = ledger.consistency_proof(m, start)
                out.write(_line({"type": "consistency", "from": m, "to": start,
                                 "proof": _b64(proof)}))
    pending = ledger.checkpoints(start + 1, end)
    upcoming = next(pending, None)
    db = ledger.db
    index = start
    while index < end:
        with db.session() as s:
            rows = s.execute(
                select(LedgerEntry.leaf_index, LedgerEntry.seq, LedgerEntry.leaf_hash,
                       LedgerEntry.entry)
                .where(LedgerEntry.leaf_index >= index,
                       LedgerEntry.leaf_index < min(end, index + page))
                .order_by(LedgerEntry.leaf_index)).all()
        if not rows or rows[0][0] != index:
            raise LedgerError(f"leaf {index} is missing from the ledger")
        for leaf_index, seq, leaf, entry in rows:
            if leaf_index != index:
                raise LedgerError(f"leaf {index} is missing from the ledger")
            out.write(b'%s%s","index":%d,"seq":%d,"entry":%s}\n' % (
                ENTRY_PREFIX, leaf.hex().encode(), leaf_index, seq, entry.encode()))
            index += 1
            while upcoming is not None and upcoming.size == index:
                out.write(_line({"type": "checkpoint", "size": upcoming.size,
                                 "note": upcoming.note}))
                checkpoints += 1
                if previous is not None:
                    proof = ledger.consistency_proof(previous.size, upcoming.size)
                    out.write(_line({"type": "consistency", "from": previous.size,
                                     "to": upcoming.size, "proof": _b64(proof)}))
                previous = upcoming
                upcoming = next(pending, None)
    out.write(_line({"type": "end", "entries": end - start, "checkpoints": checkpoints}))
    return ExportSummary(start, end, end - start, checkpoints)
