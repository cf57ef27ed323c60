"""The privacy officer's workspace: who holds the role, searching agency decisions, exports,
and the record of processing activities per agency (GDPR Art. 30(1)).

Officers sign in through the hub like anyone else. The role comes from configuration: an
upstream and an attribute value asserted *by that upstream* (``groups`` containing
``privacy-officers``, say), and only while the current hub login came through it, so another
upstream cannot assert the role for an account it shares.

Every search that names a citizen is itself recorded in the audit ledger (``officer.lookup``)
with pseudonymous ids only: who looked (hashed account id), whom (hashed account id), and the
non-identifying parts of the query.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.sql import Select

from kernel.db import Database

from .decisions import unresolved_about
from .errors import ConsentError
from .ledger.ledger import Ledger, hashed_id
from .models import AgencyDecision, ConsentEvent, ConsentRecord
from .policy import AgencyPolicy

PAGE_SIZE = 50
#: an officer attribute must have been asserted by the current login (with this much slack
#: between recording the attributes and stamping ``auth_time``), so a value left over from an
#: older login (the upstream stopped sending the attribute) never grants the role
ASSERTION_SLACK = timedelta(seconds=60)


class InvalidOfficerQuery(ConsentError):
    """``field``: the search form's field at fault (the page puts the message beside it)."""

    status_code = 400
    public_message = "The search could not be understood."

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# -- the role ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficerRule:
    """Holders of ``value`` in ``attribute`` as asserted by upstream ``upstream``."""

    upstream: str
    attribute: str
    value: str


class AssertedAttribute(Protocol):
    """The parts of an account attribute the role check needs (``AttributeRecord`` has them)."""

    @property
    def name(self) -> str: ...
    @property
    def value(self) -> Any: ...
    @property
    def source(self) -> str: ...
    @property
    def asserted_at(self) -> datetime: ...


def _contains(value: Any, wanted: str) -> bool:
    if isinstance(value, str):
        return value == wanted
    if isinstance(value, list | tuple):
        return any(isinstance(v, str) and v == wanted for v in value)
    return False


def holds_officer_role(rules: Iterable[OfficerRule], *, login_upstream: str, auth_time: int,
                       attributes: Iterable[AssertedAttribute]) -> bool:
    """True if a rule names the upstream of the current login and that same upstream asserted
    the rule's value during this login. Pure: the caller reads the login and attributes."""
    fresh_since = datetime.fromtimestamp(auth_time, UTC) - ASSERTION_SLACK
    attributes = list(attributes)
    for rule in rules:
        if rule.upstream != login_upstream:
            continue
        for attr in attributes:
            if (attr.source == rule.upstream and attr.name == rule.attribute
                    and attr.asserted_at >= fresh_since and _contains(attr.value, rule.value)):
                return True
    return False


# -- the search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CitizenRef:
    """How an officer names a citizen: a linked credential (``connector`` + upstream
    ``subject``) or an agency's pairwise ``sub`` (``agency`` + ``subject``)."""

    by: str  # "credential" | "pairwise"
    scope: str  # the connector id, or the agency's client_id
    subject: str


@dataclass(frozen=True)
class DecisionQuery:
    agency: str | None = None
    purpose: str | None = None
    claim: str | None = None
    decision: bool | None = None
    since: datetime | None = None
    until: datetime | None = None
    citizen: CitizenRef | None = None

    def describe(self) -> dict[str, Any]:
        """The query for the ledger: filters and how the citizen was named, never the
        upstream subject or pairwise sub itself."""
        data: dict[str, Any] = {
            "agency": self.agency, "purpose": self.purpose, "claim": self.claim,
            "decision": self.decision,
            "from": self.since.isoformat() if self.since else None,
            "to": self.until.isoformat() if self.until else None,
        }
        if self.citizen is not None:
            data["by"] = self.citizen.by
            data["scope"] = self.citizen.scope
        return {k: v for k, v in data.items() if v is not None}


def _text(args: Mapping[str, str], name: str, limit: int = 255) -> str | None:
    value = (args.get(name) or "").strip()
    if len(value) > limit:
        raise InvalidOfficerQuery(f"The field {name!r} is too long.", field=name)
    return value or None


#: the search form's fields: what a search reads, and all its links carry
QUERY_FIELDS = ("agency", "purpose", "claim", "decision", "from", "to", "connector",
                "upstream_subject", "sub")
