"""What the audit ledger's entry of each consent event and agency decision says.

One definition for the writer (ConsentService) and for the check that records and entries
still agree (consent.reconcile).
"""

from __future__ import annotations

from typing import Any

from .models import AgencyDecision, ConsentEvent


def consent_entry(client_id: str, event: ConsentEvent) -> dict[str, Any]:
    """The data of the ``consent.<kind>`` entry of ``event``, of a record of ``client_id``."""
    return {
        "record": event.record_id, "event": event.seq, "agency": client_id,
        "subject": event.subject, "state": event.state, "claims": event.claims,
        "declined": event.declined, "affected": event.affected, "method": event.method,
        "notice_version": event.notice_version, "receipt": event.receipt_id,
    }


def decision_entry(d: AgencyDecision | Any) -> dict[str, Any]:
    """The data of the ``decision.query`` entry of decision ``d`` (its row, or a result row
    of those columns)."""
    return decision_entry_of(
        decision_id=d.id, client_id=d.client_id, subject=d.subject, action=d.action,
        claim=d.claim, purpose=d.purpose, decision=d.decision, reason=d.reason,
        record_id=d.record_id)


def decision_entry_of(*, decision_id: str, client_id: str, subject: str, action: str,
                      claim: str, purpose: str, decision: bool, reason: str,
                      record_id: str | None) -> dict[str, Any]:
    """The same from its fields, as the decision point writes it with the row, in one
    transaction (consent.decisions)."""
    return {
        "decision_id": decision_id, "agency": client_id, "subject": subject, "action": action,
        "claim": claim, "purpose": purpose, "decision": decision, "reason": reason,
        "record": record_id,
    }
