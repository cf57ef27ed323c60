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
    of those columns), as DecisionService writes it with the row, in one transaction."""
    return {
        "decision_id": d.id, "agency": d.client_id, "subject": d.subject, "action": d.action,
        "claim": d.claim, "purpose": d.purpose, "decision": d.decision, "reason": d.reason,
        "record": d.record_id,
    }
