"""Reading a consent record's history: pure functions over its append-only events.

ISO/IEC TS 27560:2023 keeps a record's events in order, each with its time and the state it
leaves; "was this claim consented for this purpose at time T?" is answered by the last event
at or before T, read together with the validity it carried. Nothing here does I/O, so the
same rules serve the login flow, the decision API and point-in-time audit queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .models import ConsentEvent, ConsentRecord
from .policy import AgencyPolicy, ClaimRequest

VALID_STATES = ("given", "renewed")


def expiry_of(last: ConsentEvent) -> datetime | None:
    """When the grant a record's last event left stops being valid (None: not a valid grant,
    or one without an end): :attr:`ConsentRecord.expires_at`."""
    return last.expires_at if last.state in VALID_STATES else None

#: decision reasons (the ``reason`` of an AuthZEN decision context)
REASONS = (
    "consented", "no_consent", "claim_not_consented", "purpose_not_consented", "withdrawn",
    "expired", "refused", "unsupported_action", "unsupported_subject_type",
    "unsupported_resource_type",
)


@dataclass(frozen=True)
class GrantedClaim:
    claim: str
    purposes: tuple[str, ...]
    lawful_basis: str
    required: bool

    def to_json(self) -> dict[str, Any]:
        return {"purposes": list(self.purposes), "lawful_basis": self.lawful_basis,
                "required": self.required}

    @classmethod
    def from_json(cls, claim: str, data: Mapping[str, Any]) -> GrantedClaim:
        return cls(claim=claim, purposes=tuple(data["purposes"]),
                   lawful_basis=data["lawful_basis"], required=bool(data["required"]))

    @classmethod
    def from_request(cls, request: ClaimRequest) -> GrantedClaim:
        return cls(claim=request.claim, purposes=request.purposes,
                   lawful_basis=request.lawful_basis, required=request.required)


@dataclass(frozen=True)
class ConsentGrant:
    """A record's state at one moment: what an agency may have, on what terms, until when."""

    record_id: str
    account_id: str
    client_id: str
    subject: str
    #: given / renewed (valid), refused, withdrawn, expired
    state: str
    #: claims in force; empty unless the state is valid
    claims: Mapping[str, GrantedClaim]
    #: optional claims shown and left unticked, or withdrawn one by one
    declined: frozenset[str]
    agency_name: str
    notice_version: str
    notice_language: str
    notice_url: str
    event_id: int
    event_kind: str
    #: time of the event this state comes from
    at: datetime
    #: when the grant now in force was given or last renewed
    granted_at: datetime | None
    expires_at: datetime | None
    #: the newest receipt up to this moment (of the grant or of a partial withdrawal)
    receipt_id: str | None
    policy: Mapping[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.state in VALID_STATES

    def purposes_of(self, claim: str) -> tuple[str, ...]:
        granted = self.claims.get(claim)
        return granted.purposes if granted else ()

    def allows(self, claim: str, purpose: str) -> bool:
        return self.valid and purpose in self.purposes_of(claim)


def state_at(record: ConsentRecord, events: Sequence[ConsentEvent],
             at: datetime) -> ConsentGrant | None:
    """The record's state at ``at`` (None before its first event). ``events`` in seq order."""
    upto = [e for e in events if e.at <= at]
    if not upto:
        return None
    last = upto[-1]
    state = last.state
    claims = {name: GrantedClaim.from_json(name, data) for name, data in last.claims.items()}
    if state in VALID_STATES and last.expires_at is not None and last.expires_at <= at:
        state, claims = "expired", {}
    elif state not in VALID_STATES:
        claims = {}
    granted_at: datetime | None = None
    if state in VALID_STATES:
        granted_at = next((e.at for e in reversed(upto) if e.kind in VALID_STATES), None)
    receipt_id = next((e.receipt_id for e in reversed(upto) if e.receipt_id), None)
    return ConsentGrant(
        record_id=record.id, account_id=record.account_id, client_id=record.client_id,
        subject=last.subject, state=state, claims=claims, declined=frozenset(last.declined),
        agency_name=str(last.policy.get("name", record.client_id)),
        notice_version=last.notice_version, notice_language=last.notice_language,
        notice_url=str(last.policy.get("notice_url", "")), event_id=last.id,
        event_kind=last.kind, at=last.at, granted_at=granted_at, expires_at=last.expires_at,
        receipt_id=receipt_id, policy=last.policy,
    )


def needs_consent(grant: Askable | None, policy: AgencyPolicy,
                  requested: Iterable[str] | None) -> bool:
    """True when the consent page must be shown before the agency gets an answer.

    Asked again when there is no valid grant (none yet, refused, withdrawn, expired), when the
    agency's notice version changed since the grant, or when a requested, declared claim was
    never put to the citizen (neither granted nor left unticked) or is required and missing.
    """
    offered = policy.offered(None if requested is None else frozenset(requested))
    if grant is None or not grant.valid:
        return bool(offered)
    if grant.notice_version != policy.notice_version:
        return True
    for claim in offered:
        granted = grant.claims.get(claim.claim)
        if granted is None:
            if claim.required or claim.claim not in grant.declined:
                return True
        elif not set(claim.purposes) <= set(granted.purposes) or (
                granted.lawful_basis != claim.lawful_basis):
            return True  # the agency now asks for more, or on another basis
    return False


def merged_grant(previous: ConsentGrant | None, policy: AgencyPolicy,
                 offered: Sequence[ClaimRequest], allowed_optional: Iterable[str]
                 ) -> tuple[dict[str, GrantedClaim], set[str], list[str]]:
    """Claims in force, claims declined and claims affected after the citizen allowed.

    Released = the required claims offered + the optional ones ticked. Claims of a still
    valid grant under the same notice that were not on this page stay as they were.
    """
    ticked = set(allowed_optional)
    claims: dict[str, GrantedClaim] = {}
    declined: set[str] = set()
    if previous is not None and previous.valid and previous.notice_version == \
            policy.notice_version:
        claims = {k: v for k, v in previous.claims.items() if policy.claim(k) is not None}
        declined = set(previous.declined)
    for request in offered:
        claims.pop(request.claim, None)
        declined.discard(request.claim)
        if request.required or request.claim in ticked:
            claims[request.claim] = GrantedClaim.from_request(request)
        else:
            declined.add(request.claim)
    affected = sorted(c.claim for c in offered)
    return claims, declined, affected


class Evaluable(Protocol):
    """What :func:`evaluate` reads of a grant (a :class:`ConsentGrant`, or the decision
    API's lighter read of the last event)."""

    @property
    def state(self) -> str: ...

    @property
    def claims(self) -> Mapping[str, GrantedClaim]: ...

    @property
    def valid(self) -> bool: ...


class Askable(Evaluable, Protocol):
    """What :func:`needs_consent` reads of a grant besides :class:`Evaluable`."""

    @property
    def notice_version(self) -> str: ...

    @property
    def declined(self) -> frozenset[str]: ...


def evaluate(grant: Evaluable | None, claim: str, purpose: str) -> tuple[bool, str]:
    """Deny by default: (decision, reason) for using ``claim`` for ``purpose``."""
    if grant is None:
        return False, "no_consent"
    if not grant.valid:
        return False, grant.state if grant.state in REASONS else "no_consent"
    granted = grant.claims.get(claim)
    if granted is None:
        return False, "claim_not_consented"
    if purpose not in granted.purposes:
        return False, "purpose_not_consented"
    return True, "consented"
