"""The one-to-one check between the records and the audit ledger for a time window.

Every consent event and every agency decision must have exactly one ledger entry, of its
kind and saying what the record says, and every ``consent.*`` / ``decision.query`` entry
must name a record that exists. Both are written in one transaction, so a difference means
tampering or a bug; the report names each one. A record altered in the database after its
entry was written (and sealed into a signed checkpoint) shows as ``altered``: the ledger
holds what it said.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from kernel.db import Database

from .entries import consent_entry, decision_entry, erased_decision_entry, without_whom
from .ledger.ledger import Ledger
from .models import AgencyDecision, ConsentEvent, ConsentRecord


@dataclass
class ReconcileReport:
    records: int = 0
    entries: int = 0
    #: records with no ledger entry
    missing_in_ledger: list[str] = field(default_factory=list)
    #: ledger entries naming no record (or a record twice)
    unmatched_entries: list[str] = field(default_factory=list)
    #: records whose ledger entry says something else (a different kind or data)
    altered: list[str] = field(default_factory=list)
    #: decision entries older than the decision log's retention whose answer was deleted
    #: by housekeeping, as it should be (not a difference)
    past_retention: int = 0
    #: decisions about an erased account: compared with their entries apart from whom
    #: they were about (the row no longer says it)
    erased: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing_in_ledger and not self.unmatched_entries and not self.altered


def _digest(kind: str, data: Mapping[str, Any]) -> bytes:
    """What an entry says, in 16 bytes (a window may hold millions of records)."""
    text = json.dumps([kind, data], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def reconcile(db: Database, ledger: Ledger, since: datetime | None,
              until: datetime | None, *, decisions_kept_since: datetime | None = None
              ) -> ReconcileReport:
    """``decisions_kept_since``: the start of the decision log's retention (its answers
    written before it are deleted by housekeeping); None when it is kept for ever."""
    report = ReconcileReport()
    says: dict[str, bytes] = {}
    erased: set[str] = set()
    with db.session() as s:
        events = select(ConsentEvent, ConsentRecord.client_id).join(
            ConsentRecord, ConsentRecord.id == ConsentEvent.record_id)
        # the columns an entry says, not whole objects: a window may hold millions
        decisions = select(AgencyDecision.id, AgencyDecision.client_id, AgencyDecision.subject,
                           AgencyDecision.action, AgencyDecision.claim, AgencyDecision.purpose,
                           AgencyDecision.decision, AgencyDecision.reason,
                           AgencyDecision.record_id, AgencyDecision.subject_salt,
                           AgencyDecision.erased_at)
        if since is not None:
            events = events.where(ConsentEvent.at >= since)
            decisions = decisions.where(AgencyDecision.at >= since)
        if until is not None:
            events = events.where(ConsentEvent.at < until)
            decisions = decisions.where(AgencyDecision.at < until)
        for event, client_id in s.execute(events.execution_options(yield_per=10_000)):
            says[f"consent:{event.record_id}#{event.seq}"] = _digest(
                f"consent.{event.kind}", consent_entry(client_id, event))
        for d in s.execute(decisions.execution_options(yield_per=10_000)):
            key = f"decision:{d.id}"
            if d.erased_at is not None:
                erased.add(key)
                says[key] = _digest("decision.query", erased_decision_entry(d))
                continue
            try:
                says[key] = _digest("decision.query", decision_entry(d))
            except ValueError:  # a salt of another length, no subject: no entry says that
                says[key] = b""
    wanted = Counter(says.keys())
    report.records = len(says)
    seen: Counter[str] = Counter()
    altered: set[str] = set()
    for entry in ledger.entries(None, since, until):
        if entry.kind.startswith("consent."):
            data = json.loads(entry.entry)["data"]
            key = f"consent:{data['record']}#{data['event']}"
        elif entry.kind == "decision.query":
            data = json.loads(entry.entry)["data"]
            key = f"decision:{data['decision_id']}"
            if key not in says and decisions_kept_since is not None \
                    and entry.created_at < decisions_kept_since:
                report.entries += 1
                report.past_retention += 1
                continue
        else:
            continue
        seen[key] += 1
        report.entries += 1
        if key in erased:
            data = without_whom(data)
        if key in says and says[key] != _digest(entry.kind, data):
            altered.add(key)
    report.missing_in_ledger = sorted((wanted - seen).elements())
    report.unmatched_entries = sorted((seen - wanted).elements())
    report.altered = sorted(altered)
    report.erased = len(erased)
    return report
