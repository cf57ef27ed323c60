"""What the audit ledger's entry of each consent event and agency decision says.

One definition for the writers (ConsentService, the decision point) and for the check that
records and entries still agree (consent.reconcile).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from .ledger.jcs import canonical_strings
from .models import AgencyDecision, ConsentEvent

#: bytes of a decision's ``subject_salt``: random, so a commitment whose salt is deleted
#: cannot be tried against the subjects and records that might be in it
SALT_BYTES = 16


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
    of those columns), whose account is not erased."""
    if d.subject is None:
        raise ValueError("the row of an erased account: see erased_decision_entry")
    return decision_entry_of(
        decision_id=d.id, client_id=d.client_id, subject=d.subject, action=d.action,
        claim=d.claim, purpose=d.purpose, decision=d.decision, reason=d.reason,
        record_id=d.record_id, salt=d.subject_salt)


#: the members of a decision's entry that lead to the citizen (as written since migration
#: 0014, and before it)
WHOM = frozenset({"subject_commitment", "subject", "record"})


def without_whom(data: dict[str, Any]) -> dict[str, Any]:
    """An entry's data without :data:`WHOM`: what a decision's row still says once its
    account is erased (who asked, when, what for, the answer)."""
    return {name: value for name, value in data.items() if name not in WHOM}


def erased_decision_entry(d: AgencyDecision | Any) -> dict[str, Any]:
    """:func:`without_whom` of the entry of decision ``d``, from a row whose account was
    erased (whose subject, record and salt are gone)."""
    return {"decision_id": d.id, "agency": d.client_id, "action": d.action, "claim": d.claim,
            "purpose": d.purpose, "decision": d.decision, "reason": d.reason}


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def subject_commitment(salt: bytes, subject: str, record_id: str | None) -> str:
    """base64url (no padding) of SHA-256(salt || JCS([subject, record_id])): binding (the
    row cannot be changed to other values with the same commitment without a SHA-256
    collision) and, once the salt is deleted, hiding (128 random bits to guess before a
    candidate subject can even be tried). An auditor recomputes it from a decision's row:
    the salt's bytes, then the RFC 8785 form of the two-element array."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"a subject salt is {SALT_BYTES} bytes, not {len(salt)}")
    digest = hashlib.sha256(salt + canonical_strings((subject, record_id))).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def decision_entry_of(*, decision_id: str, client_id: str, subject: str, action: str,
                      claim: str, purpose: str, decision: bool, reason: str,
                      record_id: str | None, salt: bytes | None) -> dict[str, Any]:
    """The same from its fields, as the decision point writes it with the row, in one
    transaction (consent.decisions).

    The subject and the consent record (each leads to the citizen) are in the entry only as
    their :func:`subject_commitment`, whose ``salt`` lives in the decision's row alone: when
    the decision log's retention deletes the row, the entry (never altered) still says who
    asked, what for and what they were told, and no longer about whom. ``salt`` None: the
    entry of a row written before the salt existed (migration 0014), which named both."""
    if salt is None:
        return {
            "decision_id": decision_id, "agency": client_id, "subject": subject,
            "action": action, "claim": claim, "purpose": purpose, "decision": decision,
            "reason": reason, "record": record_id,
        }
    return {
        "decision_id": decision_id, "agency": client_id, "action": action, "claim": claim,
        "purpose": purpose, "decision": decision, "reason": reason,
        "subject_commitment": subject_commitment(salt, subject, record_id),
    }
