"""The decision API's logic, shaped on the OpenID AuthZEN Authorization API 1.0.

An agency (the PEP) asks whether it may ``use`` (action, AuthZEN 1.0 section 5.3) a ``claim``
(resource, section 5.2) of the citizen it knows by its pairwise ``sub`` (subject, section
5.1) for a ``purpose`` (context, section 5.4). The hub (the PDP) answers ``decision`` plus a
context (section 5.5): the reason and, when allowed, the consent record, the receipt and the
expiry. Single evaluations follow section 6, batches section 7 (defaults at the top level,
``options.evaluations_semantic``).

Deny by default. Subjects are looked up only among the asking agency's own records, so a
``sub`` that belongs to another agency gets exactly the answer an unknown one gets. Every
evaluation is stored (:class:`~consent.models.AgencyDecision`) for the ledger and the
citizen's data-access history. Flask-free: :mod:`consent.api` is the HTTP adapter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    false,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)

from kernel import jsonfast
from kernel.db import Database, Prepared
from kernel.metrics import CONSENT_DECISIONS

from . import history
from .entries import decision_entry_of, new_salt
from .history import GrantedClaim
from .ledger.ledger import EMAIL_PATTERN, Ledger, looks_like_email
from .models import AgencyDecision, ConsentEvent, ConsentRecord, new_time_ordered_id

SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
MAX_BATCH = 100

#: (member, required fields with their maximum lengths) of the four AuthZEN entities
ENTITIES: dict[str, dict[str, int]] = {
    "subject": {"type": 64, "id": 255},
    "action": {"name": 64},
    "resource": {"type": 64, "id": 128},
    "context": {"purpose": 128},
}


#: the OpenAPI pattern of every AuthZEN field: no C0 control character or DEL (no identifier,
#: claim name or purpose has one, and PostgreSQL text cannot hold NUL at all), and not an
#: e-mail address (:func:`~consent.ledger.ledger.looks_like_email`). Lone surrogates are
#: refused too (:data:`_SURROGATE`) but not written here: a JSON string can escape one
#: (``"\\ud800"``) but never carry one as text, and a surrogate range in the pattern
#: breaks schemathesis (it then sent a control character as valid, and failed itself).
FIELD_PATTERN = rf"^(?!{EMAIL_PATTERN}$)[^\x00-\x1f\x7f]*$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: a lone surrogate: not Unicode text, so no database stores it and RFC 8785 has no form
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidRequest(ValueError):
    """The request is not a valid AuthZEN evaluation request; the message says why."""


@dataclass(frozen=True)
class EvaluationQuery:
    subject_type: str
    subject_id: str
    action: str
    resource_type: str
    claim: str
    purpose: str


@dataclass(frozen=True)
class Evaluation:
    decision: bool
    reason: str
    decision_id: str
    record_id: str | None = None
    receipt_id: str | None = None
    expires_at: datetime | None = None
    lawful_basis: str | None = None

    def to_authzen(self) -> dict[str, Any]:
        """AuthZEN 1.0 section 6.2: ``decision`` and a ``context`` for the PEP."""
        context: dict[str, Any] = {"decision_id": self.decision_id, "reason": self.reason}
        if self.decision:
            context.update(
                consent_record_id=self.record_id, receipt_id=self.receipt_id,
                lawful_basis=self.lawful_basis,
                expires_at=self.expires_at.isoformat().replace("+00:00", "Z")
                if self.expires_at is not None else None)
        return {"decision": self.decision, "context": context}


# -- parsing (AuthZEN 1.0 sections 5 to 7) -----------------------------------------------


def _entity(name: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}{name} must be a JSON object")
    for field, limit in ENTITIES[name].items():
        member = value.get(field)
        if member is None:
            raise InvalidRequest(f"missing field {where}{name}.{field}")
        if not isinstance(member, str) or not 1 <= len(member) <= limit:
            raise InvalidRequest(f"{where}{name}.{field} must be a string of 1 to {limit} "
                                 "characters")
        if _CONTROL.search(member):
            raise InvalidRequest(f"{where}{name}.{field} must not contain control characters")
        if _SURROGATE.search(member):
            raise InvalidRequest(f"{where}{name}.{field} must be Unicode text (it holds a "
                                 "lone surrogate)")
        if looks_like_email(member):
            # every request is recorded, and the records hold no personal data in clear
            raise InvalidRequest(f"{where}{name}.{field} looks like an e-mail address; "
                                 "send the pairwise subject identifier the hub issued")
    if name != "context" and "properties" in value and not isinstance(value["properties"],
                                                                       dict):
        raise InvalidRequest(f"{where}{name}.properties must be a JSON object")
    return value


def _query(entities: Mapping[str, dict[str, Any]]) -> EvaluationQuery:
    return EvaluationQuery(
        subject_type=entities["subject"]["type"], subject_id=entities["subject"]["id"],
        action=entities["action"]["name"], resource_type=entities["resource"]["type"],
        claim=entities["resource"]["id"], purpose=entities["context"]["purpose"])


def parse_evaluation(body: Any) -> EvaluationQuery:
    """Section 6.1: ``subject``, ``action``, ``resource`` and ``context`` are all needed."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name in ENTITIES:
        if name not in body:
            raise InvalidRequest(f"missing field {name}")
    return _query({name: _entity(name, body[name], "") for name in ENTITIES})


