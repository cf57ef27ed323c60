"""The one-to-one check between the records and the audit ledger for a time window.

Every consent event and every agency decision must have exactly one ledger entry, and every
``consent.*`` / ``decision.query`` entry must name a record that exists. Both are written in
one transaction, so a difference means tampering or a bug; the report names each one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from kernel.db import Database

from .ledger.ledger import Ledger
from .models import AgencyDecision, ConsentEvent


@dataclass
class ReconcileReport:
    records: int = 0
    entries: int = 0
    #: records with no ledger entry
    missing_in_ledger: list[str] = field(default_factory=list)
    #: ledger entries naming no record (or a record twice)
    unmatched_entries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_in_ledger and not self.unmatched_entries


def reconcile(db: Database, ledger: Ledger, since: datetime | None,
              until: datetime | None) -> ReconcileReport:
    report = ReconcileReport()
    with db.session() as s:
        events = select(ConsentEvent.record_id, ConsentEvent.seq)
        decisions = select(AgencyDecision.id)
        if since is not None:
            events = events.where(ConsentEvent.at >= since)
            decisions = decisions.where(AgencyDecision.at >= since)
        if until is not None:
            events = events.where(ConsentEvent.at < until)
            decisions = decisions.where(AgencyDecision.at < until)
        wanted = Counter(f"consent:{r}#{n}" for r, n in s.execute(events))
        wanted.update(f"decision:{d}" for d in s.scalars(decisions))
    report.records = sum(wanted.values())
    seen: Counter[str] = Counter()
    for entry in ledger.entries(None, since, until):
        if entry.kind.startswith("consent."):
            data = json.loads(entry.entry)["data"]
            seen[f"consent:{data['record']}#{data['event']}"] += 1
        elif entry.kind == "decision.query":
            seen[f"decision:{json.loads(entry.entry)['data']['decision_id']}"] += 1
        else:
            continue
        report.entries += 1
    report.missing_in_ledger = sorted((wanted - seen).elements())
    report.unmatched_entries = sorted((seen - wanted).elements())
    return report
