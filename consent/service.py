"""The consent service: grants at login, refusals, withdrawals, expiry, point-in-time queries.

Every change appends one :class:`~consent.models.ConsentEvent` (ISO/IEC TS 27560:2023 event
with its time, type and resulting state) to the citizen's record with that agency; grants and
withdrawals also produce a signed Kantara v1.1 receipt (:mod:`consent.receipts`). Nothing is
updated in place, so :meth:`ConsentService.state_at` answers for any past moment.

Flask-free: the login flow (idp/), the account pages and the decision API all call it.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kernel.db import Database, utcnow

from . import history
from .decisions import AccountClosedAt, AccountCondition, DecisionPoint, LatestState, latest_state
from .entries import consent_entry
from .errors import AccountClosed, NothingToWithdraw, RequiredClaimWithdrawal
from .history import ConsentGrant, GrantedClaim, expiry_of
from .ledger.ledger import Ledger
from .models import SCHEMA_VERSION, ConsentEvent, ConsentReceipt, ConsentRecord
from .policy import AgencyPolicy
from .receipts import ReceiptSigner, build_receipt

T = TypeVar("T")

#: attempts of a write that lost a race (unique record or seq); the lock makes this rare
RETRIES = 12


@dataclass(frozen=True)
class Withdrawal:
    """What the hub must act on after a withdrawal (revoke tokens, back-channel logout, SET).

    ``complete`` is True when the whole grant was withdrawn, False when only ``claims`` (optional
    ones) were; in both cases tokens already issued may carry what was withdrawn.
    """

    account_id: str
    client_id: str
    subject: str
    claims: frozenset[str]
    complete: bool
    record_id: str
    #: None only when the grant had no claims to withdraw
    receipt_id: str | None
    at: datetime


WithdrawalHook = Callable[[Withdrawal], None]
#: what must commit with a withdrawal, written in its transaction (the session)
WithdrawalWrites = Callable[[Session, Withdrawal], None]


def _ignore(_withdrawal: Withdrawal) -> None:
    """The default hook: nothing to revoke (tests, or no OpenID provider wired)."""


def _write_nothing(_s: Session, _withdrawal: Withdrawal) -> None:
    """The default writes: nothing to end with a withdrawal (no OpenID provider wired)."""


class ConsentService:
    def __init__(self, db: Database, signer: ReceiptSigner, *,
                 on_withdraw: WithdrawalHook = _ignore,
                 with_withdrawal: WithdrawalWrites = _write_nothing,
                 clock: Callable[[], datetime] = utcnow, ledger: Ledger | None = None,
                 account_open: AccountCondition | None = None,
                 account_closed_at: AccountClosedAt | None = None,
                 hold_open_account: Callable[[Session, str], bool] | None = None) -> None:
        """``hold_open_account(session, account_id)``: lock the account (shared, until the
        session's transaction ends) and say whether it is open: a consent is given only
        to an open account, and an account's closing waits for one being given, whose
        withdrawal then follows with the others (the composition root passes the
        broker's). ``with_withdrawal(session, withdrawal)`` writes what must end with a
        withdrawal in its own transaction (the agency's refresh grants, its notices): done
        after the commit, by ``on_withdraw``, a fault in between (a store or database that
        failed at that moment) would leave them to a withdrawal that cannot be repeated."""
        self._hold_open_account = hold_open_account
        self._db = db
        self.signer = signer
        self._on_withdraw = on_withdraw
        self._with_withdrawal = with_withdrawal
        self.clock = clock
        #: every consent event is also a ledger entry, committed with it
        self.ledger = ledger
        #: the agencies' decision API and its record of answers (data-access history)
        self.decisions = DecisionPoint(db, ledger, account_open=account_open,
                                       account_closed_at=account_closed_at)

    # -- reading ------------------------------------------------------------------------

    @staticmethod
    def _events(s: Session, record_id: str) -> list[ConsentEvent]:
        return list(s.scalars(select(ConsentEvent).where(ConsentEvent.record_id == record_id)
                              .order_by(ConsentEvent.seq)))

    @staticmethod
    def _record(s: Session, account_id: str, client_id: str, *,
                lock: bool = False) -> ConsentRecord | None:
        """The record; ``lock`` holds its row until commit (PostgreSQL), so concurrent appends
        to one record queue instead of colliding on (record, seq)."""
        query = select(ConsentRecord).where(ConsentRecord.account_id == account_id,
                                            ConsentRecord.client_id == client_id)
        return s.scalars(query.with_for_update() if lock else query).one_or_none()

    def state_at(self, account_id: str, client_id: str, at: datetime) -> ConsentGrant | None:
        """The record's state at ``at``, read from its history (None before any event)."""
        with self._db.session() as s:
            record = self._record(s, account_id, client_id)
            if record is None:
                return None
            return history.state_at(record, self._events(s, record.id), at)

    def current(self, account_id: str, client_id: str,
                now: datetime | None = None) -> ConsentGrant | None:
        return self.state_at(account_id, client_id, now or self.clock())

    def consented_at(self, account_id: str, client_id: str, claim: str, purpose: str,
                     at: datetime) -> bool:
        """Point in time: was ``claim`` consented for ``purpose`` at ``at``?"""
        grant = self.state_at(account_id, client_id, at)
        return grant is not None and grant.allows(claim, purpose)

    def needs_consent(self, account_id: str, policy: AgencyPolicy,
                      requested_claims: Iterable[str] | None,
                      now: datetime | None = None) -> bool:
        """Must the consent page be shown? (see :func:`consent.history.needs_consent`)."""
        return history.needs_consent(self.latest(account_id, policy.client_id, now), policy,
                                     requested_claims)

    def latest(self, account_id: str, client_id: str,
               now: datetime | None = None) -> LatestState | None:
        """The record's state now, in one indexed read: what answers need (granted claims,
        validity, notice version, declined claims), not the whole history."""
        with self._db.reader() as conn:
            return latest_state(conn, client_id, now or self.clock(), account_id=account_id)

    def granted_claims(self, account_id: str, client_id: str,
                       now: datetime | None = None) -> set[str]:
        """The claims this agency may receive now (ID token, access token, userinfo): one
        indexed read of the record's last event (the same rules as :meth:`current`)."""
        state = self.latest(account_id, client_id, now)
        return set() if state is None else state.granted

    def history(self, account_id: str, client_id: str) -> list[ConsentEvent]:
        with self._db.session() as s:
            record = self._record(s, account_id, client_id)
            return [] if record is None else self._events(s, record.id)

    def grants_for_account(self, account_id: str,
                           now: datetime | None = None) -> list[ConsentGrant]:
        """The current state of each of the citizen's records, newest change first."""
        at = now or self.clock()
        with self._db.session() as s:
            records = list(s.scalars(select(ConsentRecord).where(
                ConsentRecord.account_id == account_id)))
            states = [history.state_at(r, self._events(s, r.id), at) for r in records]
        found = [g for g in states if g is not None]
        return sorted(found, key=lambda g: g.at, reverse=True)

    def receipt(self, receipt_id: str) -> ConsentReceipt | None:
        if not 1 <= len(receipt_id) <= 36:
            return None
        with self._db.session() as s:
            return s.get(ConsentReceipt, receipt_id)

    def receipts_for_account(self, account_id: str) -> list[ConsentReceipt]:
        with self._db.session() as s:
            return list(s.scalars(select(ConsentReceipt).where(
                ConsentReceipt.account_id == account_id).order_by(
                ConsentReceipt.issued_at.desc())))

    # -- writing ------------------------------------------------------------------------

    def _retrying(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a unit of work; a concurrent append to the same record (unique
        record + seq) or a concurrent first record (unique account + agency) retries."""
        for attempt in range(RETRIES):
            try:
                with self._db.session() as s:
                    return work(s)
            except IntegrityError:
                # back off a little, with jitter, so racing writers spread out
                time.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 6)))  # noqa: S311
        raise RuntimeError("consent record changed concurrently too many times")

    def _open(self, s: Session, account_id: str, client_id: str,
              subject: str) -> ConsentRecord:
        """The record a citizen's answer goes into (made on the first), locked; the
        account first, which must be open (:class:`AccountClosed`)."""
        if self._hold_open_account is not None and not self._hold_open_account(s, account_id):
            raise AccountClosed()
        record = self._record(s, account_id, client_id, lock=True)
        if record is None:
            record = ConsentRecord(account_id=account_id, client_id=client_id, subject=subject,
                                   schema_version=SCHEMA_VERSION, created_at=self.clock())
            s.add(record)
            s.flush()
        elif record.subject != subject:
            record.subject = subject  # the lookup key follows the agency's sector; events
            # keep every subject they were given under
        return record

    def _append(self, s: Session, record: ConsentRecord, events: list[ConsentEvent], *,
                kind: str, state: str, at: datetime, subject: str,
                claims: dict[str, GrantedClaim], declined: Iterable[str],
                affected: Iterable[str], method: str, policy: dict[str, Any],
                expires_at: datetime | None,
                receipt_claims: Iterable[GrantedClaim] | None = None) -> ConsentEvent:
        last = events[-1] if events else None
        at = max(at, last.at) if last is not None else at  # history stays in order
        event = ConsentEvent(
            record_id=record.id, seq=(last.seq + 1) if last is not None else 1, kind=kind,
            state=state, at=at, subject=subject,
            claims={k: v.to_json() for k, v in sorted(claims.items())},
            declined=sorted(declined), affected=sorted(affected), method=method,
            notice_version=str(policy["notice_version"]),
            notice_language=str(policy["notice_language"]), policy=policy,
            expires_at=expires_at,
        )
        if receipt_claims is not None:
            event.receipt_id = str(uuid.uuid4())
        s.add(event)
        record.expires_at = expiry_of(event)
        s.flush()
        if receipt_claims is not None and event.receipt_id is not None:
            payload = build_receipt(
                receipt_id=event.receipt_id, at=at, event_kind=kind, method=method,
                subject=subject, policy=policy, claims=receipt_claims, record_id=record.id,
                record_schema_version=record.schema_version, expires_at=expires_at)
            s.add(ConsentReceipt(id=event.receipt_id, record_id=record.id, event_id=event.id,
                                 account_id=record.account_id, client_id=record.client_id,
                                 issued_at=at, payload=payload,
                                 jws=self.signer.sign(payload)))
        if self.ledger is not None:
            self.ledger.append(f"consent.{kind}", consent_entry(record.client_id, event),
                               session=s)
        events.append(event)
        return event

    def _expire_if_due(self, s: Session, record: ConsentRecord, events: list[ConsentEvent],
                       now: datetime) -> ConsentGrant | None:
        """Write the ``expired`` event of a grant whose validity passed, once. Only the
        record's last event can expire: one whose validity runs past ``now`` (a renewal
        written since ``now`` was read, by a job that walks many records) is left alone, or
        its ``expired`` event would be dated in the future, and every later event with it
        (a withdrawal taking effect a day late)."""
        current = history.state_at(record, events, now)
        last = events[-1] if events else None
        if current is not None and current.state == "expired" and last is not None \
                and last.kind != "expired" and last.expires_at is not None \
                and last.expires_at <= now:
            self._append(s, record, events, kind="expired", state="expired",
                         at=last.expires_at, subject=last.subject, claims={},
                         declined=last.declined, affected=last.claims, method="expiry",
                         policy=last.policy, expires_at=last.expires_at)
        return current

    def record_decision(self, account_id: str, policy: AgencyPolicy, subject: str,
                        allowed_optional: Iterable[str], *,
                        requested_claims: Iterable[str] | None = None,
                        method: str = "web-form", now: datetime | None = None
                        ) -> ConsentGrant:
        """The citizen pressed Allow on the consent page.

        Released = the required claims offered + the optional ones ticked (``allowed_optional``
        outside the offered optional claims are ignored). ``requested_claims`` are the claims
        the page showed (all the agency declares when None). Appends ``given`` (or
        ``renewed`` when it follows a grant that was valid or expired) and issues a receipt
        (not when nothing at all is granted: a Kantara receipt needs a purpose).
        """
        offered = policy.offered(None if requested_claims is None
                                 else frozenset(requested_claims))
        allowed = set(allowed_optional)
        at = now or self.clock()

        def work(s: Session) -> ConsentGrant:
            record = self._open(s, account_id, policy.client_id, subject)
            events = self._events(s, record.id)
            previous = self._expire_if_due(s, record, events, at)
            claims, declined, affected = history.merged_grant(previous, policy, offered,
                                                              allowed)
            kind = "renewed" if previous is not None and previous.state in (
                "given", "renewed", "expired") else "given"
            ttl = policy.consent_ttl_days
            expires = at + timedelta(days=ttl) if ttl is not None else None
            self._append(s, record, events, kind=kind, state=kind, at=at, subject=subject,
                         claims=claims, declined=declined, affected=affected, method=method,
                         policy=policy.snapshot(), expires_at=expires,
                         receipt_claims=list(claims.values()) or None)
            grant = history.state_at(record, events, events[-1].at)
            assert grant is not None
            return grant

        return self._retrying(work)

    def record_refusal(self, account_id: str, policy: AgencyPolicy, subject: str, *,
                       requested_claims: Iterable[str] | None = None,
                       method: str = "web-form", now: datetime | None = None
                       ) -> ConsentGrant:
        """The citizen pressed Deny. A grant still valid stays as it was (withdrawing it is
        a separate, explicit act); otherwise the record's state becomes ``refused``."""
        offered = policy.offered(None if requested_claims is None
                                 else frozenset(requested_claims))
        at = now or self.clock()

        def work(s: Session) -> ConsentGrant:
            record = self._open(s, account_id, policy.client_id, subject)
            events = self._events(s, record.id)
            previous = self._expire_if_due(s, record, events, at)
            affected = [c.claim for c in offered]
            if previous is not None and previous.valid:
                last = events[-1]
                self._append(s, record, events, kind="refused", state=previous.state, at=at,
                             subject=subject, claims=dict(previous.claims),
                             declined=previous.declined, affected=affected, method=method,
                             policy=last.policy, expires_at=last.expires_at)
            else:
                self._append(s, record, events, kind="refused", state="refused", at=at,
                             subject=subject, claims={}, declined=(), affected=affected,
                             method=method, policy=policy.snapshot(), expires_at=None)
            grant = history.state_at(record, events, events[-1].at)
            assert grant is not None
            return grant

        return self._retrying(work)

    def withdraw(self, account_id: str, client_id: str, *, claim: str | None = None,
                 method: str = "account-page", now: datetime | None = None) -> ConsentGrant:
        """Withdraw the whole grant to an agency, or one optional ``claim`` of it.

        Effective at once for the decision API; then calls the ``on_withdraw`` hook so the
        provider revokes tokens and tells the agency. Raises :class:`NothingToWithdraw` or
        :class:`RequiredClaimWithdrawal`.
        """
        at = now or self.clock()

        def work(s: Session) -> tuple[ConsentGrant, Withdrawal]:
            record = self._record(s, account_id, client_id, lock=True)
            if record is None:
                raise NothingToWithdraw()
            events = self._events(s, record.id)
            current = self._expire_if_due(s, record, events, at)
            if current is None or not current.valid or (
                    claim is not None and claim not in current.claims):
                raise NothingToWithdraw()
            last = events[-1]
            if claim is None:
                gone = dict(current.claims)
                remaining: dict[str, GrantedClaim] = {}
                state, declined = "withdrawn", set(current.declined)
            else:
                if current.claims[claim].required:
                    raise RequiredClaimWithdrawal()
                gone = {claim: current.claims[claim]}
                remaining = {k: v for k, v in current.claims.items() if k != claim}
                state, declined = current.state, set(current.declined) | {claim}
            event = self._append(
                s, record, events, kind="withdrawn", state=state, at=at,
                subject=record.subject, claims=remaining, declined=declined, affected=gone,
                method=method, policy=last.policy,
                expires_at=None if claim is None else last.expires_at,
                receipt_claims=list(gone.values()) or None)
            grant = history.state_at(record, events, event.at)
            assert grant is not None
            withdrawal = Withdrawal(
                account_id=account_id, client_id=client_id, subject=record.subject,
                claims=frozenset(gone), complete=claim is None, record_id=record.id,
                receipt_id=event.receipt_id, at=event.at)
            self._with_withdrawal(s, withdrawal)  # the grants end, the agency is told: or not
            return grant, withdrawal

        grant, withdrawal = self._retrying(work)
        # After the commit: decisions already deny; now the access tokens.
        self._on_withdraw(withdrawal)
        return grant

    def withdraw_all(self, account_id: str, *, method: str = "account-deletion",
                     now: datetime | None = None) -> list[ConsentGrant]:
        """Withdraw every valid grant of an account (account deletion). A grant that ended
        meanwhile (withdrawn by the citizen, or expired, since the list was read) is passed
        over, not a reason to leave the others valid."""
        done = []
        for grant in self.grants_for_account(account_id, now):
            if grant.valid:
                try:
                    done.append(self.withdraw(account_id, grant.client_id, method=method,
                                              now=now))
                except NothingToWithdraw:
                    continue
        return done

    def expire_due(self, now: datetime | None = None) -> int:
        """Write the ``expired`` event of every grant whose validity has passed (a periodic
        job; expiry takes effect at its time whether or not this has run)."""
        at = now or self.clock()
        with self._db.session() as s:
            due = list(s.scalars(select(ConsentRecord.id).where(
                ConsentRecord.expires_at.is_not(None), ConsentRecord.expires_at <= at)))
        expired = 0
        for record_id in due:
            def work(s: Session, record_id: str = record_id) -> bool:
                record = s.get(ConsentRecord, record_id, with_for_update=True)
                assert record is not None
                events = self._events(s, record_id)
                count = len(events)
                self._expire_if_due(s, record, events, at)
                # (a record changed since it was found is left as its events say)
                record.expires_at = expiry_of(events[-1]) if events else None
                return len(events) > count

            expired += self._retrying(work)
        return expired