#: a whole day, and the start of a date and time, in ISO 8601's extended format: the basic
#: one (20261125), which Python also reads, would not be taken for a whole day
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_AND_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}")


def _when(value: str | None, name: str, *, end: bool) -> datetime | None:
    """``YYYY-MM-DD`` (a whole day; ``to`` includes it) or an ISO 8601 time
    (``YYYY-MM-DDTHH:MM``...), in UTC."""
    if value is None:
        return None
    whole_day = _DAY.fullmatch(value) is not None
    try:
        if not (whole_day or _DATE_AND_TIME.match(value)):
            raise ValueError(value)
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidOfficerQuery(
            f"The field {name!r} must be a date (YYYY-MM-DD) or a date and time "
            "(YYYY-MM-DDTHH:MM, with seconds and an offset if wanted).", field=name) from exc
    try:
        if whole_day:
            day = when.replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError as exc:  # the day after 9999-12-31, or a time beyond it in UTC
        raise InvalidOfficerQuery(
            f"The field {name!r} is outside the dates that can be searched "
            "(years 1 to 9999, in UTC).", field=name) from exc


def parse_query(args: Mapping[str, str]) -> DecisionQuery:
    """The search form's fields (``agency``, ``purpose``, ``claim``, ``decision``, ``from``,
    ``to``, and ``connector``+``upstream_subject`` or ``sub`` with ``agency``), each at most
    once (a query string's second value was ignored: decision=permit&decision=deny searched
    the permits alone)."""
    getlist = getattr(args, "getlist", None)
    if getlist is not None:
        repeated = next((name for name in QUERY_FIELDS if len(getlist(name)) > 1), None)
        if repeated is not None:
            raise InvalidOfficerQuery(f"The field {repeated!r} is given more than once.",
                                      field=repeated)
    decision = {"permit": True, "deny": False, None: None}.get(_text(args, "decision"), "bad")
    if decision == "bad":
        raise InvalidOfficerQuery("The field 'decision' must be 'permit' or 'deny'.",
                                  field="decision")
    agency = _text(args, "agency", 128)
    connector, upstream_subject = _text(args, "connector", 64), _text(args, "upstream_subject")
    sub = _text(args, "sub")
    citizen = None
    if connector or upstream_subject:
        if not (connector and upstream_subject):
            raise InvalidOfficerQuery("A citizen lookup by sign-in needs both the connector "
                                      "and the upstream subject.",
                                      field="upstream_subject" if connector else "connector")
        if sub:
            raise InvalidOfficerQuery("Look a citizen up by sign-in or by pairwise sub, "
                                      "not both.", field="sub")
        citizen = CitizenRef("credential", connector, upstream_subject)
    elif sub:
        if not agency:
            raise InvalidOfficerQuery("A pairwise sub is only meaningful with its agency: "
                                      "choose the agency too.", field="agency")
        citizen = CitizenRef("pairwise", agency, sub)
    since = _when(_text(args, "from", 40), "from", end=False)
    until = _when(_text(args, "to", 40), "to", end=True)
    if since and until and since >= until:
        raise InvalidOfficerQuery("The time window ends before it starts.", field="to")
    return DecisionQuery(agency=agency, purpose=_text(args, "purpose", 128),
                         claim=_text(args, "claim", 128),
                         decision=decision if isinstance(decision, bool) else None,
                         since=since, until=until, citizen=citizen)


@dataclass(frozen=True)
class ResultPage:
    rows: list[AgencyDecision]
    page: int
    total: int
    #: True when the query named a citizen the hub knows
    citizen_found: bool | None = None

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // PAGE_SIZE))


CSV_COLUMNS = ("decision_id", "at", "agency", "subject", "action", "claim", "purpose",
               "decision", "reason", "record_id", "request_id", "erased_at")


def decision_row(d: AgencyDecision) -> dict[str, Any]:
    """One decision for the exports (the internal account id stays inside the hub); one
    about an erased account has no subject, record or request id, and says when."""
    return {"decision_id": d.id, "at": d.at.isoformat(), "agency": d.client_id,
            "subject": d.subject, "action": d.action, "claim": d.claim,
            "purpose": d.purpose, "decision": "permit" if d.decision else "deny",
            "reason": d.reason, "record_id": d.record_id, "request_id": d.request_id,
            "erased_at": d.erased_at.isoformat() if d.erased_at is not None else None}