def parse_evaluations(body: Any) -> tuple[list[EvaluationQuery], str, bool]:
    """Section 7.1: (queries, semantic, single). Top-level members are defaults an item's own
    member replaces; without ``evaluations`` (or with an empty one) it is one evaluation."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    defaults = {n: _entity(n, body[n], "") for n in ENTITIES if n in body}
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise InvalidRequest("options must be a JSON object")
    semantic = options.get("evaluations_semantic", "execute_all")
    if semantic not in SEMANTICS:
        raise InvalidRequest(f"options.evaluations_semantic must be one of "
                             f"{', '.join(SEMANTICS)}")
    items = body.get("evaluations", [])
    if not isinstance(items, list):
        raise InvalidRequest("evaluations must be an array")
    if len(items) > MAX_BATCH:
        raise InvalidRequest(f"at most {MAX_BATCH} evaluations per request")
    if not items:
        return [parse_evaluation(body)], semantic, True
    queries = []
    for index, item in enumerate(items):
        where = f"evaluations[{index}]."
        if not isinstance(item, dict):
            raise InvalidRequest(f"evaluations[{index}] must be a JSON object")
        merged = dict(defaults)
        merged.update({n: _entity(n, item[n], where) for n in ENTITIES if n in item})
        for name in ENTITIES:
            if name not in merged:
                raise InvalidRequest(f"missing field {where}{name} (give it in the item or "
                                     "as a default at the top level)")
        queries.append(_query(merged))
    return queries, semantic, False


# -- deciding ------------------------------------------------------------------------------

_RECORDS = cast(Table, ConsentRecord.__table__)
_EVENTS = cast(Table, ConsentEvent.__table__)
_DECISIONS = cast(Table, AgencyDecision.__table__)


def _latest_event_query(key: str) -> Select[Any]:
    """An agency's record, found by ``client_id`` and ``key`` (the citizen's ``subject`` at
    that agency, or their ``account_id``), with its last event at or before ``now`` and the
    newest receipt up to then: one indexed round trip (records by (client_id, subject) or
    (account_id, client_id), events by (record_id, seq) read backwards), whatever the
    history's length."""
    r, e = _RECORDS.c, _EVENTS.c
    earlier = _EVENTS.alias("receipted")
    receipt = (select(earlier.c.receipt_id)
               .where(earlier.c.record_id == r.id, earlier.c.receipt_id.is_not(None),
                      earlier.c.at <= bindparam("now"))
               .order_by(earlier.c.seq.desc()).limit(1).scalar_subquery())
    return (select(r.id, r.account_id, e.state, e.claims, e.expires_at, e.notice_version,
                   e.declined, receipt.label("receipt_id"))
            .select_from(_RECORDS.join(_EVENTS, e.record_id == r.id))
            .where(r.client_id == bindparam("client_id"), r[key] == bindparam("key"),
                   e.at <= bindparam("now"))
            .order_by(e.seq.desc()).limit(1))


_LATEST = {key: _latest_event_query(key) for key in ("subject", "account_id")}
#: a condition on a record's ``account_id`` column (see :class:`DecisionPoint`)
AccountCondition = Callable[[ColumnElement[str]], ColumnElement[bool]]
#: when the account of an ``account_id`` column was closed, NULL while open (a scalar
#: subquery: see :func:`_record_pg_sql`)
AccountClosedAt = Callable[[ColumnElement[str]], ColumnElement[Any]]
#: the read of :func:`latest_state` by ``account_id`` (parameters ``client_id``, ``key``: the
#: account id, ``now``), for a caller that reads it together with something else in one
#: statement (:mod:`idp.citizen`) and makes the state with :func:`state_from_row`
LATEST_BY_ACCOUNT = _LATEST["account_id"]