def csv_safe(value: Any) -> str:
    """A cell a spreadsheet will not run as a formula (OWASP "CSV Injection")."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class OfficerWorkspace:
    """Searches and reports over the consent store, each citizen lookup ledgered."""

    @property
    def db(self) -> Database:
        return self._db

    def __init__(self, db: Database, ledger: Ledger | None, *, pseudonym_key: bytes,
                 account_for_credential: Callable[[str, str], str | None],
                 decision_log_days: int = 0,
                 subjects_of: Callable[[str], Sequence[tuple[str, str]]] | None = None
                 ) -> None:
        """``decision_log_days``: how long the decision log keeps an answer (0: for ever),
        stated in the records of processing. ``subjects_of``: an account's (agency, ``sub``)
        at every registered agency (the composition root computes them), so that a citizen
        search also finds the questions an agency asked without resolving, before the
        citizen had a record there; without it, only the agencies of its records count."""
        self._subjects_of = subjects_of
        self._db = db
        self._ledger = ledger
        self._key = pseudonym_key
        self._account_for_credential = account_for_credential
        self._decision_log_days = decision_log_days

    def pseudonym(self, account_id: str) -> str:
        return hashed_id(self._key, account_id)

    # -- citizens --------------------------------------------------------------------------

    def resolve(self, citizen: CitizenRef) -> str | None:
        """The account a credential or pairwise sub belongs to, if the hub knows it."""
        if citizen.by == "credential":
            return self._account_for_credential(citizen.scope, citizen.subject)
        # a question resolves only through a record of that agency and subject, and records
        # are never deleted: the records alone say whose a sub is
        with self._db.session() as s:
            return s.scalars(select(ConsentRecord.account_id).where(
                ConsentRecord.client_id == citizen.scope,
                ConsentRecord.subject == citizen.subject)).first()

    def _citizen_filter(self, query: DecisionQuery) -> tuple[ColumnElement[bool], str | None]:
        assert query.citizen is not None
        account_id = self.resolve(query.citizen)
        if account_id is None:
            if query.citizen.by == "pairwise":  # the agency's own sub, even if unresolved
                return unresolved_about([(query.citizen.scope, query.citizen.subject)]), None
            return AgencyDecision.id.is_(None), None  # an unknown credential matches nothing
        with self._db.session() as s:
            pairs = [(c, sub) for c, sub in s.execute(
                select(ConsentRecord.client_id, ConsentRecord.subject)
                .where(ConsentRecord.account_id == account_id))]
        if self._subjects_of is not None:
            pairs = list(dict.fromkeys([*pairs, *self._subjects_of(account_id)]))
        # decisions that resolved to the account, and questions about its pairwise subs
        # asked while it had no consent record with the agency
        return or_(AgencyDecision.account_id == account_id, unresolved_about(pairs)), account_id

    def _select(self, query: DecisionQuery, officer_account_id: str
                ) -> tuple[Select[AgencyDecision], bool | None]:
        stmt = select(AgencyDecision)
        if query.agency:
            stmt = stmt.where(AgencyDecision.client_id == query.agency)
        if query.purpose:
            stmt = stmt.where(AgencyDecision.purpose == query.purpose)
        if query.claim:
            stmt = stmt.where(AgencyDecision.claim == query.claim)
        if query.decision is not None:
            stmt = stmt.where(AgencyDecision.decision == query.decision)
        if query.since:
            stmt = stmt.where(AgencyDecision.at >= query.since)
        if query.until:
            stmt = stmt.where(AgencyDecision.at < query.until)
        found = None
        if query.citizen is not None:
            clause, account_id = self._citizen_filter(query)
            stmt = stmt.where(clause)
            found = account_id is not None
            self._record_lookup(officer_account_id, account_id, query)
        return stmt, found

    def _record_lookup(self, officer_account_id: str, target: str | None,
                       query: DecisionQuery) -> None:
        if self._ledger is None:
            return
        self._ledger.append("officer.lookup", {
            "officer": self.pseudonym(officer_account_id),
            "target": self.pseudonym(target) if target is not None else None,
            "query": query.describe(),
        })

    def search(self, query: DecisionQuery, *, officer_account_id: str,
               page: int = 1) -> ResultPage:
        """One page of matching decisions, newest first (ties broken by id: stable pages)."""
        page = max(1, page)
        stmt, found = self._select(query, officer_account_id)
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = list(s.scalars(stmt.order_by(AgencyDecision.at.desc(),
                                                AgencyDecision.id.desc())
                                  .offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
        return ResultPage(rows=rows, page=page, total=total, citizen_found=found)

    def export(self, query: DecisionQuery, *, officer_account_id: str,
               batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every matching decision, newest first, read in batches. The lookup (if any) is
        ledgered when called, before the first row is read."""
        stmt, _found = self._select(query, officer_account_id)
        ordered = stmt.order_by(AgencyDecision.at.desc(), AgencyDecision.id.desc())

        def rows() -> Iterator[dict[str, Any]]:
            offset = 0
            while True:
                with self._db.session() as s:
                    chunk = list(s.scalars(ordered.offset(offset).limit(batch)))
                yield from (decision_row(d) for d in chunk)
                if len(chunk) < batch:
                    return
                offset += batch

        return rows()

    # -- GDPR Art. 30 ----------------------------------------------------------------------

    def record_of_processing(self, policy: AgencyPolicy, *, declared: bool) -> dict[str, Any]:
        """A record of processing activities for one agency (GDPR Art. 30(1)(a)-(f)):
        controller, purposes, categories of data, lawful basis, recipients, retention."""
        with self._db.session() as s:
            counts: dict[str, int] = {kind: n for kind, n in s.execute(
                select(ConsentEvent.kind, func.count())
                .join(ConsentRecord, ConsentRecord.id == ConsentEvent.record_id)
                .where(ConsentRecord.client_id == policy.client_id)
                .group_by(ConsentEvent.kind))}
            decisions: dict[bool, int] = {bool(d): n for d, n in s.execute(
                select(AgencyDecision.decision, func.count())
                .where(AgencyDecision.client_id == policy.client_id)
                .group_by(AgencyDecision.decision))}
        purposes: dict[str, list[str]] = {}
        for c in policy.claims:
            for p in c.purposes:
                purposes.setdefault(p, []).append(c.claim)
        contact = policy.contact
        return {
            "record": "GDPR Art. 30(1) record of processing activities",
            "generated_at": datetime.now(UTC).isoformat(),
            "controller": {"client_id": policy.client_id, "name": policy.name,
                           "contact": {"email": contact.email, "phone": contact.phone,
                                       "address": contact.street_address}},
            "declared": declared,
            "jurisdiction": policy.jurisdiction,
            "notice": {"url": policy.notice_url, "version": policy.notice_version,
                       "language": policy.notice_language},
            "purposes": [{"purpose": p, "label": policy.purpose_label(p), "claims": claims}
                         for p, claims in purposes.items()],
            "claims": [{"claim": c.claim, "description": c.description,
                        "purposes": list(c.purposes), "lawful_basis": c.lawful_basis,
                        "required": c.required} for c in policy.claims],
            "lawful_bases": sorted({c.lawful_basis for c in policy.claims}),
            "recipients": [{"client_id": policy.client_id, "name": policy.name,
                            "role": "controller (the agency the claims are released to)"}],
            "retention": (f"{policy.consent_ttl_days} days from consent"
                          if policy.consent_ttl_days else "until withdrawn"),
            "consent_ttl_days": policy.consent_ttl_days,
            # the agency's questions about citizens (the decision log) are processing too
            "decision_log_retention": (f"{self._decision_log_days} days"
                                       if self._decision_log_days else "kept for ever"),
            # what outlives the decision log: its entries name no one (consent.entries)
            "audit_ledger": (
                "kept for ever: every consent event, naming the citizen by the agency's "
                "pairwise identifier (the proof of consent), and every question, naming the "
                "agency, claim, purpose and answer; a question names its citizen only through "
                "a commitment whose salt is deleted with the question"
                + (f" ({self._decision_log_days} days)" if self._decision_log_days else "")),
            "counts": {"grants": counts.get("given", 0) + counts.get("renewed", 0),
                       "withdrawals": counts.get("withdrawn", 0),
                       "refusals": counts.get("refused", 0),
                       "expiries": counts.get("expired", 0),
                       "decisions_permit": decisions.get(True, 0),
                       "decisions_deny": decisions.get(False, 0)},
        }


def pseudonym_key(secret: str) -> bytes:
    """The key of ``hashed_id`` for account ids in ledger entries, derived from a hub
    secret so it is stable across restarts and never stored. The same derivation as the
    ``account.*`` entries (the root uses this function), so an auditor can join a lookup's
    target to them."""
    return hmac.new(secret.encode(), b"civitas ledger account ids", hashlib.sha256).digest()