#: PostgreSQL: a request's decision rows and their ledger entries in one statement (a
#: data-modifying WITH, section 7.8.4 of PostgreSQL's manual), both sets of rows passed as
#: one JSON array each (json_to_recordset, section 9.16.1): one statement is one transaction,
#: so both tables get their rows or neither does. JSON, not one array per column: psycopg
#: builds array parameters element by element in Python, at about ten times the cost of
#: ``json.dumps`` (:mod:`kernel.jsonfast`: JSON text, so strings come back as they were). The
#: ledger's values go through as text and are cast back: the leaf hash and the decisions'
#: salts in hex, the time in ISO 8601 with its offset, so what is stored is what was hashed.
_RECORD_PG = """
WITH decided AS (
  INSERT INTO consent_decisions (at, client_id, request_id, id, subject, account_id, record_id,
                                 action, claim, purpose, decision, reason, subject_salt,
                                 erased_at)
  SELECT %(at)s::timestamptz, %(client_id)s::text,
         CASE WHEN g.gone THEN NULL ELSE %(request_id)s::text END, d.id,
         CASE WHEN g.gone THEN NULL ELSE d.subject END,
         CASE WHEN g.gone THEN NULL ELSE d.account_id END,
         CASE WHEN g.gone THEN NULL ELSE d.record_id END, d.action, d.claim, d.purpose,
         d.decision, d.reason, CASE WHEN g.gone THEN NULL ELSE decode(d.subject_salt, 'hex') END,
         CASE WHEN g.gone THEN %(at)s::timestamptz END
  FROM json_to_recordset(%(decisions)s::json) AS d(
    id text, subject text, account_id text, record_id text, action text, claim text,
    purpose text, decision boolean, reason text, subject_salt text, erased boolean)
  CROSS JOIN LATERAL (SELECT d.erased OR (d.account_id IS NOT NULL AND NOT {open})
                      AS gone) AS g)
INSERT INTO ledger_entries (kind, entry, leaf_hash, created_at)
SELECT l.kind, l.entry, decode(l.leaf_hash, 'hex'), l.created_at::timestamptz
FROM json_to_recordset(%(entries)s::json) AS l(
  kind text, entry text, leaf_hash text, created_at text)
"""


def _record_pg_sql(account_closed_at: AccountClosedAt | None, dialect: Any) -> str:
    """:data:`_RECORD_PG` with ``{open}``, the condition that a row's account is open, as
    SQL (``TRUE`` without one): the write itself keeps a row stripped whose account was
    closed after the read that answered it, so an erasure that strips the account's rows
    meanwhile leaves none behind that names it."""
    if account_closed_at is None:
        return _RECORD_PG.replace("{open}", "TRUE")
    closed_at = account_closed_at(literal_column("d.account_id"))
    sql = str(closed_at.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    return _RECORD_PG.replace("{open}", f"({sql}) IS NULL")


def _record_pg(sql: str, rows: list[dict[str, Any]], ledger_rows: list[dict[str, Any]], *,
               client_id: str, now: datetime, request_id: str | None
               ) -> tuple[str, dict[str, Any]]:
    # entry_rows gives all of a request's entries one time: format each time once
    stamps = {at: at.isoformat() for at in {row["created_at"] for row in ledger_rows}}
    entries = [{"kind": row["kind"], "entry": row["entry"], "leaf_hash": row["leaf_hash"].hex(),
                "created_at": stamps[row["created_at"]]} for row in ledger_rows]
    return sql, {"at": now, "client_id": client_id, "request_id": request_id,
                        "decisions": jsonfast.dumps(rows), "entries": jsonfast.dumps(entries)}


def unresolved_about(pairs: Sequence[tuple[str, str]]) -> ColumnElement[bool]:
    """Questions that resolved to no one and named one of ``pairs`` (agency, subject),
    through the partial index ``ix_consent_decisions_unresolved``, whose condition this
    repeats (:data:`~consent.models.UNRESOLVED`), so the planner can use it."""
    if not pairs:
        return false()
    d = _DECISIONS.c
    return and_(d.account_id.is_(None), d.subject.is_not(None),
                tuple_(d.client_id, d.subject).in_(list(pairs)))


def _row_here(row: dict[str, Any], *, client_id: str, now: datetime, request_id: str | None
              ) -> dict[str, Any]:
    """A row of :meth:`DecisionPoint._answer_all` with the columns every row shares, for a
    plain INSERT (what :data:`_RECORD_PG` does in SQL)."""
    erased = row["erased"]
    salt = row["subject_salt"]
    return {**{k: v for k, v in row.items() if k != "erased"}, "at": now,
            "client_id": client_id, "request_id": None if erased else request_id,
            "subject_salt": None if salt is None else bytes.fromhex(salt),
            "erased_at": now if erased else None}


@dataclass(frozen=True)
class LatestState:
    """A record's state for a decision at ``now``: :func:`history.state_at` reduced to what
    an answer needs (same rules: expiry at its time, no claims unless valid)."""

    record_id: str
    account_id: str
    state: str
    claims: Mapping[str, GrantedClaim]
    receipt_id: str | None
    expires_at: datetime | None
    notice_version: str
    declined: frozenset[str]
    #: False when the record's account is closed (read by :class:`DecisionPoint`, which
    #: then answers as if there were no record, and keeps no trace of whom it was about)
    account_open: bool = True

    @property
    def valid(self) -> bool:
        return self.state in history.VALID_STATES

    @property
    def granted(self) -> set[str]:
        """The claims the agency may receive now (ID token, access token, userinfo)."""
        return set(self.claims) if self.valid else set()


def latest_state(conn: Connection, client_id: str, now: datetime, *,
                 subject: str | None = None, account_id: str | None = None) -> LatestState | None:
    """The agency's record of one citizen (by ``subject`` or ``account_id``) as it stands at
    ``now``, or None when there is none (or no event yet)."""
    key, value = ("subject", subject) if subject is not None else ("account_id", account_id)
    row = conn.execute(_LATEST[key], {"client_id": client_id, "key": value,
                                      "now": now}).first()
    return None if row is None else state_from_row(row._mapping, now)


def state_from_row(row: Mapping[Any, Any], now: datetime, prefix: str = "") -> LatestState | None:
    """The state a row of :data:`LATEST_BY_ACCOUNT` (its columns named with ``prefix``)
    stands for at ``now``; None when the row has no record (an outer join found none)."""
    record_id = row[prefix + "id"]
    if record_id is None:
        return None
    state, expires_at = row[prefix + "state"], row[prefix + "expires_at"]
    claims: dict[str, GrantedClaim] = {}
    if state in history.VALID_STATES and expires_at is not None and expires_at <= now:
        state = "expired"
    elif state in history.VALID_STATES:
        claims = {name: GrantedClaim.from_json(name, data)
                  for name, data in row[prefix + "claims"].items()}
    return LatestState(record_id=record_id, account_id=row[prefix + "account_id"], state=state,
                       claims=claims, receipt_id=row[prefix + "receipt_id"],
                       expires_at=expires_at, notice_version=row[prefix + "notice_version"],
                       declined=frozenset(row[prefix + "declined"]),
                       account_open=bool(row.get(prefix + "account_open", True)))


def _evaluate(query: EvaluationQuery, grant: LatestState | None) -> tuple[bool, str]:
    if query.subject_type != "user":
        return False, "unsupported_subject_type"
    if query.resource_type != "claim":
        return False, "unsupported_resource_type"
    if query.action != "use":
        return False, "unsupported_action"
    return history.evaluate(grant, query.claim, query.purpose)


class DecisionPoint:
    """Answers agencies' evaluations from the consent records and records every answer."""

    def __init__(self, db: Database, ledger: Ledger | None = None, *,
                 account_open: AccountCondition | None = None,
                 account_closed_at: AccountClosedAt | None = None) -> None:
        """``account_open``: the condition that a record's account (its ``account_id``
        column, given) is still open; a record of a closed account then answers as no
        record at all, from the moment the account is closed (before its consents are
        withdrawn; the composition root passes the broker's), and the question is kept as
        :meth:`forget_account` leaves those asked before (right to erasure: the agency
        still knows the citizen by that subject; the hub no longer keeps who it was)."""
        self._db = db
        self._postgresql = db.engine.dialect.name == "postgresql"
        self._query = _LATEST["subject"] if account_open is None else _LATEST[
            "subject"].add_columns(account_open(_RECORDS.c.account_id).label("account_open"))
        #: the read of every decision request (kernel.db.Prepared: compiled once)
        self._by_subject = Prepared(db, self._query)
        self._record_sql = _record_pg_sql(account_closed_at, db.engine.dialect)
        #: every answer is also a ledger entry, in the same transaction
        self.ledger = ledger

    def decide(self, client_id: str, queries: Sequence[EvaluationQuery], *, now: datetime,
               semantic: str = "execute_all", request_id: str | None = None
               ) -> list[Evaluation]:
        """Evaluate in order; ``deny_on_first_deny`` / ``permit_on_first_permit`` stop at the
        first such answer (AuthZEN 1.0 section 7.1.2), so fewer answers may come back.

        A read per distinct subject, then every decision row and every ledger entry written
        at once: nothing is answered unless both are committed, and neither commits without
        the other. On PostgreSQL the reads need no transaction (each statement sees what is
        committed when it runs, as in a READ COMMITTED transaction) and the writes are one
        statement (:data:`_RECORD_PG`), atomic on its own: two round trips per request, not
        five (BEGIN, read, two INSERTs, COMMIT), which is what the latency under load is
        made of on this, the hub's hottest write path. Elsewhere (SQLite, in the same
        process) one transaction with a multi-row INSERT each."""
        if self._postgresql:
            def read(subject: str) -> LatestState | None:
                found = self._by_subject.rows({"client_id": client_id, "key": subject,
                                               "now": now})
                return state_from_row(found[0]._mapping, now) if found else None

            answers, rows, entries = self._answer_all(read, client_id, queries, now=now,
                                                      semantic=semantic)
            ledger_rows = self.ledger.entry_rows(entries) if self.ledger else []
            self._db.send(*_record_pg(self._record_sql, rows, ledger_rows,
                                      client_id=client_id, now=now, request_id=request_id))
        else:
            with self._db.engine.begin() as conn:
                def read_here(subject: str) -> LatestState | None:
                    row = conn.execute(self._query, {"client_id": client_id, "key": subject,
                                                     "now": now}).first()
                    return None if row is None else state_from_row(row._mapping, now)

                answers, rows, entries = self._answer_all(
                    read_here, client_id, queries, now=now, semantic=semantic)
                conn.execute(_DECISIONS.insert(), [_row_here(row, client_id=client_id,
                                                            now=now, request_id=request_id)
                                                  for row in rows])
                if self.ledger is not None:
                    self.ledger.append_many(entries, session=conn)
        permits = sum(answer.decision for answer in answers)
        if permits:
            CONSENT_DECISIONS.labels("permit").inc(permits)
        if permits < len(answers):
            CONSENT_DECISIONS.labels("deny").inc(len(answers) - permits)
        return answers

    @staticmethod
    def _answer_all(read: Callable[[str], LatestState | None], client_id: str,
                    queries: Sequence[EvaluationQuery], *, now: datetime, semantic: str
                    ) -> tuple[list[Evaluation], list[dict[str, Any]],
                               list[tuple[str, dict[str, Any]]]]:
        """(answers, decision rows without the columns every row shares, ledger entries);
        ``read`` gives the agency's record of a subject as it stands at ``now``. Each row
        has a fresh salt (in hex) for its entry's subject commitment."""
        answers: list[Evaluation] = []
        rows: list[dict[str, Any]] = []
        entries: list[tuple[str, dict[str, Any]]] = []
        grants: dict[str, LatestState | None] = {}
        for query in queries:
            if query.subject_id not in grants:
                grants[query.subject_id] = read(query.subject_id)
            grant = grants[query.subject_id]
            closed = grant is not None and not grant.account_open
            if closed:
                grant = None  # answered as no record; kept as forget_account leaves a row
            decision, reason = _evaluate(query, grant)
            decision_id = new_time_ordered_id()
            if decision and grant is not None:
                answer = Evaluation(
                    decision=True, reason=reason, decision_id=decision_id,
                    record_id=grant.record_id, receipt_id=grant.receipt_id,
                    expires_at=grant.expires_at,
                    lawful_basis=grant.claims[query.claim].lawful_basis)
            else:
                answer = Evaluation(decision=decision, reason=reason, decision_id=decision_id)
            record_id = grant.record_id if grant is not None else None
            salt = new_salt()
            rows.append({
                "id": decision_id, "subject": None if closed else query.subject_id,
                "account_id": grant.account_id if grant is not None else None,
                "record_id": record_id, "action": query.action, "claim": query.claim,
                "purpose": query.purpose, "decision": decision, "reason": reason,
                "subject_salt": None if closed else salt.hex(), "erased": closed})
            entries.append(("decision.query", decision_entry_of(
                decision_id=decision_id, client_id=client_id, subject=query.subject_id,
                action=query.action, claim=query.claim, purpose=query.purpose,
                decision=decision, reason=reason, record_id=record_id, salt=salt)))
            answers.append(answer)
            if (semantic == "deny_on_first_deny" and not decision) or (
                    semantic == "permit_on_first_permit" and decision):
                break
        return answers, rows, entries

    def for_account(self, account_id: str, limit: int = 100, offset: int = 0, *,
                    subjects: Sequence[tuple[str, str]] = ()) -> list[AgencyDecision]:
        """The citizen's data-access history: every decision about their records, and every
        question that named one of ``subjects`` (the account's (agency, ``sub``) pairs)
        without resolving, asked before the citizen had a record there (its
        ``account_id`` is None), newest first (ties broken by id, so pages are stable)."""
        about = AgencyDecision.account_id == account_id
        if subjects:
            about = or_(about, unresolved_about(subjects))
        with self._db.session() as s:
            return list(s.scalars(select(AgencyDecision).where(about).order_by(
                AgencyDecision.at.desc(), AgencyDecision.id.desc()).offset(offset).limit(limit)))

    def purge(self, before: datetime, *, batch: int = 5000) -> int:
        """Delete the answers given before ``before`` (the decision log's retention), in
        batches of ``batch`` rows, each its own transaction; returns how many.

        The rows are walked in primary key order, below the first id of ``before``'s
        millisecond: the ids are time-ordered (:func:`new_time_ordered_id`), so that range
        holds the older answers, and a round with nothing to delete reads nothing, however
        large the log (with ``at`` in the statement, the planner chose a sequential or a
        bitmap scan). ``at`` is still checked for each row: an id made before ids were
        time-ordered sorts anywhere, so such a row goes only once both say so."""
        boundary = f"{(int(before.timestamp() * 1000) & 0xFFFF_FFFF_FFFF) << 80:032x}"
        done, after = 0, ""
        while True:
            with self._db.session() as s:
                rows = s.execute(select(AgencyDecision.id, AgencyDecision.at).where(
                    AgencyDecision.id > after, AgencyDecision.id < boundary)
                    .order_by(AgencyDecision.id).limit(batch)).all()
                old = [r.id for r in rows if r.at < before]
                if old:
                    s.execute(delete(AgencyDecision).where(AgencyDecision.id.in_(old)))
            done += len(old)
            if len(rows) < batch:
                return done
            after = rows[-1].id

    def forget_account(self, account_id: str, *, now: datetime,
                       subjects: Iterable[tuple[str, str]] = (), batch: int = 5000) -> int:
        """Right to erasure (GDPR Art. 17), for an account being erased: every answer about
        it keeps who asked, when, what for and the answer, and loses what leads to the
        citizen (the subject the agency sent, the account, the consent record, the salt of
        its ledger entry's subject commitment, the agency's request id), in batches of
        ``batch`` rows, each its own transaction; returns how many. "About it": those that
        resolved to the account (through the account's index), and those that resolved to
        no one but asked about one of ``subjects``, the account's (agency, ``sub``) pairs
        (an agency can ask before the citizen signs in there: another agency of its
        pairwise sector knows the ``sub``; through the partial index of unresolved
        questions). Questions asked once the account is closed are kept this way at once
        (:meth:`decide`). Idempotent. The ledger entries are not touched: a new one now
        leads to no one (its salt is gone); `audit reconcile` compares such a row with its
        entry apart from :data:`~consent.entries.WHOM`."""
        d = _DECISIONS.c
        conditions = [d.account_id == account_id]
        pairs = list(subjects)
        if pairs:  # one statement for every agency (a BitmapOr of the partial index's scans)
            conditions.append(unresolved_about(pairs))
        done = 0
        for condition in conditions:
            while True:
                with self._db.session() as s:
                    ids = list(s.scalars(select(d.id).where(condition).limit(batch)))
                    if ids:
                        s.execute(update(AgencyDecision).where(
                            AgencyDecision.id.in_(ids)).values(
                            subject=None, account_id=None, record_id=None, subject_salt=None,
                            request_id=None, erased_at=now))
                done += len(ids)
                if len(ids) < batch:
                    break
        return done

    def for_agency(self, client_id: str, limit: int = 100) -> list[AgencyDecision]:
        with self._db.session() as s:
            return list(s.scalars(select(AgencyDecision).where(
                AgencyDecision.client_id == client_id).order_by(
                AgencyDecision.at.desc()).limit(limit)))
